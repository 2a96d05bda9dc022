"""Box geometry shared by the model, data and losses: format conversion, IoU and generalised IoU.

Boxes are normalised to [0, 1] unless a caller says pixels (conversions work in any unit). ``cxcywh`` is (centre x, centre y, width, height); ``xyxy`` is
(x0, y0, x1, y1). Every function takes any number of leading batch dimensions.

Degenerate boxes (zero width or height) are legal targets: every ratio divides by a denominator
clamped at ``EPS``, so IoU and GIoU stay finite and differentiable.
"""

from __future__ import annotations

import torch

# Small enough not to move any IoU a caller can see, large enough to keep 0/0 away in float32 and bf16.
EPS = 1e-7


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] cxcywh -> [..., 4] xyxy."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] xyxy -> [..., 4] cxcywh."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def box_area(boxes_xyxy: torch.Tensor) -> torch.Tensor:
    """[..., 4] xyxy -> [...] area (negative extents count as zero)."""
    wh = (boxes_xyxy[..., 2:] - boxes_xyxy[..., :2]).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def pairwise_iou_and_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and union area of every box in ``a`` with every box in ``b``.

    Args:
        a: [..., N, 4] xyxy.
        b: [..., M, 4] xyxy (same leading dimensions as ``a``).
    Returns:
        iou [..., N, M] and union [..., N, M].
    """
    area_a, area_b = box_area(a), box_area(b)
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])  # [..., N, M, 2]
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[..., :, None] + area_b[..., None, :] - inter
    return inter / union.clamp(min=EPS), union


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[..., N, 4] xyxy x [..., M, 4] xyxy -> [..., N, M] IoU."""
    return pairwise_iou_and_union(a, b)[0]


def pairwise_giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[..., N, 4] xyxy x [..., M, 4] xyxy -> [..., N, M] generalised IoU in [-1, 1]."""
    iou, union = pairwise_iou_and_union(a, b)
    lt = torch.minimum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.maximum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull.clamp(min=EPS)


def elementwise_iou_and_giou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and GIoU of aligned box pairs: [..., 4] xyxy x [..., 4] xyxy -> ([...], [...])."""
    area_a, area_b = box_area(a), box_area(b)
    wh = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=EPS)
    hull_wh = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0)
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    return iou, iou - (hull - union) / hull.clamp(min=EPS)
