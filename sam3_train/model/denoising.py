"""Denoising queries (DN-DETR, with DINO's contrastive negatives): a training-only departure from
SAM 3's recipe for models trained from scratch.

A DETR learns *where* objects are only through its matched queries, whose assignment changes from
step to step while their boxes are still far from any object; on the shapes data a from-scratch
model learns the masks (a dot product with per-pixel features) long before any box overlaps its
target (docs/training_shapes.md). Denoising queries give the box path a stable lesson: queries whose
reference boxes are noised copies of the ground-truth boxes, each assigned to the box it came from,
so the decoder learns "refine a box near an object onto it" from the first step.

How they enter SAM 3's decoder (:func:`sam3_train.model.decoder.run_decoder`): they are appended
after the one-to-many half and, like it, skip the decoder's self-attention (DAC-DETR's rule), so the
one-to-one queries and the presence token never see them and no attention mask is needed; they share
text and image cross-attention, FFN, box head and scoring. No weight is added: a denoising query's
content is the learned embedding of a one-to-one query drawn at random, so the checkpoint stays
``transformers.Sam3Model``'s. Eval never makes them.

Noise (DINO): each corner of a target's xyxy box moves by ``u x noise x (w/2 or h/2)`` with a random
sign; positives draw ``u`` in [0, 1), contrastive negatives in [1, 2) and have no target (their
class is pushed to 0 where the pair is exhaustive). Layout per pair: ``groups`` groups, each with a
positive (and a negative) for slots 0..T-1, T the most targets of any pair in the batch; slot t
noises target ``t mod n`` of its pair, so no slot is padding. Pairs without targets get boxes drawn
uniformly and contribute no loss (SAM 3's class loss skips them; the presence loss covers them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from sam3_train.box_ops import cxcywh_to_xyxy, xyxy_to_cxcywh
from sam3_train.losses.matcher import MatchIndices
from sam3_train.losses.targets import PackedTargets


@dataclass(frozen=True)
class DenoisingSettings:
    """``model.denoising`` in a config: ``{groups: 2, box_noise: 1.0, negatives: true}``.

    groups: noised copies of every target box (each with a negative when ``negatives``).
    box_noise: DINO's box noise scale (lambda): corners move up to ``box_noise`` half-sides (positives).
    negatives: add DINO's contrastive negatives (noise between 1 and 2 x ``box_noise``).
    """

    groups: int = 2
    box_noise: float = 1.0
    negatives: bool = True

    def __post_init__(self) -> None:
        if self.groups < 1:
            raise ValueError(f"model.denoising.groups must be at least 1, got {self.groups}")
        if not self.box_noise > 0:
            raise ValueError(f"model.denoising.box_noise must be positive, got {self.box_noise}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DenoisingQueries:
    """One batch's denoising queries.

    reference [P, D, 4]  normalised cxcywh reference boxes (the noised targets)
    query_ids [D]        long: which learned query embedding each slot's content copies
    indices              the assignment: (pair, slot in 0..D-1, packed target) of every positive slot
    """

    reference: torch.Tensor
    query_ids: torch.Tensor
    indices: MatchIndices

    @property
    def num_queries(self) -> int:
        return self.reference.shape[1]


def noise_boxes(boxes: torch.Tensor, scale: torch.Tensor, box_noise: float) -> torch.Tensor:
    """Move each xyxy corner of ``boxes`` [..., 4] (cxcywh) by ``scale`` [..., 4] (signed) x
    ``box_noise`` x its half side; clip to the image and keep a positive size. Returns cxcywh."""
    half = boxes[..., 2:].repeat(*([1] * (boxes.dim() - 1)), 2) / 2  # (w/2, h/2, w/2, h/2)
    xyxy = (cxcywh_to_xyxy(boxes) + scale * box_noise * half).clamp(0.0, 1.0)
    minimum = 1e-3
    x0, y0 = torch.minimum(xyxy[..., 0], xyxy[..., 2]), torch.minimum(xyxy[..., 1], xyxy[..., 3])
    x1, y1 = torch.maximum(xyxy[..., 0], xyxy[..., 2]), torch.maximum(xyxy[..., 1], xyxy[..., 3])
    x1, y1 = torch.maximum(x1, x0 + minimum), torch.maximum(y1, y0 + minimum)
    return xyxy_to_cxcywh(torch.stack([x0, y0, x1, y1], dim=-1)).clamp(minimum, 1.0 - minimum)


def make_denoising_queries(
    packed: PackedTargets, settings: DenoisingSettings, *, num_learned_queries: int, generator: torch.Generator | None = None
) -> DenoisingQueries:
    """Noised copies of every pair's target boxes and their assignment (see the module docstring)."""
    device = packed.boxes.device
    num_pairs = packed.num_pairs
    slots = max(int(packed.num_boxes.max()) if num_pairs else 0, 1)
    kinds = 2 if settings.negatives else 1
    per_group = kinds * slots
    total = settings.groups * per_group

    n = packed.num_boxes.clamp(min=1)  # [P]
    slot = torch.arange(slots, device=device)
    local = slot[None, :] % n[:, None]  # [P, T]: the target each slot noises
    packed_index = (packed.offsets[:, None] + local).clamp(max=max(packed.boxes.shape[0] - 1, 0))
    if packed.boxes.shape[0]:
        source = packed.boxes[packed_index]  # [P, T, 4]
    else:
        source = torch.zeros(num_pairs, slots, 4, device=device)
    source = source.unsqueeze(1).expand(num_pairs, settings.groups * kinds, slots, 4)  # [P, G*K, T, 4]

    rand = lambda *shape: torch.rand(*shape, device=device, generator=generator)  # noqa: E731
    magnitude = rand(num_pairs, settings.groups * kinds, slots, 4)
    if settings.negatives:
        magnitude[:, 1::2] += 1.0  # every group: positives, then negatives
    sign = torch.where(rand(num_pairs, settings.groups * kinds, slots, 4) < 0.5, -1.0, 1.0)
    reference = noise_boxes(source, sign * magnitude, settings.box_noise)
    empty = ~packed.has_instance
    if bool(empty.any()):  # no target to noise: boxes drawn uniformly (no loss reads them)
        centre, size = rand(num_pairs, settings.groups * kinds, slots, 2), rand(num_pairs, settings.groups * kinds, slots, 2)
        uniform = torch.cat([centre, 0.05 + 0.45 * size], dim=-1).clamp(1e-3, 1 - 1e-3)
        reference = torch.where(empty[:, None, None, None], uniform, reference)
    reference = reference.reshape(num_pairs, total, 4)

    positive = torch.zeros(settings.groups * kinds, slots, dtype=torch.bool, device=device)
    positive[0::kinds] = True
    positive = positive.flatten()  # [D]
    pair, query = torch.nonzero(packed.has_instance[:, None] & positive[None, :], as_tuple=True)
    target = packed_index.repeat(1, settings.groups * kinds)[pair, query]
    query_ids = torch.randint(num_learned_queries, (total,), device=device, generator=generator)
    return DenoisingQueries(reference, query_ids, MatchIndices(pair, query, target))
