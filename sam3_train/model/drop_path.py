"""Stochastic depth (drop path) in the ViT, as Meta trains SAM 3 (``drop_path_rate=0.1``).

transformers' ``Sam3ViTLayer`` has no drop path. ``set_vit_drop_path`` gives each ViT block one:
the rate grows linearly from 0 at the first block to ``rate`` at the last (Meta's
``torch.linspace(0, drop_path_rate, depth)``), and whole samples' residual branches are dropped
(``torchvision.ops.StochasticDepth``, mode "row") in training only. No parameter is added, so
checkpoints are unchanged; at rate 0 a block is transformers' own.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import StochasticDepth
from transformers.models.sam3.modeling_sam3 import Sam3ViTLayer, window_partition, window_unpartition


class Sam3ViTLayerWithDropPath(Sam3ViTLayer):
    """``Sam3ViTLayer.forward`` with ``drop_path`` on both residual branches (attention, MLP).

    Written out because the drop must act on whole images after the window un-partition, between the
    branch and its residual add, which transformers' forward does in one expression.
    """

    drop_path: nn.Module

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:  # [B, H, W, C]
        residual = hidden_states
        hidden_states = self.layer_norm1(hidden_states)
        if self.window_size > 0:
            height, width = hidden_states.shape[1], hidden_states.shape[2]
            hidden_states, pad_height_width = window_partition(hidden_states, self.window_size)
        position_embeddings = self.rotary_emb(hidden_states, self.position_ids)
        hidden_states, _ = self.attention(hidden_states, position_embeddings, **kwargs)
        if self.window_size > 0:
            hidden_states = window_unpartition(hidden_states, self.window_size, pad_height_width, (height, width))
        hidden_states = residual + self.drop_path(hidden_states)
        residual = hidden_states
        hidden_states = self.mlp(self.layer_norm2(hidden_states))
        return residual + self.dropout(self.drop_path(hidden_states))


def set_vit_drop_path(layers: nn.ModuleList, rate: float) -> None:
    """Drop path on ``layers`` (the ViT blocks), linearly from 0 to ``rate``; 0 restores plain blocks."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path must be in [0, 1), got {rate}")
    depth = len(layers)
    rates = torch.linspace(0, rate, depth).tolist() if depth > 1 else [rate]
    for layer, p in zip(layers, rates):
        if p > 0:
            layer.__class__ = Sam3ViTLayerWithDropPath  # same state, forward with drop path
            layer.drop_path = StochasticDepth(p, mode="row")
        elif isinstance(layer, Sam3ViTLayerWithDropPath):
            layer.__class__ = Sam3ViTLayer
            del layer.drop_path
