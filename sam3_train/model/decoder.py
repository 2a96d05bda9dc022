"""SAM 3's DETR decoder loop with every layer's outputs and DAC dual supervision.

transformers' ``Sam3DetrDecoder.forward`` runs the one-to-one queries only. Training needs the
DAC-DETR variant SAM 3 uses: the queries and their reference boxes are duplicated; the first half
(one-to-one) and the presence token go through self-attention, the second half (one-to-many) skips
it but still passes that block's LayerNorm; text and image cross-attention, FFN, box head and scoring
are shared. No extra weights. This module drives the decoder's own sub-modules to do that.

Shapes: P pairs, Q queries per half, C channels, N = H * W image tokens, L prompt tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.sam3.modeling_sam3 import Sam3DetrDecoder, Sam3DetrDecoderLayer, inverse_sigmoid

from sam3_train.model.denoising import DenoisingQueries


@dataclass
class DecoderStates:
    hidden: torch.Tensor  # [layers, P, copies * Q, C] normalised query states
    boxes: torch.Tensor  # [layers, P, copies * Q, 4] normalised cxcywh per layer
    presence_logits: torch.Tensor  # [layers, P] (one-to-one half only)


def _layer_with_dac(
    layer: Sam3DetrDecoderLayer,
    hidden: torch.Tensor,  # [P, 1 + 2Q, C]: presence token, one-to-one half, one-to-many half
    query_pos: torch.Tensor,  # [P, 2Q, C]
    text_features: torch.Tensor,
    vision_features: torch.Tensor,
    vision_pos: torch.Tensor,
    text_mask: torch.Tensor | None,
    vision_mask: torch.Tensor | None,
    num_o2o: int,
) -> torch.Tensor:
    """``Sam3DetrDecoderLayer.forward`` where self-attention sees the presence token and o2o half only."""
    query_pos = F.pad(query_pos, (0, 0, 1, 0))  # the presence token has no position
    head, tail = hidden[:, : 1 + num_o2o], hidden[:, 1 + num_o2o :]
    q = head + query_pos[:, : 1 + num_o2o]
    attn, _ = layer.self_attn(query=q, key=q, value=head, attention_mask=None)
    head = head + layer.self_attn_dropout(attn)
    hidden = layer.self_attn_layer_norm(torch.cat([head, tail], dim=1))

    attn, _ = layer.text_cross_attn(
        query=hidden + query_pos, key=text_features, value=text_features, attention_mask=text_mask
    )
    hidden = layer.text_cross_attn_layer_norm(hidden + layer.text_cross_attn_dropout(attn))

    attn, _ = layer.vision_cross_attn(
        query=hidden + query_pos,
        key=vision_features + vision_pos,
        value=vision_features,
        attention_mask=vision_mask,
    )
    hidden = layer.vision_cross_attn_layer_norm(hidden + layer.vision_cross_attn_dropout(attn))
    return layer.mlp_layer_norm(hidden + layer.mlp_dropout(layer.mlp(hidden)))


def _plain_layer(layer: Sam3DetrDecoderLayer, hidden, query_pos, text, vision, vision_pos, text_mask, vision_mask):
    return layer(hidden, query_pos=query_pos, text_features=text, vision_features=vision,
                 vision_pos_encoding=vision_pos, text_cross_attn_mask=text_mask, vision_cross_attn_mask=vision_mask)


def run_decoder(
    decoder: Sam3DetrDecoder,
    *,
    vision_features: torch.Tensor,  # [P, N, C] DETR encoder output
    vision_pos: torch.Tensor,  # [P, N, C]
    text_features: torch.Tensor,  # [P, L, C] prompt tokens (text, then exemplar boxes)
    text_mask: torch.Tensor | None,  # [P, L] bool, True = real token
    spatial_shape: tuple[int, int],  # (H, W) of the image tokens
    dac: bool,
    activation_checkpointing: bool = False,
    initial_queries: torch.Tensor | None = None,
    denoising: DenoisingQueries | None = None,
) -> DecoderStates:
    """All decoder layers; with ``dac`` the query set is [one-to-one | one-to-many], 2Q queries.

    ``initial_queries`` ([copies * Q, C] or [P, copies * Q, C]) replaces the learned query embeddings,
    duplicated, as the decoder's input; by default they are the learned ones. ``denoising`` appends
    its D queries after them (training only; they skip self-attention as the one-to-many half does,
    see :mod:`sam3_train.model.denoising`): the states then hold copies * Q + D queries.
    """
    num_pairs = vision_features.shape[0]
    copies = 2 if dac else 1
    num_queries = decoder.config.num_queries
    if initial_queries is None:
        initial_queries = decoder.query_embed.weight.repeat(copies, 1)
    queries = initial_queries.expand(num_pairs, -1, -1) if initial_queries.dim() == 2 else initial_queries
    reference = decoder.reference_points.weight.repeat(copies, 1).unsqueeze(0).expand(num_pairs, -1, -1).sigmoid()
    if denoising is not None:
        content = decoder.query_embed.weight.index_select(0, denoising.query_ids)
        queries = torch.cat([queries, content.unsqueeze(0).expand(num_pairs, -1, -1)], dim=1)
        reference = torch.cat([reference, denoising.reference.to(reference.dtype)], dim=1)
    presence = decoder.presence_token.weight.unsqueeze(0).expand(num_pairs, -1, -1)
    hidden = torch.cat([presence, queries], dim=1)  # [P, 1 + copies*Q, C]

    text_attn_mask = None
    if text_mask is not None:
        text_attn_mask = create_bidirectional_mask(
            config=decoder.config, inputs_embeds=hidden, attention_mask=text_mask, encoder_hidden_states=text_features
        )

    states, boxes, presence_logits = [], [], []
    previous = reference  # the box each layer refines, undetached (the learned reference boxes first)
    for layer in decoder.layers:
        query_pos = decoder.ref_point_head(decoder.position_encoding.encode_boxes(reference))
        rpb = decoder._get_rpb_matrix(reference, spatial_shape)  # [P, heads, copies*Q, N]
        vision_mask = F.pad(rpb, (0, 0, 1, 0))  # the presence token attends to every image token alike
        args = (hidden, query_pos, text_features, vision_features, vision_pos, text_attn_mask, vision_mask)
        # partial, not a closure: checkpointing re-runs ``step`` in the backward pass, after the loop moved on.
        # With a one-to-many half or denoising queries, the queries after the one-to-one ones skip self-attention.
        split = dac or denoising is not None
        step = partial(_layer_with_dac, layer, num_o2o=num_queries) if split else partial(_plain_layer, layer)
        hidden = checkpoint(step, *args, use_reentrant=False) if activation_checkpointing else step(*args)

        query_states = decoder.output_layer_norm(hidden[:, 1:])
        delta = decoder.box_head(query_states)
        # "Look forward twice" (DINO; Meta's decoder and transformers' Sam3Model): this layer's output
        # box refines the previous layer's box *with* its gradient, so its loss also trains the layer
        # before; the next layer's input reference is detached. Both boxes have the same value.
        boxes.append((delta + inverse_sigmoid(previous)).sigmoid())
        previous = (delta + inverse_sigmoid(reference)).sigmoid()  # gradient into this layer only
        reference = previous.detach()
        states.append(query_states)
        logit = decoder.presence_head(decoder.presence_layer_norm(hidden[:, :1])).squeeze(-1).squeeze(-1)
        limit = decoder.clamp_presence_logit_max_val
        presence_logits.append(logit.clamp(min=-limit, max=limit))
    return DecoderStates(torch.stack(states), torch.stack(boxes), torch.stack(presence_logits))
