"""SAM 3's training objective: match, compute named unweighted terms, weight them in one place.

    criterion = Sam3Criterion()                     # SAM 3 defaults (segmentation fine-tuning)
    terms = criterion(outputs, batch.targets)       # {"loss_align": ..., "loss_bbox_aux0_o2m": ...}
    loss = criterion.weighted_total(terms, num_pairs=batch.num_pairs)

Term names: ``loss_<term>`` for the final layer's one-to-one queries, ``_aux{i}`` for decoder layer i
of ``outputs["aux_outputs"]``, then ``_o2m`` for the one-to-many half and ``_dn`` for denoising
queries (their assignment is given, not matched; sam3_train/model/denoising.py). Terms:

    align, presence, bbox, giou        every layer (presence: one-to-one only; dn: no presence)
    mask, dice                         final layer, both halves (when pred_masks are given)
    semantic, semantic_dice            once (when semantic_seg is given)

Outputs (training mode; any mask key may be missing for box-only models):
    pred_logits [P, Q], pred_boxes [P, Q, 4] cxcywh, pred_masks [P, Q, h, w], presence_logit [P],
    semantic_seg [P, 1, h, w], aux_outputs: [{pred_logits, pred_boxes, presence_logit}],
    o2m: {pred_logits, pred_boxes, pred_masks, aux_outputs: [{pred_logits, pred_boxes}]}
    dn: {pred_logits, pred_boxes, indices: MatchIndices, aux_outputs: [{pred_logits, pred_boxes}]}
"""

from __future__ import annotations

import math
import re

import torch
from torch import distributed as dist
from torch import nn

from sam3_train.losses import terms as T
from sam3_train.losses.matcher import HungarianMatcher, MatchIndices, OneToManyMatcher
from sam3_train.losses.targets import PackedTargets, as_packed

_KEY = re.compile(r"^loss_(?P<term>[a-z_]+?)(?P<aux>_aux\d+)?(?P<half>_o2m|_dn)?$")


def num_boxes_across_ranks(packed: PackedTargets) -> float:
    """Target boxes on this rank, averaged over DDP ranks (all-reduced sum / world size), at least 1.

    DETR's normaliser: every rank divides by the same number, so the gradient average across ranks
    weights every box alike. Without an initialised process group it is the local count.
    """
    return mean_count_across_ranks(packed.num_boxes.sum())


def mean_count_across_ranks(count: torch.Tensor) -> float:
    """A count on this rank (a 0-d tensor), averaged over DDP ranks, at least 1."""
    count = count.to(torch.float32)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return max(float(count), 1.0)


class Sam3Criterion(nn.Module):
    """Computes SAM 3's loss terms (unweighted) and, in ``weighted_total``, their weighted sum.

    Defaults are SAM 3's objective as DESIGN.md states it (matcher costs, o2m matcher, align loss,
    presence, box and mask weights); setting a weight to 0 skips its term. ``use_masks=False`` and
    ``use_semantic=False`` switch those terms off for box-only data. Meta's released roboflow
    fine-tuning config computes the mask loss at full resolution (``num_points=None`` here); point
    sampling is on by default so memory does not grow with the 1008 px targets.
    """

    def __init__(
        self,
        *,
        matcher: HungarianMatcher | None = None,
        o2m_matcher: OneToManyMatcher | None = None,
        weight_align: float = 20.0,
        weight_presence: float = 20.0,
        weight_bbox: float = 5.0,
        weight_giou: float = 2.0,
        weight_mask: float = 200.0,
        weight_dice: float = 10.0,
        weight_semantic: float = 20.0,
        weight_semantic_dice: float = 30.0,
        o2m_weight: float = 2.0,
        dn_weight: float = 1.0,
        use_masks: bool = True,
        use_semantic: bool = True,
        aux_loss: bool = True,
        o2m_matcher_on_aux: bool = False,  # SAM 3: earlier layers' o2m halves use the one-to-one matcher
        scale_by_sqrt_pairs: bool = True,
        align_pos_weight: float = 10.0,
        align_alpha: float = 0.25,  # t = p^alpha x IoU^(1 - alpha)
        align_gamma: float = 2.0,  # unmatched cells weighted by p^gamma
        align_min_target: float = 0.01,  # floor of a matched cell's soft target (SAM 3's clamp)
        pad_num_queries: int | None = 200,  # mean over 200 queries even when a test model has fewer
        presence_alpha: float = 0.5,
        mask_focal_alpha: float = 0.25,
        mask_focal_gamma: float = 2.0,
        num_points: int | None = 12544,  # Mask2Former's 112 x 112; None: full-resolution mask loss
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        semantic_focal_alpha: float = 0.6,
        semantic_focal_gamma: float = 2.0,  # Meta's released configs (its SemanticSegCriterion class default is 1.6)
        semantic_full_resolution: bool = False,  # True: logits upsampled to the targets, not targets down
    ) -> None:
        super().__init__()
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.o2m_matcher = o2m_matcher if o2m_matcher is not None else OneToManyMatcher()
        self.weights = {
            "align": weight_align,
            "presence": weight_presence,
            "bbox": weight_bbox,
            "giou": weight_giou,
            "mask": weight_mask if use_masks else 0.0,
            "dice": weight_dice if use_masks else 0.0,
            "semantic": weight_semantic if use_semantic else 0.0,
            "semantic_dice": weight_semantic_dice if use_semantic else 0.0,
        }
        self.o2m_weight = o2m_weight
        self.dn_weight = dn_weight
        self.aux_loss = aux_loss
        self.o2m_matcher_on_aux = o2m_matcher_on_aux
        self.scale_by_sqrt_pairs = scale_by_sqrt_pairs
        self.align_kwargs = dict(
            pos_weight=align_pos_weight, alpha=align_alpha, gamma=align_gamma, pad_num_queries=pad_num_queries,
            min_target=align_min_target,
        )
        self.presence_alpha = presence_alpha
        self.mask_kwargs = dict(
            alpha=mask_focal_alpha,
            gamma=mask_focal_gamma,
            num_points=num_points,
            oversample_ratio=oversample_ratio,
            importance_sample_ratio=importance_sample_ratio,
        )
        self.semantic_kwargs = dict(
            alpha=semantic_focal_alpha, gamma=semantic_focal_gamma, full_resolution=semantic_full_resolution
        )

    def _on(self, *names: str) -> bool:
        return any(self.weights[n] != 0 for n in names)

    @property
    def needs_masks(self) -> bool:
        """Whether any term reads the predicted instance masks or semantic map."""
        return self._on("mask", "dice", "semantic", "semantic_dice")

    def _layer_terms(
        self,
        out: dict[str, torch.Tensor],
        packed: PackedTargets,
        indices: MatchIndices,
        num_boxes: float,
        *,
        with_masks: bool,
    ) -> dict[str, torch.Tensor]:
        """Terms of one decoder layer's half (no suffixes yet)."""
        terms: dict[str, torch.Tensor] = {}
        if self._on("align"):
            terms["align"] = T.align_loss(out["pred_logits"], out["pred_boxes"], packed, indices, **self.align_kwargs)
        if self._on("presence") and "presence_logit" in out:
            terms["presence"] = T.presence_loss(out["presence_logit"], packed, alpha=self.presence_alpha)
        if self._on("bbox", "giou"):
            terms["bbox"], terms["giou"] = T.box_losses(out["pred_boxes"], packed, indices, num_boxes=num_boxes)
        if with_masks and self._on("mask", "dice") and "pred_masks" in out and packed.masks is not None:
            terms["mask"], terms["dice"] = T.mask_losses(
                out["pred_masks"], packed, indices, num_boxes=num_boxes, **self.mask_kwargs
            )
        return terms

    def forward(self, outputs: dict, targets: list[dict] | PackedTargets) -> dict[str, torch.Tensor]:
        """Unweighted terms ``{"loss_<term>[_aux{i}][_o2m]": scalar}`` (see the module docstring for keys)."""
        device = outputs["pred_logits"].device
        packed = as_packed(targets, device)
        num_boxes = num_boxes_across_ranks(packed)

        o2m = outputs.get("o2m")
        aux = outputs.get("aux_outputs", []) if self.aux_loss else []
        o2m_aux = (o2m or {}).get("aux_outputs", []) if self.aux_loss else []
        # (suffix, layer output, matcher, is final layer)
        layers: list[tuple[str, dict, nn.Module, bool]] = [("", outputs, self.matcher, True)]
        layers += [(f"_aux{i}", a, self.matcher, False) for i, a in enumerate(aux)]
        if o2m is not None:
            layers.append(("_o2m", o2m, self.o2m_matcher, True))
            aux_matcher = self.o2m_matcher if self.o2m_matcher_on_aux else self.matcher
            layers += [(f"_aux{i}_o2m", a, aux_matcher, False) for i, a in enumerate(o2m_aux)]

        losses: dict[str, torch.Tensor] = {}
        for suffix, out, matcher, final in layers:
            indices = matcher(out, packed)
            for name, value in self._layer_terms(out, packed, indices, num_boxes, with_masks=final).items():
                losses[f"loss_{name}{suffix}"] = value

        dn = outputs.get("dn")
        if dn is not None:  # denoising queries: the assignment is given; boxes normalised per positive query
            indices = dn["indices"]
            num_positive = mean_count_across_ranks(torch.tensor(len(indices), device=device))
            dn_layers = [("", dn)] + ([(f"_aux{i}", a) for i, a in enumerate(dn.get("aux_outputs", []))]
                                      if self.aux_loss else [])
            for suffix, out in dn_layers:
                for name, value in self._layer_terms(out, packed, indices, num_positive, with_masks=False).items():
                    losses[f"loss_{name}{suffix}_dn"] = value

        if self._on("semantic", "semantic_dice") and "semantic_seg" in outputs and packed.masks is not None:
            sem, sem_dice = T.semantic_losses(outputs["semantic_seg"], packed, **self.semantic_kwargs)
            losses["loss_semantic"], losses["loss_semantic_dice"] = sem, sem_dice
        return losses

    def weight_of(self, key: str) -> float:
        """The weight ``weighted_total`` gives the term ``key`` (the o2m weight included)."""
        match = _KEY.match(key)
        if match is None or match["term"] not in self.weights:
            raise KeyError(f"Sam3Criterion: unknown loss term {key!r}; expected loss_<term>[_aux<i>][_o2m|_dn]")
        weight = self.weights[match["term"]]
        half = {"_o2m": self.o2m_weight, "_dn": self.dn_weight, None: 1.0}[match["half"]]
        return weight * half

    def weighted_total(self, terms: dict[str, torch.Tensor], *, num_pairs: int) -> torch.Tensor:
        """sum(weight x term), times sqrt(num_pairs) when ``scale_by_sqrt_pairs`` (SAM 3's batch scaling)."""
        total = sum(self.weight_of(k) * v for k, v in terms.items() if self.weight_of(k) != 0)
        if not isinstance(total, torch.Tensor):
            raise ValueError("Sam3Criterion.weighted_total: no weighted term to sum (all weights are 0?)")
        return total * math.sqrt(num_pairs) if self.scale_by_sqrt_pairs else total
