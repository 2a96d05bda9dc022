"""Gradients of the detector equal transformers' Sam3Model's: the decoder's "look forward twice" box
refinement (a layer's box loss also trains the layer before), masks, scores and presence."""

from __future__ import annotations

import pytest
import torch
from transformers import Sam3Model

from sam3_train.box_ops import cxcywh_to_xyxy
from sam3_train.data import Batch
from sam3_train.model import build_detector

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # ~30 s: two backward passes


def _batch(det, phrases: list[str]) -> Batch:
    g = torch.Generator().manual_seed(3)
    side = det.image_size
    input_ids, attention_mask = det.tokenize(phrases)
    return Batch(images=torch.randn(1, 3, side, side, generator=g), image_sizes=torch.tensor([[side, side]]),
                 pair_image=torch.zeros(len(phrases), dtype=torch.long), input_ids=input_ids,
                 attention_mask=attention_mask, phrases=phrases)


def _loss(logits, boxes_xyxy, presence, masks, semantic, weights):
    # Fixed random weights per output element: every element's gradient matters, not only the sum's.
    w_logits, w_boxes, w_presence, w_masks, w_semantic = weights
    return ((logits * w_logits).sum() + (boxes_xyxy * w_boxes).sum() + (presence * w_presence).sum()
            + (masks * w_masks).mean() + (semantic * w_semantic).mean())


def test_gradients_equal_transformers_including_the_box_look_forward():
    torch.manual_seed(0)
    ours = build_detector("tiny", dropout=0.0, encode_empty_geometry=False).eval()  # transformers' prompt mode
    hf = Sam3Model(ours.config).eval()
    hf.load_state_dict(ours.state_dict(), strict=True)
    batch = _batch(ours, ["red star", "blue circle"])

    out = ours(batch)
    ref = hf(pixel_values=batch.images[batch.pair_image], input_ids=batch.input_ids,
             attention_mask=batch.attention_mask)
    g = torch.Generator().manual_seed(4)
    weights = [torch.randn(t.shape, generator=g) for t in
               (out["pred_logits"], out["pred_boxes"], out["presence_logit"], out["pred_masks"], out["semantic_seg"])]
    _loss(out["pred_logits"], cxcywh_to_xyxy(out["pred_boxes"]), out["presence_logit"], out["pred_masks"],
          out["semantic_seg"], weights).backward()
    _loss(ref.pred_logits, ref.pred_boxes, ref.presence_logits.squeeze(-1), ref.pred_masks, ref.semantic_seg,
          weights).backward()

    hf_params = dict(hf.named_parameters())
    # Gradients that are zero in exact arithmetic (attention key biases: softmax is shift-invariant)
    # come out as float noise in both: an absolute floor far below every real gradient.
    floor = 1e-6 * max(p.grad.abs().max() for p in hf.parameters() if p.grad is not None)
    compared = 0
    for name, param in ours.named_parameters():
        theirs = hf_params[name].grad
        if param.grad is None or theirs is None:
            assert param.grad is None and (theirs is None or not theirs.any()), name
            continue
        torch.testing.assert_close(param.grad, theirs, rtol=1e-4, atol=max(floor, 1e-4 * theirs.abs().max()),
                                   msg=lambda m: f"{name}: {m}")
        compared += 1
    assert compared > 100
    # The final layer's box loss reaches the previous decoder layer through its box (not only through
    # the query states): the box head's gradient is not what a detached refinement gives.
    second_last = dict(ours.detr_decoder.layers[-2].named_parameters())
    assert all(p.grad is not None and p.grad.any() for p in second_last.values())
