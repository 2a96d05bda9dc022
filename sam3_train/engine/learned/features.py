"""What the learned verifiers see: fixed-size pixel tensors and a few statistics, built the same way
for training examples (examples.py) and for the engine's candidates (chain.py).

Mask verification (MV), one row per instance::

    pixels [n, 4, CROP, CROP] uint8   RGB crop around the mask (a square of the mask's extent plus
                                      CONTEXT on each side: the mask's surroundings tell a fragment
                                      from a whole), then the mask in that crop (0 / 255)
    stats  [n, len(MASK_STATS)]       float32, see MASK_STATS

Exhaustivity verification (EV), one row per (image, phrase, proposed set)::

    pixels [5, SCENE, SCENE] uint8    the whole image resized, the union of the set's masks, the union
                                      of the proposals left out of the set (where the model saw more)
    stats  [len(SET_STATS)]           float32, see SET_STATS

``evidence`` is 1 where the row comes from the detector (score, presence, stability and flip
agreement are known) and 0 for rows made from ground truth (their detector statistics are 0). The
examples hold accepted and rejected rows of both kinds, so the flag itself tells nothing about the
label (examples.py).

Phrases become word hashes (crc32 of each lower-case word, at most PHRASE_WORDS, -1 pads): the nets
map them into their own embedding table, so no tokenizer file is needed and the examples stay valid
whatever the table's size.
"""

from __future__ import annotations

import re
import zlib
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from sam3_train.metrics.iou import mask_iou, rowwise_mask_iou

CROP = 32  # MV crop side (pixels)
SCENE = 48  # EV image side (pixels)
CONTEXT = 0.25  # MV crop margin, as a share of the mask's longer side, on each side
PHRASE_WORDS = 8
MASK_STATS = ("evidence", "score", "presence", "stability_iou", "flip_iou", "has_flip", "sqrt_area", "box_fill",
              "duplicate_iou")
SET_STATS = ("evidence", "presence", "num_in", "num_out", "score_in_1", "score_in_2", "score_in_3",
             "score_out_1", "score_out_2", "score_out_3", "sqrt_area_in", "sqrt_area_out")


def phrase_tokens(phrases: list[str]) -> torch.Tensor:
    """[N, PHRASE_WORDS] int64: crc32 of each lower-case word of each phrase, -1 after its last word."""
    out = torch.full((len(phrases), PHRASE_WORDS), -1, dtype=torch.int64)
    for i, phrase in enumerate(phrases):
        words = re.findall(r"[a-z0-9]+", phrase.lower())[:PHRASE_WORDS]
        for j, word in enumerate(words):
            out[i, j] = zlib.crc32(word.encode())
    return out


def mask_extents(masks: torch.Tensor) -> torch.Tensor:
    """[n, H, W] bool -> [n, 4] float xyxy pixel extents (the whole image for an empty mask)."""
    n, height, width = masks.shape
    boxes = torch.tensor([[0.0, 0.0, width, height]]).repeat(n, 1)
    rows, cols = masks.any(2), masks.any(1)  # [n, H], [n, W]
    for i in range(n):
        ys, xs = rows[i].nonzero().flatten(), cols[i].nonzero().flatten()
        if len(xs):
            boxes[i] = torch.tensor([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], dtype=torch.float32)
    return boxes


def _square_crops(masks: torch.Tensor) -> torch.Tensor:
    """[n, 4] xyxy: a square around each mask's extent, CONTEXT of its longer side added on each side."""
    boxes = mask_extents(masks)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).amax(1, keepdim=True).clamp(min=4.0) * (0.5 + CONTEXT)
    return torch.cat([centre - half, centre + half], dim=1)


def mask_pixels(image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """[3, H, W] uint8 image, [n, H, W] bool masks -> [n, 4, CROP, CROP] uint8 (RGB crop, mask)."""
    n = masks.shape[0]
    if tuple(image.shape[1:]) != tuple(masks.shape[1:]):
        raise ValueError(f"image is {tuple(image.shape[1:])}, masks are {tuple(masks.shape[1:])}")
    if n == 0:
        return torch.zeros(0, 4, CROP, CROP, dtype=torch.uint8)
    crops = _square_crops(masks)
    rois = torch.cat([torch.zeros(n, 1), crops], dim=1)
    rgb = roi_align(image[None].float(), rois, output_size=CROP, sampling_ratio=2, aligned=True)  # (n, 3, C, C)
    rois[:, 0] = torch.arange(n, dtype=torch.float32)
    mask = roi_align(masks[:, None].float() * 255, rois, output_size=CROP, sampling_ratio=2, aligned=True)
    return torch.cat([rgb, mask], dim=1).round().clamp(0, 255).to(torch.uint8)


def mask_stats(masks: torch.Tensor, *, scores: torch.Tensor | None = None, presence: float = 0.0,
               loose: torch.Tensor | None = None, tight: torch.Tensor | None = None,
               flip: torch.Tensor | None = None) -> torch.Tensor:
    """[n, len(MASK_STATS)] float32 of ``masks`` [n, H, W] bool (sorted by descending score). With
    ``scores`` the detector statistics are filled (evidence 1); without them they are 0."""
    n, height, width = masks.shape
    stats = torch.zeros(n, len(MASK_STATS))
    if n == 0:
        return stats
    area = masks.flatten(1).sum(1).float()
    extent = mask_extents(masks)
    box_area = ((extent[:, 2] - extent[:, 0]) * (extent[:, 3] - extent[:, 1])).clamp(min=1)
    pairwise = mask_iou(masks, masks).float().tril(diagonal=-1)  # IoU with every higher-scored instance
    stats[:, MASK_STATS.index("sqrt_area")] = (area / (height * width)).sqrt()
    stats[:, MASK_STATS.index("box_fill")] = area / box_area
    stats[:, MASK_STATS.index("duplicate_iou")] = pairwise.amax(1)
    if scores is not None:
        stats[:, MASK_STATS.index("evidence")] = 1.0
        stats[:, MASK_STATS.index("score")] = scores.float()
        stats[:, MASK_STATS.index("presence")] = float(presence)
        stats[:, MASK_STATS.index("stability_iou")] = rowwise_mask_iou(tight, loose)
        if flip is not None:
            stats[:, MASK_STATS.index("flip_iou")] = rowwise_mask_iou(masks, flip)
            stats[:, MASK_STATS.index("has_flip")] = 1.0
    return stats


def candidate_mask_inputs(image: torch.Tensor, candidate: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """MV ``(pixels, stats)`` of every instance of a :class:`~sam3_train.engine.candidates.Candidate`."""
    stats = mask_stats(candidate.masks, scores=candidate.scores, presence=candidate.presence,
                       loose=candidate.masks_loose, tight=candidate.masks_tight, flip=candidate.flip_masks)
    return mask_pixels(image, candidate.masks), stats


def _resize(plane: torch.Tensor) -> torch.Tensor:
    """[C, H, W] float -> [C, SCENE, SCENE] (area averaging: thin masks stay visible)."""
    return F.interpolate(plane[None], size=(SCENE, SCENE), mode="area")[0]


def set_inputs(image: torch.Tensor, masks_in: torch.Tensor, masks_out: torch.Tensor, *,
               scores_in: torch.Tensor | None = None, scores_out: torch.Tensor | None = None,
               presence: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """EV ``(pixels [5, SCENE, SCENE] uint8, stats [len(SET_STATS)])`` of one proposed set.

    ``masks_in`` [k, H, W]: the set; ``masks_out`` [m, H, W]: the proposals left out of it. With
    ``scores_in`` (and ``scores_out``) the detector statistics are filled (evidence 1).
    """
    height, width = image.shape[1:]
    union_in = masks_in.any(0) if len(masks_in) else torch.zeros(height, width, dtype=torch.bool)
    union_out = (masks_out.any(0) if len(masks_out) else torch.zeros_like(union_in)) & ~union_in
    planes = torch.cat([image.float(), union_in[None].float() * 255, union_out[None].float() * 255])
    pixels = _resize(planes).round().clamp(0, 255).to(torch.uint8)
    stats = torch.zeros(len(SET_STATS))
    stats[SET_STATS.index("num_in")] = min(len(masks_in), 20) / 10
    stats[SET_STATS.index("num_out")] = min(len(masks_out), 20) / 10
    stats[SET_STATS.index("sqrt_area_in")] = (union_in.sum() / (height * width)).sqrt()
    stats[SET_STATS.index("sqrt_area_out")] = (union_out.sum() / (height * width)).sqrt()
    if scores_in is not None:
        stats[SET_STATS.index("evidence")] = 1.0
        stats[SET_STATS.index("presence")] = float(presence)
        for name, scores in (("score_in", scores_in), ("score_out", scores_out)):
            top = (scores if scores is not None else torch.zeros(0)).float().sort(descending=True).values[:3]
            first = SET_STATS.index(f"{name}_1")
            stats[first:first + len(top)] = top
    return pixels, stats
