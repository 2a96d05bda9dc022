"""Assign predictions to targets: one-to-one (Hungarian) and one-to-many (DAC-DETR).

Both matchers read ``pred_logits [P, Q]`` and ``pred_boxes [P, Q, 4]`` (normalised cxcywh) from an
output dict, take the targets as ``Batch.targets`` or ``PackedTargets``, and return ``MatchIndices``:
three aligned 1-D long tensors (pair, query, target), where ``target`` indexes the packed boxes
(all pairs' targets concatenated in pair order; ``PackedTargets.boxes``).

    matcher = HungarianMatcher()                 # SAM 3's one-to-one costs
    idx = matcher(outputs, batch.targets)
    outputs["pred_boxes"][idx.pair, idx.query]  # [M, 4], aligned with packed.boxes[idx.target]
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn import functional as F

from sam3_train.box_ops import cxcywh_to_xyxy, pairwise_giou, pairwise_iou
from sam3_train.losses.targets import PackedTargets, as_packed


class MatchIndices(NamedTuple):
    """Matched (pair, query, packed target) triples, each [M] long."""

    pair: torch.Tensor
    query: torch.Tensor
    target: torch.Tensor

    @classmethod
    def empty(cls, device: torch.device) -> MatchIndices:
        e = torch.zeros(0, dtype=torch.long, device=device)
        return cls(e, e.clone(), e.clone())

    def __len__(self) -> int:  # type: ignore[override]  # number of matches, not of fields
        return self.pair.shape[0]


class HungarianMatcher(nn.Module):
    """One-to-one assignment per (image, phrase) pair, minimising

        cost = cost_class x focal(p) + cost_bbox x L1(cxcywh) - cost_giou x GIoU

    where focal(p) = alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p)) is the focal loss
    of calling the query positive minus that of calling it negative (DETR's focal cost). Each target
    gets exactly one query (when Q >= n); pairs with no target give no indices. The costs of the
    whole batch are one tensor; only the assignment runs pair by pair on the CPU.
    """

    def __init__(
        self,
        *,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: at least one of cost_class, cost_bbox, cost_giou must be non-zero")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def cost_matrix(self, logits: torch.Tensor, boxes: torch.Tensor, packed: PackedTargets) -> torch.Tensor:
        """[P, Q] logits, [P, Q, 4] cxcywh -> [P, Q, T] cost (columns past num_boxes are padding)."""
        logits, boxes = logits.float(), boxes.float()
        prob = logits.sigmoid()
        # logsigmoid instead of log(p): finite for saturated logits.
        pos = self.focal_alpha * (1 - prob) ** self.focal_gamma * -F.logsigmoid(logits)
        neg = (1 - self.focal_alpha) * prob**self.focal_gamma * -F.logsigmoid(-logits)
        cost_class = (pos - neg)[:, :, None]  # [P, Q, 1]
        tgt = packed.padded_boxes  # [P, T, 4]
        cost_bbox = torch.cdist(boxes, tgt, p=1)  # [P, Q, T]
        cost_giou = -pairwise_giou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(tgt))
        return self.cost_class * cost_class + self.cost_bbox * cost_bbox + self.cost_giou * cost_giou

    @torch.no_grad()
    def forward(self, outputs: dict[str, torch.Tensor], targets: list[dict] | PackedTargets) -> MatchIndices:
        """outputs: pred_logits [P, Q], pred_boxes [P, Q, 4] cxcywh. Returns MatchIndices sorted by pair."""
        logits = outputs["pred_logits"]
        device = logits.device
        packed = as_packed(targets, device)
        if packed.boxes.shape[0] == 0:
            return MatchIndices.empty(device)
        cost = self.cost_matrix(logits, outputs["pred_boxes"], packed).cpu().numpy()
        pairs, queries, locals_ = [], [], []
        for p, n in enumerate(packed.num_boxes.tolist()):
            if n == 0:
                continue
            q, t = linear_sum_assignment(cost[p, :, :n])
            pairs.append(np.full(len(q), p))
            queries.append(q)
            locals_.append(t)
        pair = torch.from_numpy(np.concatenate(pairs)).long().to(device)
        query = torch.from_numpy(np.concatenate(queries)).long().to(device)
        target = torch.from_numpy(np.concatenate(locals_)).long().to(device) + packed.offsets[pair]
        return MatchIndices(pair, query, target)


class OneToManyMatcher(nn.Module):
    """DAC-DETR's one-to-many assignment, as SAM 3 uses it on the one-to-many query half.

    Score s = alpha x sigmoid(logit) + (1 - alpha) x IoU for every (query, target) of a pair. A query
    matches a target when s is among that target's ``topk`` scores and s > ``threshold``; a query
    may match several targets, and a target gets at most ``topk`` queries (possibly none).
    """

    def __init__(self, *, alpha: float = 0.3, threshold: float = 0.4, topk: int = 4) -> None:
        super().__init__()
        if topk < 1:
            raise ValueError(f"OneToManyMatcher: topk must be >= 1, got {topk}")
        self.alpha = alpha
        self.threshold = threshold
        self.topk = topk

    @torch.no_grad()
    def scores(self, logits: torch.Tensor, boxes: torch.Tensor, packed: PackedTargets) -> torch.Tensor:
        """[P, Q] logits, [P, Q, 4] cxcywh -> [P, Q, T] matching score (higher is better)."""
        iou = pairwise_iou(cxcywh_to_xyxy(boxes.float()), cxcywh_to_xyxy(packed.padded_boxes))
        return self.alpha * logits.float().sigmoid()[:, :, None] + (1 - self.alpha) * iou

    @torch.no_grad()
    def forward(self, outputs: dict[str, torch.Tensor], targets: list[dict] | PackedTargets) -> MatchIndices:
        """outputs: pred_logits [P, Q], pred_boxes [P, Q, 4] cxcywh. Returns MatchIndices sorted by (pair, query)."""
        logits = outputs["pred_logits"]
        device = logits.device
        packed = as_packed(targets, device)
        if packed.boxes.shape[0] == 0:
            return MatchIndices.empty(device)
        score = self.scores(logits, outputs["pred_boxes"], packed)  # [P, Q, T]
        k = min(self.topk, score.shape[1])
        top = torch.zeros_like(score, dtype=torch.bool)
        top.scatter_(1, score.topk(k, dim=1).indices, True)
        matches = top & (score > self.threshold) & packed.valid[:, None, :]
        pair, query, local = matches.nonzero(as_tuple=True)
        return MatchIndices(pair, query, local + packed.offsets[pair])
