"""The SAM 3 loss terms as functions of predictions, packed targets and match indices.

Each function returns one unweighted scalar (or a pair of them); ``Sam3Criterion`` decides which
layers and halves they run on and applies the weights. Shapes: P pairs, Q queries, M matches,
N = total target boxes; ``indices`` is a ``MatchIndices`` (pair, query, packed target).

Terms with nothing to supervise return ``0 x sum(prediction)``, a zero that keeps the prediction in
the graph, so every parameter gets a (zero) gradient and DDP never sees an unused parameter.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torchvision.ops import sigmoid_focal_loss  # RetinaNet focal loss; as fast as a hand-written one (docs/benchmarks.md)

from sam3_train.box_ops import cxcywh_to_xyxy, elementwise_iou_and_giou
from sam3_train.losses.matcher import MatchIndices
from sam3_train.losses.point_sampling import point_sample, sample_binary_masks, uncertain_points
from sam3_train.losses.targets import PackedTargets


def gather_matched(x: torch.Tensor, indices: MatchIndices) -> torch.Tensor:
    """``x[indices.pair, indices.query]`` ([P, Q, ...] -> [M, ...]) with a bitwise-reproducible backward.

    The backward of ``x[pair, query]`` is ``index_put_(accumulate=True)``, which on the CPU adds with
    atomics from several threads once the gathered tensor has 32768+ elements: a query the one-to-many
    matcher gave several targets gets its gradients summed in a racy order. Here every (pair, query)
    is read once and repeated with ``index_select`` (its backward ``index_add_`` adds in index order).
    """
    num_queries = x.shape[1]
    cells, inverse = torch.unique(indices.pair * num_queries + indices.query, return_inverse=True)
    return x[cells // num_queries, cells % num_queries].index_select(0, inverse)


def _zero(x: torch.Tensor) -> torch.Tensor:
    return x.sum() * 0.0


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[M, K] logits and targets -> [M] dice loss 1 - (2|p.t| + 1) / (|p| + |t| + 1), smoothed by 1."""
    prob = logits.sigmoid()
    numerator = 2 * (prob * targets).sum(-1)
    denominator = prob.sum(-1) + targets.sum(-1)
    return 1 - (numerator + 1) / (denominator + 1)


def align_loss(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    packed: PackedTargets,
    indices: MatchIndices,
    *,
    pos_weight: float,
    alpha: float,
    gamma: float,
    pad_num_queries: int | None,
    min_target: float = 0.01,
) -> torch.Tensor:
    """Align-DETR's IoU-aware BCE, as SAM 3 trains its class logits.

    Matched cells: pos_weight x BCE(logit, t), t = max(p^alpha x IoU^(1-alpha), min_target), t detached
    (SAM 3: min_target 0.01).
    Unmatched cells: p^gamma x BCE(logit, 0) (not punished for non-exhaustive pairs: weak loss).
    Pairs without instances contribute zero (the presence loss supervises them).

    The mean runs over supervised cells with each exhaustive pair counting ``max(Q, pad_num_queries)``
    queries, as SAM 3 pads to 200 so a small model's loss has the released scale; a non-exhaustive
    pair counts only its matched queries (Meta's weak-loss denominator, extended to mixed batches).

    Args:
        logits [P, Q], pred_boxes [P, Q, 4] cxcywh.
    """
    num_pairs, num_queries = logits.shape
    prob = logits.sigmoid()
    matched = torch.zeros_like(logits, dtype=torch.bool)
    matched[indices.pair, indices.query] = True
    soft = torch.zeros_like(logits)
    if len(indices) > 0:
        with torch.no_grad():
            iou, _ = elementwise_iou_and_giou(
                cxcywh_to_xyxy(pred_boxes[indices.pair, indices.query].float()), packed.boxes_xyxy[indices.target]
            )
            t = (prob[indices.pair, indices.query].float() ** alpha * iou ** (1 - alpha)).clamp(min=min_target)
            # A one-to-many query may match several targets: it learns its best one.
            flat = indices.pair * num_queries + indices.query
            soft = soft.flatten().scatter_reduce(0, flat, t.to(soft.dtype), "amax", include_self=False)
            soft = soft.view(num_pairs, num_queries)
    pos = pos_weight * F.binary_cross_entropy_with_logits(logits, soft, reduction="none")
    neg = prob**gamma * F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    punish_neg = packed.exhaustive[:, None] & ~matched
    loss = torch.where(matched, pos, torch.where(punish_neg, neg, torch.zeros_like(neg)))
    loss = loss * packed.has_instance[:, None]
    pad = max(num_queries, pad_num_queries or 0) - num_queries
    denominator = (matched | packed.exhaustive[:, None]).sum() + pad * packed.exhaustive.sum()
    return loss.sum() / denominator.clamp(min=1)


def presence_loss(presence_logit: torch.Tensor, packed: PackedTargets, *, alpha: float) -> torch.Tensor:
    """[P] presence logits -> mean over pairs of alpha_t x BCE(logit, pair has an instance).

    alpha_t is alpha for pairs with instances and 1 - alpha for the others: SAM 3 writes the loss as
    a focal loss with gamma 0 and alpha 0.5, i.e. 0.5 x BCE for every pair.
    """
    target = packed.has_instance.to(presence_logit.dtype)
    bce = F.binary_cross_entropy_with_logits(presence_logit.reshape(-1), target, reduction="none")
    return (alpha * target + (1 - alpha) * (1 - target)).mul(bce).mean() if bce.numel() else _zero(presence_logit)


def box_losses(
    pred_boxes: torch.Tensor, packed: PackedTargets, indices: MatchIndices, *, num_boxes: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 (cxcywh, summed over the 4 coordinates) and 1 - GIoU over matches, each summed / ``num_boxes``.

    Args:
        pred_boxes [P, Q, 4] cxcywh; num_boxes: the normaliser (target boxes per rank, >= 1).
    """
    if len(indices) == 0:
        return _zero(pred_boxes), _zero(pred_boxes)
    src = gather_matched(pred_boxes, indices).float()  # [M, 4]
    tgt = packed.boxes[indices.target]
    l1 = F.l1_loss(src, tgt, reduction="none").sum() / num_boxes
    _, giou = elementwise_iou_and_giou(cxcywh_to_xyxy(src), packed.boxes_xyxy[indices.target])
    return l1, (1 - giou).sum() / num_boxes


def mask_losses(
    pred_masks: torch.Tensor,
    packed: PackedTargets,
    indices: MatchIndices,
    *,
    num_boxes: float,
    alpha: float,
    gamma: float,
    num_points: int | None,
    oversample_ratio: float,
    importance_sample_ratio: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid focal (mean over points) and dice of matched masks, each summed over matches / ``num_boxes``.

    With ``num_points`` set, both are computed on Mask2Former's sampled points; with None, the
    logits are upsampled bilinearly to the targets' full resolution (SAM 3's path without sampling).

    Args:
        pred_masks [P, Q, h, w] logits; targets' masks [n, H, W] bool in each pair.
    """
    if len(indices) == 0:
        return _zero(pred_masks), _zero(pred_masks)
    src = gather_matched(pred_masks, indices).float()  # [M, h, w]; bf16 has no bilinear kernels everywhere
    tgt = packed.gather_masks(indices.pair, indices.target)  # [M, H, W] bool
    if num_points is not None:
        points = uncertain_points(
            src,
            num_points=num_points,
            oversample_ratio=oversample_ratio,
            importance_sample_ratio=importance_sample_ratio,
        )
        tgt_points = sample_binary_masks(tgt, points, src.dtype)  # [M, K]
        src_points = point_sample(src, points)  # [M, K]
    else:
        src_points = F.interpolate(src[:, None], size=tgt.shape[-2:], mode="bilinear", align_corners=False).flatten(1)
        tgt_points = tgt.flatten(1).to(src.dtype)
    focal = sigmoid_focal_loss(src_points, tgt_points, alpha=alpha, gamma=gamma, reduction="none").mean(1).sum() / num_boxes
    dice = dice_loss(src_points, tgt_points).sum() / num_boxes
    return focal, dice


def semantic_targets(packed: PackedTargets, size: tuple[int, int], pairs: torch.Tensor) -> torch.Tensor:
    """Union of each listed pair's instance masks, resized to ``size`` as SAM 3 does: [len(pairs), h, w] float.

    SAM 3 resizes bilinearly and casts to bool, so a low-resolution pixel is foreground when any of
    the four full-resolution pixels it interpolates is (a slight dilation when downsampling).
    """
    union = torch.stack([packed.masks[p].any(0) for p in pairs.tolist()]).float()  # [p, H, W]
    if tuple(union.shape[-2:]) != tuple(size):
        union = F.interpolate(union[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return (union > 0).float()


def semantic_losses(
    semantic_seg: torch.Tensor, packed: PackedTargets, *, alpha: float, gamma: float, full_resolution: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Focal (mean over pixels) and dice of the semantic head, averaged over pairs with instances.

    ``full_resolution``: upsample the logits to the targets (Meta's released configs, downsample=False)
    instead of resizing the targets to the logits (Meta's code default).

    Args:
        semantic_seg [P, 1, h, w] logits.
    """
    pairs = packed.has_instance.nonzero(as_tuple=True)[0]
    if pairs.numel() == 0 or packed.masks is None:
        return _zero(semantic_seg), _zero(semantic_seg)
    src = semantic_seg[pairs].float()  # [p, 1, h, w]
    size = tuple(packed.masks[0].shape[-2:]) if full_resolution else tuple(src.shape[-2:])
    if full_resolution:
        src = F.interpolate(src, size=size, mode="bilinear", align_corners=False)
    src = src.flatten(1)  # [p, h*w]
    tgt = semantic_targets(packed, size, pairs).flatten(1)
    focal = sigmoid_focal_loss(src, tgt, alpha=alpha, gamma=gamma, reduction="none").mean(1).mean()
    return focal, dice_loss(src, tgt).mean()
