"""IoU exactly as pycocotools computes it, on torch tensors.

Meta's SA-Co evaluator (``sam3/eval/cgf1_eval.py``) gets its IoUs from ``pycocotools.mask.iou``; a
threshold test such as ``iou >= 0.75`` flips on the last bit, so these functions reproduce its
arithmetic rather than a textbook formula:

- masks (``rleIou``): integer intersection and union pixel counts, one float64 division, and 0 where
  the intersection is empty (which also covers two empty masks);
- boxes (``bbIou``): COCO xywh in float64, ``w = min(x + w) - max(x)`` (likewise ``h``), 0 unless both
  are positive, ``iou = i / ((area_a + area_b) - i)``.

Both run on the tensors' device. Pixel counts are summed exactly: in a float32 matmul below 2**24
pixels a mask (0/1 products and integer partial sums below 2**24 are exact in float32, and stay exact
when TF32 or bfloat16 matmul settings round the 0/1 inputs), in float64 above; the division is
always float64. Float32 counting makes the pairwise IoU 1.6-2.7x faster on a CPU than float64 counting
(16-100 masks of 224 x 224 to 640 x 480 px, ``benchmarks/bench_engine_stages.py iou``), same bits.

The data engine's verifiers compare each instance with its own counterpart (n pairs, not n x m):
:func:`rowwise_mask_iou`, float32, with int32 pixel sums (torch sums bools in int64 by default,
1.5-15x slower; this runs on every candidate).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

# What an IoU is computed on: masks ("segm") or boxes ("bbox"), pycocotools' names.
IouType = Literal["segm", "bbox"]
# Each IoU type's prefix in metric names: masks give the headline names (cgF1, mAP), boxes box_cgF1, box_mAP.
METRIC_PREFIX: dict[IouType, str] = {"segm": "", "bbox": "box_"}


def checked_iou_types(iou_types: Sequence[str]) -> tuple[IouType, ...]:
    """``iou_types`` in their order without repeats; ValueError unless a non-empty subset of segm, bbox."""
    if not iou_types or any(t not in METRIC_PREFIX for t in iou_types):
        raise ValueError(f"iou_types must be a non-empty subset of {tuple(METRIC_PREFIX)}; got {iou_types!r}")
    return tuple(dict.fromkeys(iou_types))


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise mask IoU.

    Args:
        a: [n, H, W] bool masks.
        b: [m, H, W] bool masks, same H and W as ``a``.

    Returns:
        [n, m] float64 IoU, equal bit for bit to ``pycocotools.mask.iou`` on the RLE of the masks.
    """
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"mask_iou needs masks of one size; got {tuple(a.shape[1:])} and {tuple(b.shape[1:])}. "
            "Resize predictions to the target resolution before updating the metric."
        )
    count = torch.float32 if a.shape[1:].numel() < 2**24 else torch.float64  # exact either way (module docstring)
    af = a.flatten(1).to(count)  # (n, HW)
    bf = b.flatten(1).to(count)  # (m, HW)
    inter = (af @ bf.T).double()  # (n, m) exact integer counts
    union = af.sum(1).double()[:, None] + bf.sum(1).double()[None, :] - inter
    # pycocotools sets the union to 1 when the intersection is empty: IoU 0, never 0/0.
    return torch.where(inter > 0, inter / union.clamp_min(1), torch.zeros_like(inter))


def rowwise_mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mask IoU of each row with the same row of the other stack.

    Args:
        a, b: [n, H, W] bool masks.

    Returns:
        [n] float32 IoU; 0.0 where both masks are empty (an empty mask is no object, so it must never
        count as stable or consistent).
    """
    inter = (a & b).flatten(1).sum(1, dtype=torch.int32).float()
    union = (a | b).flatten(1).sum(1, dtype=torch.int32).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))


def box_xyxy_to_coco(boxes: torch.Tensor) -> torch.Tensor:
    """[n, 4] xyxy (any float dtype) -> [n, 4] float64 COCO xywh, the form pycocotools reads."""
    b = boxes.to(torch.float64)
    return torch.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], dim=1)


def box_iou_coco(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise box IoU with pycocotools' ``bbIou`` arithmetic (no crowd boxes).

    Args:
        a: [n, 4] xyxy boxes in pixels.
        b: [m, 4] xyxy boxes in pixels.

    Returns:
        [n, m] float64 IoU, equal bit for bit to ``pycocotools.mask.iou`` on the xywh boxes.
    """
    da, gb = box_xyxy_to_coco(a)[:, None, :], box_xyxy_to_coco(b)[None, :, :]  # (n, 1, 4), (1, m, 4)
    w = torch.minimum(da[..., 2] + da[..., 0], gb[..., 2] + gb[..., 0]) - torch.maximum(da[..., 0], gb[..., 0])
    h = torch.minimum(da[..., 3] + da[..., 1], gb[..., 3] + gb[..., 1]) - torch.maximum(da[..., 1], gb[..., 1])
    inter = w * h
    union = (da[..., 2] * da[..., 3] + gb[..., 2] * gb[..., 3]) - inter
    overlap = (w > 0) & (h > 0)
    return torch.where(overlap, inter / torch.where(overlap, union, torch.ones_like(union)), torch.zeros_like(inter))
