"""IoU exactly as pycocotools computes it, on torch tensors.

Meta's SA-Co evaluator (``sam3/eval/cgf1_eval.py``) gets its IoUs from ``pycocotools.mask.iou``; a
threshold test such as ``iou >= 0.75`` flips on the last bit, so these functions reproduce its
arithmetic rather than a textbook formula:

- masks (``rleIou``): integer intersection and union pixel counts, one float64 division, and 0 where
  the intersection is empty (which also covers two empty masks);
- boxes (``bbIou``): COCO xywh in float64, ``w = min(x + w) - max(x)`` (likewise ``h``), 0 unless both
  are positive, ``iou = i / ((area_a + area_b) - i)``.

Both run on the tensors' device; the counts are exact in float64 up to 2**53 pixels, and float64
also keeps TF32 or reduced-precision matmul settings from touching them.
"""

from __future__ import annotations

import torch


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
    af = a.flatten(1).to(torch.float64)  # (n, HW)
    bf = b.flatten(1).to(torch.float64)  # (m, HW)
    inter = af @ bf.T  # (n, m) exact integer counts
    union = af.sum(1)[:, None] + bf.sum(1)[None, :] - inter
    # pycocotools sets the union to 1 when the intersection is empty: IoU 0, never 0/0.
    return torch.where(inter > 0, inter / union.clamp_min(1), torch.zeros_like(inter))


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
