"""Mask2Former / PointRend point sampling: evaluate mask losses on K points instead of every pixel.

Predicted mask logits are sampled bilinearly at K points per mask, chosen partly at random and
partly where the prediction is least certain (|logit| smallest); the target masks are sampled
bilinearly at the same points. Memory is O(masks x K), independent of the mask resolution.

Points are kept in ``grid_sample``'s coordinates: (x, y) in [-1, 1] over the whole mask with
``align_corners=False``, so the same points land on the same places of a 288 x 288 prediction and a
1008 x 1008 target. (Staying in these units saves two passes over the largest tensors here.)
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

# Targets are converted to float this many masks at a time: a 1008 x 1008 float mask is 4 MB.
_TARGET_CHUNK = 64


def point_sample(maps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear values of ``maps`` [M, H, W] at ``points`` [M, K, 2] ((x, y) in [-1, 1]) -> [M, K].

    Border padding, as F.interpolate extends edges: Mask2Former's zero padding pulls logits within
    half a pixel of the border towards 0 (12 % of a 16 x 16 mask), biasing the sampled loss.
    """
    grid = points[:, :, None, :].to(maps.dtype)  # [M, K, 1, 2]
    return F.grid_sample(maps[:, None], grid, padding_mode="border", align_corners=False).flatten(1)


def sample_binary_masks(masks: torch.Tensor, points: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``point_sample`` for bool masks [M, H, W]: converted to ``dtype`` in chunks to bound memory."""
    out = [point_sample(m.to(dtype), p) for m, p in zip(masks.split(_TARGET_CHUNK), points.split(_TARGET_CHUNK))]
    return torch.cat(out) if out else points.new_zeros(0, points.shape[1], dtype=dtype)


def _uniform(m: int, k: int, device: torch.device) -> torch.Tensor:
    return torch.empty(m, k, 2, device=device).uniform_(-1.0, 1.0)


@torch.no_grad()
def uncertain_points(
    logits: torch.Tensor, *, num_points: int, oversample_ratio: float, importance_sample_ratio: float
) -> torch.Tensor:
    """Pick ``num_points`` points per mask of ``logits`` [M, h, w] -> [M, num_points, 2] in [-1, 1].

    Draws ``num_points x oversample_ratio`` uniform points, keeps the ``importance_sample_ratio``
    share with the smallest |logit| (uncertainty is measured on the interpolated logit, not
    interpolated from per-pixel uncertainty, as PointRend explains), and fills the rest uniformly.
    """
    if oversample_ratio < 1 or not 0 <= importance_sample_ratio <= 1:
        raise ValueError(
            f"point sampling needs oversample_ratio >= 1 and 0 <= importance_sample_ratio <= 1, "
            f"got {oversample_ratio} and {importance_sample_ratio}"
        )
    m = logits.shape[0]
    num_important = int(importance_sample_ratio * num_points)
    parts = []
    if num_important > 0:
        drawn = _uniform(m, max(int(num_points * oversample_ratio), num_important), logits.device)
        certainty = point_sample(logits.float(), drawn).abs_()  # [M, num_drawn]
        keep = certainty.topk(num_important, dim=1, largest=False, sorted=False).indices
        parts.append(drawn.gather(1, keep[:, :, None].expand(-1, -1, 2)))
    if num_points > num_important:
        parts.append(_uniform(m, num_points - num_important, logits.device))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
