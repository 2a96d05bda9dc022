"""The candidate record: what the detector proposes for one (image, phrase) pair, ready to verify.

Everything is in the image's original pixels (the frame of the sample's json ``width`` x ``height``),
so verifiers and writers never need the model's input frame. The propose step fills one record per
pair from ``Sam3Detector`` outputs (``pred_logits [P, Q]``, ``presence_logit [P]``, ``pred_boxes
[P, Q, 4]`` normalised cxcywh, ``pred_masks [P, Q, h, w]`` logits): keep the queries whose score
passes a floor, map boxes to pixels and mask logits to the original size (as ``model.postprocess``
does), run the horizontally flipped image the same way (with the phrase passed through
``data.phrases.swap_left_right``: "left shoe" is a right shoe in the mirror), flip its mask logits
back along the width, and call :func:`candidate_from_logits`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise IoU of two [n, H, W] bool stacks -> [n] float32; 0.0 where both masks are empty
    (an empty mask is no object, so it must never count as stable or consistent)."""
    # int32 sums: torch sums bools in int64 by default, ~9x slower (this runs on every candidate).
    inter = (a & b).flatten(1).sum(1, dtype=torch.int32).float()
    union = (a | b).flatten(1).sum(1, dtype=torch.int32).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))


def pairwise_mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n, H, W] bool x [m, H, W] bool -> [n, m] float32 IoU (0.0 for two empty masks)."""
    fa, fb = a.flatten(1).float(), b.flatten(1).float()
    inter = fa @ fb.T  # (n, m)
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))


def match_flip_masks(masks: torch.Tensor, flip_masks: torch.Tensor) -> torch.Tensor:
    """For each of n masks, the flip-run mask (of m) it overlaps most -> [n, H, W] bool.

    Query order differs between the two runs, so instances are paired by mask IoU; with no flip
    detection at all every instance gets an empty mask (IoU 0: inconsistent).
    """
    if flip_masks.shape[0] == 0 or masks.shape[0] == 0:
        return torch.zeros_like(masks)
    best = pairwise_mask_iou(masks, flip_masks).argmax(dim=1)  # (n,)
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
