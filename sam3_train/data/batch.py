"""The training batch: images encoded once, (image, phrase) pairs gathered from them.

A batch holds ``B`` images and ``P`` (image, phrase) pairs. Everything after the vision encoder runs
per pair; ``pair_image`` says which image each pair reads.

Fields (shapes):
    images          [B, 3, S, S]  float, normalised, padded to the model's square size
    image_sizes     [B, 2]        long, (h, w) of the image content before padding, in pixels of ``images``
    pair_image      [P]           long, image index of each pair
    input_ids       [P, L]        long, CLIP BPE tokens (L = 32 for SAM 3)
    attention_mask  [P, L]        long, 1 for real tokens
    exemplar_boxes  [P, E, 4]     float, normalised cxcywh (E may be 0)
    exemplar_labels [P, E]        long, 1 positive, 0 negative, -1 padding
    targets         P dicts       boxes [n, 4] normalised cxcywh, masks [n, H, W] bool, exhaustive bool
    phrases         P strings     the noun phrases, for logs and predictions
    keys            B strings     sample keys, to name bad batches in logs
    image_ids       B values      each sample's json ``image_id`` (COCO ids for converted COCO data; optional)
    original_sizes  [B, 2]        long, (H, W) of each image as decoded, before any resize (optional)
    sources         B strings     the weighted training source each image came from (data/mixing.py;
                                  empty without named sources)
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

Target = dict[str, torch.Tensor | bool]


@dataclass
class Batch:
    images: torch.Tensor
    image_sizes: torch.Tensor
    pair_image: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    exemplar_boxes: torch.Tensor | None = None
    exemplar_labels: torch.Tensor | None = None
    targets: list[Target] = field(default_factory=list)
    phrases: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    image_ids: list[str | int] = field(default_factory=list)
    original_sizes: torch.Tensor | None = None
    sources: list[str] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return self.images.shape[0]

    @property
    def num_pairs(self) -> int:
        return self.pair_image.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor (targets included) on ``device``."""

        def move(value):
            if isinstance(value, torch.Tensor):
                return value.to(device, non_blocking=non_blocking)
            if isinstance(value, dict):
                return {k: move(v) for k, v in value.items()}
            if isinstance(value, list):
                return [move(v) for v in value]
            return value

        return Batch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})
