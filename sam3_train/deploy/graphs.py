"""The detector as three graphs, the split serving needs (design.md, "A batch"):

- ``vision``: once per image. ``images [N, 3, S, S]`` -> ``level_i [N, C, h_i, w_i]`` (the FPN levels
  the detector reads, finest first) and ``pos_i`` (their position encodings, the same shapes);
- ``text``: once per phrase (a fixed vocabulary can be encoded once and cached).
  ``input_ids, attention_mask [T, 32]`` int64 -> ``text [T, 32, C]`` (projected CLIP states);
- ``detector``: per (image, phrase) pair. ``level_i, pos_i [P, ...]`` (rows of the vision outputs),
  ``text [P, 32, C]``, ``text_mask [P, 32]`` bool, ``exemplar_boxes [P, E, 4]`` normalised cxcywh,
  ``exemplar_labels [P, E]`` int64 (1 positive, 0 negative, -1 padding; E may be 0) ->
  ``pred_logits [P, Q]``, ``pred_boxes [P, Q, 4]``, ``pred_masks [P, Q, h, w]``, ``presence_logit [P]``,
  ``semantic_seg [P, 1, h, w]``: the detector's eval outputs (its final layer, one-to-one queries).

N, T, P and E are dynamic axes. Each module wraps the detector's own methods, so the graphs compute
what ``Sam3Detector.forward`` computes in eval mode.
"""

from __future__ import annotations

import torch
from torch.export import Dim

from sam3_train.model import Sam3Detector

OUTPUTS = ("pred_logits", "pred_boxes", "pred_masks", "presence_logit", "semantic_seg")


def num_levels(detector: Sam3Detector) -> int:
    """FPN levels the detector reads: the neck's scales minus the dropped 0.5x level."""
    return len(detector.config.vision_config.scale_factors) - 1


def level_names(levels: int) -> list[str]:
    return [f"level_{i}" for i in range(levels)] + [f"pos_{i}" for i in range(levels)]


class VisionGraph(torch.nn.Module):
    """images [N, 3, S, S] -> (level_0 .. level_{k-1}, pos_0 .. pos_{k-1}), each [N, C, h_i, w_i]."""

    def __init__(self, detector: Sam3Detector):
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        vision = self.detector.vision_encoder(images)
        # As Sam3Detector.forward: the 0.5x FPN level is dropped.
        pos = [p.expand(images.shape[0], -1, -1, -1) for p in vision.fpn_position_encoding[:-1]]
        return (*vision.fpn_hidden_states[:-1], *pos)


class TextGraph(torch.nn.Module):
    """input_ids, attention_mask [T, L] -> text [T, L, C]: ``Sam3Detector.encode_text`` without its
    de-duplication (the runtime encodes each distinct phrase once itself)."""

    def __init__(self, detector: Sam3Detector):
        super().__init__()
        self.detector = detector

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.detector.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                            return_dict=True).last_hidden_state
        return self.detector.text_projection(hidden)


class PairGraph(torch.nn.Module):
    """Per pair: ``Sam3Detector.detect`` in eval mode, its outputs as a tuple in ``OUTPUTS`` order."""

    def __init__(self, detector: Sam3Detector):
        super().__init__()
        self.detector = detector
        self.levels = num_levels(detector)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        k = self.levels
        levels, pos = list(inputs[:k]), list(inputs[k : 2 * k])
        text, text_mask, boxes, labels = inputs[2 * k :]
        out = self.detector.detect(levels, pos, text, text_mask, boxes, labels)
        return tuple(out[name] for name in OUTPUTS)


def example_inputs(detector: Sam3Detector) -> dict[str, tuple[tuple[torch.Tensor, ...], list[str], tuple]]:
    """Per graph: example inputs, input names and torch.export dynamic shapes.

    The example sizes (3 images, 2 phrases, 3 pairs, 2 boxes) are distinct and above 1 on purpose:
    torch.export specialises a dimension whose example size is 0 or 1.
    """
    side = detector.image_size
    images = torch.randn(3, 3, side, side)
    with torch.no_grad():
        vision = VisionGraph(detector)(images)
    length = detector.tokenizer.context_length
    ids = torch.randint(0, 1000, (2, length))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, length // 2 :] = 0
    with torch.no_grad():
        text = TextGraph(detector)(ids, mask)
    text = torch.cat([text, text[:1]])  # 3 pairs
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.1]]).expand(3, 2, 4).contiguous()
    labels = torch.tensor([[1, 0], [1, -1], [-1, -1]])
    images_dim, phrases_dim, pairs_dim = Dim("images", min=1), Dim("phrases", min=1), Dim("pairs", min=1)
    boxes_dim = Dim("exemplars", min=0)
    k = num_levels(detector)
    pair_inputs = (*vision, text, torch.cat([mask, mask[:1]]).bool(), boxes, labels)
    pair_shapes = (*[{0: pairs_dim}] * (2 * k), {0: pairs_dim}, {0: pairs_dim}, {0: pairs_dim, 1: boxes_dim},
                   {0: pairs_dim, 1: boxes_dim})
    return {
        "vision": ((images,), ["images"], ({0: images_dim},)),
        "text": ((ids, mask), ["input_ids", "attention_mask"], ({0: phrases_dim}, {0: phrases_dim})),
        # PairGraph.forward(*inputs): torch.export sees the varargs as one tuple argument
        "detector": (pair_inputs, [*level_names(k), "text", "text_mask", "exemplar_boxes", "exemplar_labels"],
                     (pair_shapes,)),
    }


def output_names(graph: str, levels: int) -> list[str]:
    return {"vision": level_names(levels), "text": ["text"], "detector": list(OUTPUTS)}[graph]


def graph_module(graph: str, detector: Sam3Detector) -> torch.nn.Module:
    return {"vision": VisionGraph, "text": TextGraph, "detector": PairGraph}[graph](detector)
