"""The candidate record: what the detector proposes for one (image, phrase) pair, ready to verify.

Everything is in the image's original pixels (the frame of the sample's json ``width`` x ``height``),
so verifiers and writers never need the model's input frame. The propose step (proposals.py) gets
each pair's detections from ``model.postprocess`` (boxes in pixels, mask logits at the original
size), does the same for the horizontally flipped image (with the phrase passed through
``data.phrases.swap_left_right``: "left shoe" is a right shoe in the mirror), flips those mask logits
back along the width, and calls :func:`candidate_from_logits`.

On disk a candidate is one JSON object (:func:`candidate_record`, masks as COCO RLE at the original
size), an image one line of a proposals file; :func:`record_candidates` reads an image's record back
bit for bit, :class:`ProposalIndex` finds it by sample key.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sam3_train.data import rle as rle_ops
from sam3_train.metrics.iou import mask_iou

STABILITY_OFFSET = 1.0  # logits: masks at -1 and +1 (sigmoid 0.27 and 0.73) bracket the 0.5 mask


@dataclass
class Candidate:
    """The detector's proposals for one (image, phrase) pair; n instances, sorted by score.

    Tensors live on the CPU (writers encode masks with numpy). Keep only detections above a score
    floor at or below the exhaustivity band's ``low``: a proposal dropped before verification cannot
    make its pair non-exhaustive.

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

    key: str
    phrase: str
    height: int
    width: int
    presence: float
    scores: torch.Tensor
    boxes: torch.Tensor
    masks: torch.Tensor
    masks_loose: torch.Tensor
    masks_tight: torch.Tensor
    flip_masks: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n, size = self.scores.shape[0], (self.height, self.width)
        for name in ("masks", "masks_loose", "masks_tight", "flip_masks"):
            value = getattr(self, name)
            if value is not None and (value.dtype != torch.bool or tuple(value.shape) != (n, *size)):
                raise ValueError(f"Candidate {self.key}/{self.phrase!r}: {name} must be bool [{n}, {size[0]}, "
                                 f"{size[1]}], got {value.dtype} {tuple(value.shape)}")
        if tuple(self.boxes.shape) != (n, 4):
            raise ValueError(f"Candidate {self.key}/{self.phrase!r}: boxes must be [{n}, 4], "
                             f"got {tuple(self.boxes.shape)}")
        if "." in self.key or "/" in self.key:
            raise ValueError(f"sample key {self.key!r} must not contain dots or slashes")

    @property
    def num_instances(self) -> int:
        return int(self.scores.shape[0])

    @property
    def top_score(self) -> float:
        """Highest instance score, 0.0 when the model proposed nothing."""
        return float(self.scores.max()) if self.num_instances else 0.0


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
def rles_of(masks: torch.Tensor) -> list[dict[str, Any]]:
    """[n, H, W] bool -> n COCO RLEs (``counts`` as str)."""
    return [rle_ops.encode(m) for m in masks.numpy().astype(np.uint8)]


def masks_of(rles: list[dict[str, Any]], height: int, width: int) -> torch.Tensor:
    """n COCO RLEs -> [n, H, W] bool (n may be 0)."""
    return torch.from_numpy(np.ascontiguousarray(rle_ops.decode_many(rles, height, width))).bool()


def candidate_record(c: Candidate, dropped: int = 0) -> dict[str, Any]:
    """A Candidate as JSON (float32 values written exactly: a float32 is a double exactly).

    ``dropped``: detections above the floor beyond ``max_detections`` (such a pair cannot be exhaustive).
    """
    return {"phrase": c.phrase, "presence": c.presence, "scores": c.scores.tolist(), "boxes": c.boxes.tolist(),
            "masks": rles_of(c.masks), "loose": rles_of(c.masks_loose), "tight": rles_of(c.masks_tight),
            "flip": None if c.flip_masks is None else rles_of(c.flip_masks), "dropped": int(dropped)}


def record_candidates(record: dict[str, Any]) -> list[tuple[Candidate, int]]:
    """(Candidate, dropped) of every pair of one image record ``{"key", "height", "width", "pairs"}``:
    the inverse of :func:`candidate_record`."""
    key, height, width = record["key"], int(record["height"]), int(record["width"])
    out = []
    for pair in record["pairs"]:
        n = len(pair["scores"])
        flip = None if pair["flip"] is None else masks_of(pair["flip"], height, width)
        c = Candidate(key=key, phrase=pair["phrase"], height=height, width=width, presence=float(pair["presence"]),
                      scores=torch.tensor(pair["scores"], dtype=torch.float32).reshape(n),
                      boxes=torch.tensor(pair["boxes"], dtype=torch.float32).reshape(n, 4),
                      masks=masks_of(pair["masks"], height, width), masks_loose=masks_of(pair["loose"], height, width),
                      masks_tight=masks_of(pair["tight"], height, width), flip_masks=flip)
        out.append((c, int(pair.get("dropped", 0))))
    return out


class ProposalIndex:
    """Random access to one rank's proposals file by sample key (an offset per key, records parsed
    on demand: a rank's proposals need not fit in memory)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.offsets: dict[str, int] = {}
        with open(self.path, "rb") as f:
            offset = 0
            for line in f:
                key = json.loads(line)["key"]
                if key in self.offsets:
                    raise ValueError(f"{self.path}: sample {key} proposed twice")
                self.offsets[key] = offset
                offset += len(line)

    def __contains__(self, key: str) -> bool:
        return key in self.offsets

    def __len__(self) -> int:
        return len(self.offsets)

    def get(self, key: str) -> dict[str, Any]:
        with open(self.path, "rb") as f:
            f.seek(self.offsets[key])
            return json.loads(f.readline())
