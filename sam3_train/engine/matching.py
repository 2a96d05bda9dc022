"""The one greedy mask matcher of the engine: predicted masks claim true instances in the order given.

    claimed = greedy_match(masks, truth, min_iou=0.5)    # [j or None per predicted mask]
    hits = matched_instances(masks, truth)               # how many claimed one

Policy: each predicted mask, in the order given (the writer and the propose step keep them by
descending score), claims the unclaimed true instance of highest mask IoU among those at IoU >=
``min_iou`` (the first such on a tie), or none. The audit counts matches with it (pseudo-label
precision, whether a set is complete); the learned verifiers' examples label proposals with it.
"""

from __future__ import annotations

import torch

from sam3_train.metrics.iou import mask_iou

MATCH_IOU = 0.5


def greedy_match(predicted: torch.Tensor, true: torch.Tensor, min_iou: float = MATCH_IOU) -> list[int | None]:
    """For each of ``predicted`` [n, H, W] bool, the index into ``true`` [m, H, W] bool it claims, or None."""
    claimed: list[int | None] = [None] * len(predicted)
    if len(predicted) == 0 or len(true) == 0:
        return claimed
    free = torch.ones(len(true), dtype=torch.bool)
    for i, row in enumerate(mask_iou(predicted, true)):  # row [m]: IoU with every true instance
        options = torch.where(free & (row >= min_iou), row, -1.0)
        j = int(options.argmax())
        if options[j] >= 0:
            free[j], claimed[i] = False, j
    return claimed


def matched_instances(predicted: torch.Tensor, true: torch.Tensor, min_iou: float = MATCH_IOU) -> int:
    """How many of ``predicted`` [n, H, W] bool masks match a distinct one of ``true`` [m, H, W] at IoU >= min_iou."""
    return sum(j is not None for j in greedy_match(predicted, true, min_iou))
