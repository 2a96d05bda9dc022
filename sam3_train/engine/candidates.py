"""The candidate record: what the detector proposes for one (image, phrase) pair, ready to verify.

Everything is in the image's original pixels (the frame of the sample's json ``width`` x ``height``),
so verifiers and writers never need the model's input frame. The propose step (proposals.py) gets
each pair's detections from ``model.postprocess`` (boxes in pixels, mask logits at the original
size), does the same for the horizontally flipped image (with the phrase passed through
``data.phrases.swap_left_right``: "left shoe" is a right shoe in the mirror), flips those mask logits
back along the width, and calls :func:`candidate_from_logits`.

On disk a candidate is one JSON object (:func:`candidate_record`, masks as COCO RLE at the original
size), an image one record of a proposals file (proposal_files.py); :func:`record_candidates` reads an
image's record back bit for bit, its masks as :class:`MaskStack` (decoded when first read).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sam3_train.data import rle as rle_ops
from sam3_train.metrics.iou import mask_iou

STABILITY_OFFSET = 1.0  # logits: masks at -1 and +1 (sigmoid 0.27 and 0.73) bracket the 0.5 mask


class MaskStack:
    """n masks of one image kept as COCO RLE until first read, then decoded once ([n, H, W] bool).

    A proposals file holds four such stacks per pair and most instances fail the score check, which
    reads no pixels: decoding on demand keeps that rejection free. ``rows`` ([n] bool, set before the
    first read) limits decoding to those instances; the others read as empty masks.

    Args:
        rles: n COCO RLEs (``counts`` as str), each of size [height, width].
        source: where the RLEs came from (file and sample), for the error a bad RLE raises.
    """

    def __init__(self, rles: list[dict[str, Any]], height: int, width: int, *, source: str = ""):
        self.rles, self.height, self.width, self.source = list(rles), int(height), int(width), source
        self.rows: torch.Tensor | None = None
        self._masks: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.rles)

    @property
    def decoded(self) -> bool:
        return self._masks is not None

    def limit(self, rows: torch.Tensor) -> None:
        """Decode only the instances where ``rows`` [n] bool is True (the others read as empty)."""
        if self.decoded:
            raise RuntimeError(f"{self.source}: masks already decoded; limit the rows before the first read")
        if tuple(rows.shape) != (len(self),):
            raise ValueError(f"{self.source}: rows must be [{len(self)}] bool, got {tuple(rows.shape)}")
        self.rows = rows.bool()

    def tensor(self) -> torch.Tensor:
        """[n, H, W] bool (decoded on the first call)."""
        if self._masks is None:
            if self.rows is None:
                self._masks = masks_of(self.rles, self.height, self.width, source=self.source)
            else:
                self._masks = torch.zeros(len(self), self.height, self.width, dtype=torch.bool)
                rows = self.rows.nonzero().flatten().tolist()
                if rows:
                    picked = [self.rles[i] for i in rows]
                    self._masks[rows] = masks_of(picked, self.height, self.width, source=self.source)
        return self._masks


class _MaskField:
    """A Candidate mask attribute: stored as given (a tensor, a MaskStack or None), read as a tensor."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        value = getattr(obj, self.slot)
        return value.tensor() if isinstance(value, MaskStack) else value

    def __set__(self, obj: Any, value: torch.Tensor | MaskStack | None) -> None:
        setattr(obj, self.slot, value)


MASK_FIELDS = ("masks", "masks_loose", "masks_tight", "flip_masks")


class Candidate:
    """The detector's proposals for one (image, phrase) pair; n instances, sorted by score.

    Tensors live on the CPU (writers encode masks with numpy). Keep only detections above a score
    floor at or below the exhaustivity band's ``low``: a proposal dropped before verification cannot
    make its pair non-exhaustive. Each mask stack may be given as a :class:`MaskStack` (what
    :func:`record_candidates` does): it is decoded when first read, so checks that read only scores
    cost no decoding. (A plain class, not a dataclass, so that these attributes can decode on read.)

    Attributes:
        key: the sample key of the image (no dots).
        phrase: the noun phrase asked.
        height, width: the image's original size in pixels.
        presence: the pair's presence probability, sigmoid(presence logit), in [0, 1].
        scores: [n] float32, sigmoid(class logit) x presence, in [0, 1], descending.
        boxes: [n, 4] float32, absolute pixel xyxy.
        masks: [n, H, W] bool, mask logits > 0 (the mask that gets written).
        masks_loose: [n, H, W] bool, mask logits > -offset (a superset of ``masks``).
        masks_tight: [n, H, W] bool, mask logits > +offset (a subset of ``masks``).
        flip_masks: [n, H, W] bool or None: for each instance, the best-matching (highest mask IoU)
            mask predicted on the horizontally flipped image, flipped back; None when no flip ran.
    """

    masks = _MaskField()
    masks_loose = _MaskField()
    masks_tight = _MaskField()
    flip_masks = _MaskField()

    def __init__(self, *, key: str, phrase: str, height: int, width: int, presence: float, scores: torch.Tensor,
                 boxes: torch.Tensor, masks: torch.Tensor | MaskStack, masks_loose: torch.Tensor | MaskStack,
                 masks_tight: torch.Tensor | MaskStack, flip_masks: torch.Tensor | MaskStack | None = None):
        self.key, self.phrase, self.height, self.width = key, phrase, height, width
        self.presence, self.scores, self.boxes = presence, scores, boxes
        self.masks, self.masks_loose, self.masks_tight, self.flip_masks = masks, masks_loose, masks_tight, flip_masks
        n, size = self.scores.shape[0], (self.height, self.width)
        for name in MASK_FIELDS:
            value = self.stack(name)
            if value is None:
                continue
            lazy = isinstance(value, MaskStack)
            shape = (len(value), value.height, value.width) if lazy else tuple(value.shape)
            dtype = torch.bool if lazy else value.dtype
            if dtype != torch.bool or shape != (n, *size):
                raise ValueError(f"Candidate {self.key}/{self.phrase!r}: {name} must be bool [{n}, {size[0]}, "
                                 f"{size[1]}], got {dtype} {shape}")
        if tuple(self.boxes.shape) != (n, 4):
            raise ValueError(f"Candidate {self.key}/{self.phrase!r}: boxes must be [{n}, 4], "
                             f"got {tuple(self.boxes.shape)}")
        if "." in self.key or "/" in self.key:
            raise ValueError(f"sample key {self.key!r} must not contain dots or slashes")

    def __repr__(self) -> str:
        return (f"Candidate(key={self.key!r}, phrase={self.phrase!r}, n={self.num_instances}, "
                f"{self.width}x{self.height})")

    @property
    def num_instances(self) -> int:
        return int(self.scores.shape[0])

    @property
    def top_score(self) -> float:
        """Highest instance score, 0.0 when the model proposed nothing."""
        return float(self.scores.max()) if self.num_instances else 0.0

    def stack(self, name: str) -> torch.Tensor | MaskStack | None:
        """The mask attribute ``name`` as stored (a MaskStack stays undecoded)."""
        if name not in MASK_FIELDS:
            raise KeyError(f"{name!r} is not one of {MASK_FIELDS}")
        return getattr(self, "_" + name)

    def decode(self) -> None:
        """Decode every stored mask stack now: the write stage's eager path before decoding became
        lazy, which the benchmark and the tests compare against."""
        for name in MASK_FIELDS:
            getattr(self, name)

    def limit_decoding(self, rows: torch.Tensor) -> None:
        """Decode only the instances where ``rows`` [n] bool is True; the others' masks read as empty.

        For instances already rejected by a check that reads no pixels (the write stage's score
        gate, pseudo_labels.py): no later check's verdict on them counts. Stacks given as tensors
        stay as they are.
        """
        for name in MASK_FIELDS:
            value = self.stack(name)
            if isinstance(value, MaskStack):
                value.limit(rows)


def match_flip_masks(masks: torch.Tensor, flip_masks: torch.Tensor) -> torch.Tensor:
    """For each of n masks, the flip-run mask (of m) it overlaps most -> [n, H, W] bool.

    Query order differs between the two runs, so instances are paired by mask IoU; with no flip
    detection at all every instance gets an empty mask (IoU 0: inconsistent).
    """
    if flip_masks.shape[0] == 0 or masks.shape[0] == 0:
        return torch.zeros_like(masks)
    best = mask_iou(masks, flip_masks).argmax(dim=1)  # (n,)
    return flip_masks[best]


@torch.no_grad()
def candidate_from_logits(
    *,
    key: str,
    phrase: str,
    presence: float,
    scores: torch.Tensor,
    boxes: torch.Tensor,
    mask_logits: torch.Tensor,
    flip_mask_logits: torch.Tensor | None = None,
    stability_offset: float = STABILITY_OFFSET,
) -> Candidate:
    """One pair's record from detections already in original pixels.

    Args:
        presence: presence probability of the pair.
        scores: [n] class x presence scores (any order; the record sorts them).
        boxes: [n, 4] absolute pixel xyxy.
        mask_logits: [n, H, W] mask logits at the original image size.
        flip_mask_logits: [m, H, W] logits of the flip run's detections, already flipped back
            (``torch.flip(..., dims=[-1])``); None when no flip TTA ran.
        stability_offset: logit offset of the loose (-offset) and tight (+offset) masks.
    """
    order = scores.float().argsort(descending=True, stable=True)
    logits = mask_logits[order].float()
    masks = logits > 0
    flip = None
    if flip_mask_logits is not None:
        flip = match_flip_masks(masks, flip_mask_logits.float() > 0)
    height, width = (int(s) for s in mask_logits.shape[-2:])
    return Candidate(
        key=key, phrase=phrase, height=height, width=width, presence=float(presence),
        scores=scores[order].float(), boxes=boxes[order].float().reshape(-1, 4),
        masks=masks, masks_loose=logits > -stability_offset, masks_tight=logits > stability_offset,
        flip_masks=flip,
    )


# ------------------------------------------------------------------------------------------ on disk
def rles_of(masks: torch.Tensor | MaskStack) -> list[dict[str, Any]]:
    """[n, H, W] bool -> n COCO RLEs (``counts`` as str); a MaskStack gives its RLEs back undecoded."""
    if isinstance(masks, MaskStack):
        return list(masks.rles)
    return [rle_ops.encode(m) for m in masks.numpy().astype(np.uint8)]


def masks_of(rles: list[dict[str, Any]], height: int, width: int, *, source: str = "") -> torch.Tensor:
    """n COCO RLEs -> [n, H, W] bool (n may be 0). A bad RLE fails naming ``source`` when given."""
    try:
        decoded = rle_ops.decode_many(rles, height, width)
    except ValueError as e:
        if not source:
            raise
        raise ValueError(f"{source}: {e}") from e
    return torch.from_numpy(np.ascontiguousarray(decoded)).bool()


def candidate_record(c: Candidate, dropped: int = 0) -> dict[str, Any]:
    """A Candidate as JSON (float32 values written exactly: a float32 is a double exactly).

    ``dropped``: detections above the floor beyond ``max_detections`` (such a pair cannot be exhaustive).
    """
    flip = c.stack("flip_masks")
    return {"phrase": c.phrase, "presence": c.presence, "scores": c.scores.tolist(), "boxes": c.boxes.tolist(),
            "masks": rles_of(c.stack("masks")), "loose": rles_of(c.stack("masks_loose")),
            "tight": rles_of(c.stack("masks_tight")), "flip": None if flip is None else rles_of(flip),
            "dropped": int(dropped)}


def record_candidates(record: dict[str, Any], *, source: str = "") -> list[tuple[Candidate, int]]:
    """(Candidate, dropped) of every pair of one image record ``{"key", "height", "width", "pairs"}``:
    the inverse of :func:`candidate_record`. Masks stay RLE (:class:`MaskStack`) until first read;
    ``source`` (e.g. the proposals file) names where a bad RLE came from."""
    key, height, width = record["key"], int(record["height"]), int(record["width"])
    where = f"{source} sample {key}" if source else f"sample {key}"
    out = []
    for pair in record["pairs"]:
        n = len(pair["scores"])
        stack = {name: MaskStack(pair[name], height, width, source=f"{where} {pair['phrase']!r} {name}")
                 for name in ("masks", "loose", "tight", "flip") if pair[name] is not None}
        c = Candidate(key=key, phrase=pair["phrase"], height=height, width=width, presence=float(pair["presence"]),
                      scores=torch.tensor(pair["scores"], dtype=torch.float32).reshape(n),
                      boxes=torch.tensor(pair["boxes"], dtype=torch.float32).reshape(n, 4),
                      masks=stack["masks"], masks_loose=stack["loose"], masks_tight=stack["tight"],
                      flip_masks=stack.get("flip"))
        out.append((c, int(pair.get("dropped", 0))))
    return out
