"""The learned verifiers' net: the same small CNN for mask verification (MV) and exhaustivity
verification (EV), their inputs as features.py builds them.

    net = VerifierNet(in_channels=CHANNELS["mask"], num_stats=NUM_STATS["mask"])
    logits = net(pixels, stats, tokens)     # [N, 4, 32, 32] uint8, [N, 9] float, [N, 8] int64 -> [N]

A 3-layer CNN over the pixels (MV: the image crop around the mask and the mask; EV: the whole image,
the union of the set and the union of what the detector proposed outside it), its pooled features
scaled by the phrase's embedding (FiLM: "red" must change which pixels matter), then an MLP over
[features, phrase embedding, statistics] -> one logit. About 27 k parameters (16 k of them the
phrase-word table): a CPU trains one in seconds to a minute.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from sam3_train.engine.learned.features import MASK_STATS, SET_STATS

Kind = Literal["mask", "exhaustivity"]
CHANNELS = {"mask": 4, "exhaustivity": 5}  # RGB + the mask (MV); RGB + the set + the rest (EV)
NUM_STATS = {"mask": len(MASK_STATS), "exhaustivity": len(SET_STATS)}


class VerifierNet(nn.Module):
    """pixels [N, C, S, S] uint8, stats [N, k] float, phrase tokens [N, PHRASE_WORDS] int64 -> logits [N].

    Args:
        in_channels: 4 (MV) or 5 (EV); the first three are RGB.
        num_stats: statistics per row.
        width: channels of the last conv layer (the first two have width / 4 and width / 2).
        phrase_buckets: rows of the phrase-word embedding table (row 0: padding).
        phrase_dim: size of a phrase's embedding.
    """

    def __init__(self, *, in_channels: int, num_stats: int, width: int = 32, phrase_buckets: int = 1024,
                 phrase_dim: int = 16):
        super().__init__()
        self.phrase_buckets = phrase_buckets
        c1, c2 = max(width // 4, 4), max(width // 2, 8)
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c2, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (N, width)
        self.words = nn.Embedding(phrase_buckets, phrase_dim, padding_idx=0)
        self.film = nn.Linear(phrase_dim, width)
        self.head = nn.Sequential(nn.Linear(width + phrase_dim + num_stats, 2 * width), nn.ReLU(),
                                  nn.Linear(2 * width, 1))

    def forward(self, pixels: torch.Tensor, stats: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        x = pixels.float() / 255.0
        x = torch.cat([x[:, :3] - 0.5, x[:, 3:]], dim=1)  # RGB centred, masks in [0, 1]
        ids = torch.where(tokens >= 0, tokens % (self.phrase_buckets - 1) + 1, torch.zeros_like(tokens))
        words = self.words(ids)  # (N, L, D); padding rows are 0
        phrase = words.sum(1) / (ids > 0).sum(1, keepdim=True).clamp(min=1)  # (N, D) mean over words
        features = self.encoder(x) * (1 + self.film(phrase))  # (N, width)
        return self.head(torch.cat([features, phrase, stats.float()], dim=1)).squeeze(1)
