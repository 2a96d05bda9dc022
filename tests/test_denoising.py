"""Denoising queries (DN-DETR / DINO), a training-only departure: the noise, the layout and
assignment, their isolation from SAM 3's own queries, and their loss terms."""

from __future__ import annotations

import json

import pytest
import torch

from sam3_train.box_ops import cxcywh_to_xyxy, elementwise_iou_and_giou
from sam3_train.lit import Sam3LitModule
from sam3_train.losses import Sam3Criterion
from sam3_train.losses.targets import PackedTargets
from sam3_train.model import build_detector
from sam3_train.model.denoising import DenoisingSettings, make_denoising_queries, noise_boxes


def packed(*pairs: list[list[float]]) -> PackedTargets:
    return PackedTargets.from_list([{"boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4)} for b in pairs])


def test_noise_moves_each_corner_by_its_half_side():
    box = torch.tensor([[0.5, 0.5, 0.4, 0.2]])  # xyxy (0.3, 0.4, 0.7, 0.6), half sides (0.2, 0.1)
    scale = torch.tensor([[1.0, -1.0, 0.5, 0.0]])
    # x0 0.3 + 0.2 = 0.5, y0 0.4 - 0.1 = 0.3, x1 0.7 + 0.1 = 0.8, y1 0.6: cxcywh (0.65, 0.45, 0.3, 0.3)
    torch.testing.assert_close(noise_boxes(box, scale, 1.0), torch.tensor([[0.65, 0.45, 0.3, 0.3]]))
    torch.testing.assert_close(noise_boxes(box, scale, 0.0), box)
    # Corners that cross stay a box of positive size inside the image.
    crossed = noise_boxes(box, torch.tensor([[2.0, 0.0, -2.0, 0.0]]), 1.0)
    assert (crossed[:, 2:] > 0).all() and (cxcywh_to_xyxy(crossed) >= 0).all() and (cxcywh_to_xyxy(crossed) <= 1).all()


def test_layout_assignment_and_noise_bands():
    targets = packed([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]], [], [[0.5, 0.5, 0.5, 0.5]])
    settings = DenoisingSettings(groups=3, box_noise=0.4, negatives=True)
    g = torch.Generator().manual_seed(0)
    dn = make_denoising_queries(targets, settings, num_learned_queries=20, generator=g)
    slots = 2  # the most targets of a pair
    assert dn.reference.shape == (3, 3 * 2 * slots, 4) and dn.query_ids.shape == (12,)
    assert int(dn.query_ids.min()) >= 0 and int(dn.query_ids.max()) < 20
    # Positives: every group's first `slots` queries of each pair with targets; none for the empty pair.
    pair, query, target = dn.indices
    assert pair.tolist() == [0] * 6 + [2] * 6
    assert query.tolist() == [0, 1, 4, 5, 8, 9] * 2
    assert target.tolist() == [0, 1] * 3 + [2] * 6  # slot t noises target t mod n of its own pair
    # Positives stay within their noise band of their target (a corner moves < 0.4 half sides), negatives
    # between 0.4 and 0.8 half sides; so every positive overlaps its target more than any negative does.
    iou_pos, _ = elementwise_iou_and_giou(cxcywh_to_xyxy(dn.reference[pair, query]), targets.boxes_xyxy[target])
    negatives = torch.tensor([2, 3, 6, 7, 10, 11])
    neg = dn.reference[0, negatives]
    iou_neg, _ = elementwise_iou_and_giou(cxcywh_to_xyxy(neg), targets.boxes_xyxy[[0, 1] * 3])
    assert iou_pos.min() > 0.4 and iou_neg.max() < iou_pos.min()
    # The same generator state gives the same queries.
    again = make_denoising_queries(targets, settings, num_learned_queries=20, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.reference, dn.reference, atol=0, rtol=0)


def test_settings_refuse_nonsense():
    with pytest.raises(ValueError, match="groups"):
        DenoisingSettings(groups=0)
    with pytest.raises(ValueError, match="box_noise"):
        DenoisingSettings(box_noise=0.0)


def test_denoising_queries_leave_sam3_queries_untouched(shapes_batch):
    """The one-to-one and one-to-many halves, the presence logit and the masks are those of a model
    without denoising: no SAM 3 query attends to a denoising query."""
    torch.manual_seed(0)
    det = build_detector("tiny", dropout=0.0).train()
    with torch.no_grad():
        plain = det(shapes_batch)
        det.denoising = DenoisingSettings(groups=2)
        noised = det(shapes_batch)
    assert "dn" not in plain and "dn" in noised
    for key in ("pred_logits", "pred_boxes", "pred_masks", "presence_logit", "semantic_seg"):
        torch.testing.assert_close(noised[key], plain[key], atol=1e-5, rtol=0)
        torch.testing.assert_close(noised["o2m"].get(key, plain["o2m"].get(key)), plain["o2m"].get(key), atol=1e-5, rtol=0)
    dn = noised["dn"]
    most = max(len(t["boxes"]) for t in shapes_batch.targets)
    assert dn["pred_boxes"].shape == (shapes_batch.num_pairs, 2 * 2 * most, 4)
    assert len(dn["aux_outputs"]) == len(plain["aux_outputs"])
    det.eval()
    with torch.no_grad():
        assert "dn" not in det(shapes_batch)  # eval never makes them


def test_criterion_terms_and_weights_of_denoising_queries():
    targets = packed([[0.3, 0.3, 0.2, 0.2]], [[0.6, 0.6, 0.2, 0.4]])
    dn = make_denoising_queries(targets, DenoisingSettings(groups=2, negatives=False), num_learned_queries=4)
    boxes = dn.reference.clone()
    boxes[dn.indices.pair, dn.indices.query] = targets.boxes[dn.indices.target]  # every positive on its target
    logits = torch.zeros(2, dn.num_queries)
    outputs = {"pred_logits": torch.zeros(2, 4), "pred_boxes": torch.full((2, 4, 4), 0.5),
               "presence_logit": torch.zeros(2),
               "dn": {"pred_logits": logits, "pred_boxes": boxes, "indices": dn.indices,
                      "aux_outputs": [{"pred_logits": logits, "pred_boxes": dn.reference}]}}
    criterion = Sam3Criterion(use_masks=False, use_semantic=False, dn_weight=0.5)
    terms = criterion(outputs, targets)
    assert terms["loss_bbox_dn"] == 0 and terms["loss_giou_dn"] == 0
    assert terms["loss_giou_aux0_dn"] > 0  # the noised references are not on their targets
    assert "loss_presence_dn" not in terms
    assert criterion.weight_of("loss_giou_aux0_dn") == 2.0 * 0.5
    assert criterion.weight_of("loss_giou_o2m") == 2.0 * 2.0


def test_lit_module_trains_denoising_queries(shapes_batch):
    torch.manual_seed(0)
    module = Sam3LitModule(preset="tiny", denoising={"groups": 1, "box_noise": 0.4}, lr=1e-3)
    assert module.hparams["denoising"] == {"groups": 1, "box_noise": 0.4, "negatives": True}
    module.detector.train()
    outputs = module.detector(shapes_batch)
    terms = module.criterion(outputs, shapes_batch.targets)
    assert {"loss_bbox_dn", "loss_giou_dn", "loss_align_dn", "loss_giou_aux0_dn"} <= set(terms)
    terms["loss_giou_dn"].backward()
    assert module.detector.detr_decoder.box_head.layer3.weight.grad.abs().sum() > 0


def test_box_refinement_probe_runs(shapes_root, capsys):
    """benchmarks/probe_box_refinement.py (the docs' refinement table) cannot rot: two steps of it."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import probe_box_refinement

    from conftest import SHAPES_SPLITS

    means = probe_box_refinement.main(["--shapes-root", shapes_root, "--shapes-splits", json.dumps(SHAPES_SPLITS),
                                       "--steps", "2", "--every", "1", "--fixed-batch"])
    assert len(means) == 2 and all(0 < m < 2 for m in means)
    out = capsys.readouterr().out
    assert "zero refinement" in out and "step 2: loss_giou_dn" in out
