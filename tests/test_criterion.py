"""Sam3Criterion: every term against hand arithmetic, weighting, o2m routing, robustness, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sam3_train.losses import HungarianMatcher, OneToManyMatcher, PackedTargets, Sam3Criterion
from sam3_train.losses import criterion as criterion_module
from sam3_train.losses.matcher import MatchIndices
from sam3_train.losses.terms import mask_losses, semantic_targets

LN3 = math.log(3.0)  # sigmoid(ln 3) = 0.75, sigmoid(-ln 3) = 0.25


def _target(boxes, masks=None, exhaustive=True):
    t = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "exhaustive": exhaustive}
    if masks is not None:
        t["masks"] = torch.tensor(masks, dtype=torch.bool)
    return t


def _get(terms, key):
    return terms[key].item()


# --------------------------------------------------------------------------- hand-computed terms


def _align_case():
    # Target (0.5, 0.5, 0.4, 0.4). Query 0: logit ln 3 (p = 0.75), box (0.5, 0.5, 0.4, 0.2), IoU 0.08 / 0.16
    # = 0.5; query 1: logit -ln 3 (p = 0.25), a far box. The matcher takes query 0.
    outputs = {
        "pred_logits": torch.tensor([[LN3, -LN3]]),
        "pred_boxes": torch.tensor([[[0.5, 0.5, 0.4, 0.2], [0.1, 0.1, 0.05, 0.05]]]),
        "presence_logit": torch.tensor([0.0]),
    }
    # t = 0.75^0.25 x 0.5^0.75 = 0.930605 x 0.594604 = 0.553341
    t = 0.75**0.25 * 0.5**0.75
    # positive: 10 x BCE(ln 3, t) = 10 x (t x -ln 0.75 + (1 - t) x -ln 0.25) = 10 x 0.778385 = 7.78385
    pos = 10 * (t * -math.log(0.75) + (1 - t) * -math.log(0.25))
    # negative: p^2 x BCE(-ln 3, 0) = 0.0625 x -ln 0.75 = 0.0179801
    neg = 0.25**2 * -math.log(0.75)
    return outputs, pos, neg


def test_align_by_hand():
    outputs, pos, neg = _align_case()
    target = [_target([0.5, 0.5, 0.4, 0.4])]
    terms = Sam3Criterion(pad_num_queries=None)(outputs, target)
    assert math.isclose(_get(terms, "loss_align"), (pos + neg) / 2, rel_tol=1e-5)  # 3.90092
    # Padded to 4 queries: the two missing ones are zero-loss cells in the mean.
    terms = Sam3Criterion(pad_num_queries=4)(outputs, target)
    assert math.isclose(_get(terms, "loss_align"), (pos + neg) / 4, rel_tol=1e-5)


def test_align_weak_loss_and_negative_pairs():
    outputs, pos, neg = _align_case()
    # Non-exhaustive: the unmatched query is not punished and the mean runs over the matched cell only.
    terms = Sam3Criterion(pad_num_queries=None)(outputs, [_target([0.5, 0.5, 0.4, 0.4], exhaustive=False)])
    assert math.isclose(_get(terms, "loss_align"), pos, rel_tol=1e-5)
    # A negative (exhaustive, no instance) pair adds no loss but its 2 queries count in the mean.
    two = {k: torch.cat([v, v]) for k, v in outputs.items()}
    terms = Sam3Criterion(pad_num_queries=None)(two, [_target([0.5, 0.5, 0.4, 0.4]), _target([])])
    assert math.isclose(_get(terms, "loss_align"), (pos + neg) / 4, rel_tol=1e-5)


def test_align_soft_target_floor():
    # A matched query with no overlap has IoU 0, so t = max(0, 0.01) = 0.01 (not 0):
    # 10 x BCE(ln 3, 0.01) = 10 x (0.01 x -ln 0.75 + 0.99 x -ln 0.25) = 13.75738
    outputs = {"pred_logits": torch.tensor([[LN3]]), "pred_boxes": torch.tensor([[[0.2, 0.2, 0.1, 0.1]]])}
    terms = Sam3Criterion(pad_num_queries=None)(outputs, [_target([0.8, 0.8, 0.1, 0.1])])
    expected = 10 * (0.01 * -math.log(0.75) + 0.99 * -math.log(0.25))
    assert math.isclose(_get(terms, "loss_align"), expected, rel_tol=1e-5)
    # A raised floor: t = max(0, 0.6) = 0.6 -> 10 x (0.6 x -ln 0.75 + 0.4 x -ln 0.25) = 7.27123
    terms = Sam3Criterion(pad_num_queries=None, align_min_target=0.6)(outputs, [_target([0.8, 0.8, 0.1, 0.1])])
    expected = 10 * (0.6 * -math.log(0.75) + 0.4 * -math.log(0.25))
    assert math.isclose(_get(terms, "loss_align"), expected, rel_tol=1e-5)


def test_presence_by_hand():
    # Pair 0 negative with logit 0: 0.5 x ln 2; pair 1 positive with logit ln 3: 0.5 x -ln 0.75.
    outputs = {
        "pred_logits": torch.zeros(2, 1),
        "pred_boxes": torch.full((2, 1, 4), 0.5),
        "presence_logit": torch.tensor([0.0, LN3]),
    }
    terms = Sam3Criterion()(outputs, [_target([]), _target([0.5, 0.5, 0.5, 0.5])])
    assert math.isclose(_get(terms, "loss_presence"), 0.5 * (math.log(2) - math.log(0.75)) / 2, rel_tol=1e-5)


def test_boxes_by_hand():
    # Pair 0: pred (0.5, 0.5, 0.2, 0.2), target (0.5, 0.5, 0.2, 0.4): L1 0.2; IoU = GIoU = 0.5.
    # Pair 1: pred x [0.2, 0.3], target x [0.4, 0.5], same y [0.2, 0.3]: L1 0.2; no overlap,
    #   union 0.02, hull 0.3 x 0.1 = 0.03: GIoU = 0 - 0.01 / 0.03 = -1/3.
    # Two target boxes: loss_bbox = (0.2 + 0.2) / 2 = 0.2; loss_giou = (0.5 + 4/3) / 2 = 0.916667.
    outputs = {
        "pred_logits": torch.zeros(2, 1),
        "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2]], [[0.25, 0.25, 0.1, 0.1]]]),
    }
    targets = [_target([0.5, 0.5, 0.2, 0.4]), _target([0.45, 0.25, 0.1, 0.1])]
    terms = Sam3Criterion()(outputs, targets)
    assert math.isclose(_get(terms, "loss_bbox"), 0.2, rel_tol=1e-5)
    assert math.isclose(_get(terms, "loss_giou"), (0.5 + 4 / 3) / 2, rel_tol=1e-5)
    assert "loss_presence" not in terms and "loss_mask" not in terms  # box-only outputs


def test_box_normaliser_is_averaged_over_ranks(monkeypatch):
    # Two ranks holding 2 and 6 boxes: every rank divides by (2 + 6) / 2 = 4 instead of its own 2.
    monkeypatch.setattr(criterion_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(criterion_module.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(criterion_module.dist, "all_reduce", lambda t: t.add_(6.0))
    packed = PackedTargets.from_list([_target([0.5, 0.5, 0.2, 0.4]), _target([0.45, 0.25, 0.1, 0.1])])
    assert criterion_module.num_boxes_across_ranks(packed) == 4.0
    monkeypatch.setattr(criterion_module.dist, "all_reduce", lambda t: t.mul_(0.0))
    assert criterion_module.num_boxes_across_ranks(packed) == 1.0  # clamped


def test_masks_by_hand_same_resolution():
    # Logits [[0, 0], [ln 3, -ln 3]] against target [[1, 0], [1, 0]], focal alpha 0.25, gamma 2:
    #   (0,0) p 0.5,  t 1: 0.25 x 0.5^2 x ln 2        = 0.0625 ln 2
    #   (0,1) p 0.5,  t 0: 0.75 x 0.5^2 x ln 2        = 0.1875 ln 2
    #   (1,0) p 0.75, t 1: 0.25 x 0.25^2 x -ln 0.75  = 0.015625 x -ln 0.75
    #   (1,1) p 0.25, t 0: 0.75 x 0.25^2 x -ln 0.75  = 0.046875 x -ln 0.75
    #   mean = (0.25 ln 2 + 0.0625 x -ln 0.75) / 4 = 0.0478162
    # dice: probs [0.5, 0.5, 0.75, 0.25], target [1, 0, 1, 0]: 1 - (2 x 1.25 + 1) / (2 + 2 + 1) = 0.3
    outputs = {
        "pred_logits": torch.zeros(1, 1),
        "pred_boxes": torch.full((1, 1, 4), 0.5),
        "pred_masks": torch.tensor([[[[0.0, 0.0], [LN3, -LN3]]]]),
    }
    targets = [_target([0.5, 0.5, 0.5, 0.5], masks=[[[1, 0], [1, 0]]])]
    terms = Sam3Criterion(num_points=None)(outputs, targets)
    assert math.isclose(_get(terms, "loss_mask"), (0.25 * math.log(2) + 0.0625 * -math.log(0.75)) / 4, rel_tol=1e-5)
    assert math.isclose(_get(terms, "loss_dice"), 0.3, rel_tol=1e-5)


def test_masks_by_hand_upsampled_to_target_resolution():
    # Constant logit 0 on 2 x 2 upsamples to 0 everywhere on the 4 x 4 target holding 4 foreground pixels:
    # focal = (4 x 0.0625 + 12 x 0.1875) ln 2 / 16 = 0.15625 ln 2; dice = 1 - (2 x 2 + 1) / (8 + 4 + 1) = 8/13.
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = True
    outputs = {
        "pred_logits": torch.zeros(1, 1),
        "pred_boxes": torch.full((1, 1, 4), 0.5),
        "pred_masks": torch.zeros(1, 1, 2, 2),
    }
    targets = [{"boxes": torch.tensor([[0.25, 0.25, 0.5, 0.5]]), "masks": mask, "exhaustive": True}]
    terms = Sam3Criterion(num_points=None)(outputs, targets)
    assert math.isclose(_get(terms, "loss_mask"), 0.15625 * math.log(2), rel_tol=1e-5)
    assert math.isclose(_get(terms, "loss_dice"), 8 / 13, rel_tol=1e-5)


def test_semantic_by_hand_and_only_for_pairs_with_instances():
    # Pair 0: instance masks [[1,0],[0,0]] and [[0,0],[0,1]], union [[1,0],[0,1]]; logits 0 (p 0.5).
    # Focal alpha 0.6, gamma 2 (Meta's configs): each pixel ln 2 x 0.5^2 x (0.6 if foreground else 0.4);
    #   mean = (0.6 + 0.6 + 0.4 + 0.4) / 4 x 0.5^2 x ln 2 = 0.5 x 0.5^2 x ln 2
    # dice: 1 - (2 x 1 + 1) / (2 + 2 + 1) = 0.4.
    # Pair 1 has no instance: its (large) logits must not count.
    outputs = {
        "pred_logits": torch.zeros(2, 1),
        "pred_boxes": torch.full((2, 1, 4), 0.5),
        "semantic_seg": torch.cat([torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 5.0)]),
    }
    targets = [
        _target([[0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5]], masks=[[[1, 0], [0, 0]], [[0, 0], [0, 1]]]),
        {"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 2, 2, dtype=torch.bool), "exhaustive": True},
    ]
    terms = Sam3Criterion()(outputs, targets)
    assert math.isclose(_get(terms, "loss_semantic"), 0.5 * 0.5**2 * math.log(2), rel_tol=1e-5)
    assert math.isclose(_get(terms, "loss_semantic_dice"), 0.4, rel_tol=1e-5)


def test_semantic_full_resolution_by_hand():
    # Logits 0 on 2 x 2 upsample to 0 on the 4 x 4 target with 1 foreground pixel (not dilated now):
    # focal = (1 x 0.6 + 15 x 0.4) / 16 x 0.5^2 x ln 2; dice = 1 - (2 x 0.5 + 1) / (8 + 1 + 1) = 0.8
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 1, 1] = True
    outputs = {"pred_logits": torch.zeros(1, 1), "pred_boxes": torch.full((1, 1, 4), 0.5)}
    outputs["semantic_seg"] = torch.zeros(1, 1, 2, 2)
    targets = [{"boxes": torch.tensor([[0.3, 0.3, 0.1, 0.1]]), "masks": mask, "exhaustive": True}]
    terms = Sam3Criterion(semantic_full_resolution=True)(outputs, targets)
    assert math.isclose(_get(terms, "loss_semantic"), 6.6 / 16 * 0.5**2 * math.log(2), rel_tol=1e-5)
    assert math.isclose(_get(terms, "loss_semantic_dice"), 0.8, rel_tol=1e-5)


def test_semantic_targets_are_resized_as_in_sam3():
    # Bilinear (align_corners=False) halving reads the 2 x 2 block under each output pixel, and SAM 3
    # casts the result to bool: one foreground pixel at (1, 1) makes output pixel (0, 0) foreground.
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 1, 1] = True
    target = {"boxes": torch.tensor([[0.3, 0.3, 0.1, 0.1]]), "masks": mask, "exhaustive": True}
    packed = PackedTargets.from_list([target])
    assert semantic_targets(packed, (2, 2), torch.tensor([0])).tolist() == [[[1.0, 0.0], [0.0, 0.0]]]


# --------------------------------------------------------------------------- weighting and routing


def test_weighted_total_by_hand():
    crit = Sam3Criterion()
    terms = {"loss_align": torch.tensor(1.0), "loss_bbox_o2m": torch.tensor(1.0), "loss_giou_aux0": torch.tensor(2.0)}
    # 20 x 1 + (5 x 2.0) x 1 + 2 x 2 = 34, times sqrt(4 pairs) = 68
    assert math.isclose(crit.weighted_total(terms, num_pairs=4).item(), 68.0)
    assert math.isclose(Sam3Criterion(scale_by_sqrt_pairs=False).weighted_total(terms, num_pairs=4).item(), 34.0)
    assert crit.weight_of("loss_semantic_dice") == 30.0 and crit.weight_of("loss_dice_aux3_o2m") == 20.0
    with pytest.raises(KeyError, match="loss_nonsense"):
        crit.weight_of("loss_nonsense")


def _full_outputs(num_pairs: int, num_queries: int, num_aux: int, h: int, *, requires_grad: bool = False):
    g = torch.Generator().manual_seed(0)

    def layer(with_presence: bool):
        d = {
            "pred_logits": torch.randn(num_pairs, num_queries, generator=g),
            "pred_boxes": torch.rand(num_pairs, num_queries, 4, generator=g) * 0.5 + 0.25,
        }
        if with_presence:
            d["presence_logit"] = torch.randn(num_pairs, generator=g)
        return d

    out = layer(True)
    out["pred_masks"] = torch.randn(num_pairs, num_queries, h, h, generator=g)
    out["semantic_seg"] = torch.randn(num_pairs, 1, h, h, generator=g)
    out["aux_outputs"] = [layer(True) for _ in range(num_aux)]
    out["o2m"] = layer(False)
    out["o2m"]["pred_masks"] = torch.randn(num_pairs, num_queries, h, h, generator=g)
    out["o2m"]["aux_outputs"] = [layer(False) for _ in range(num_aux)]
    leaves = []

    def mark(d):
        for k, v in d.items():
            if isinstance(v, torch.Tensor):
                leaves.append(v.requires_grad_(requires_grad))
            elif isinstance(v, dict):
                mark(v)
            elif isinstance(v, list):
                for x in v:
                    mark(x)

    mark(out)
    return out, leaves


def _random_targets(sizes, size, g, exhaustive=True):
    out = []
    for n in sizes:
        xy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        masks = torch.rand(n, size, size, generator=g) > 0.7
        out.append({"boxes": torch.cat([xy, wh], 1), "masks": masks, "exhaustive": exhaustive})
    return out


def test_keys_and_o2m_matcher_routing():
    outputs, _ = _full_outputs(3, 6, 2, 8)
    targets = _random_targets([2, 0, 1], 16, torch.Generator().manual_seed(1))
    calls = {"o2o": 0, "o2m": 0}

    class CountingHungarian(HungarianMatcher):
        def forward(self, *a):
            calls["o2o"] += 1
            return super().forward(*a)

    class CountingO2M(OneToManyMatcher):
        def forward(self, *a):
            calls["o2m"] += 1
            return super().forward(*a)

    terms = Sam3Criterion(matcher=CountingHungarian(), o2m_matcher=CountingO2M())(outputs, targets)
    layer = lambda s, presence=True: {f"loss_{n}{s}" for n in ["align", "bbox", "giou"] + ["presence"] * presence}
    expected = layer("") | layer("_aux0") | layer("_aux1") | layer("_o2m", False) | layer("_aux0_o2m", False)
    expected |= layer("_aux1_o2m", False) | {"loss_mask", "loss_dice", "loss_mask_o2m", "loss_dice_o2m"}
    expected |= {"loss_semantic", "loss_semantic_dice"}
    assert set(terms) == expected
    assert calls == {"o2o": 5, "o2m": 1}  # o2o: final + 2 aux + 2 aux o2m; o2m: final o2m only
    calls.update(o2o=0, o2m=0)
    Sam3Criterion(matcher=CountingHungarian(), o2m_matcher=CountingO2M(), o2m_matcher_on_aux=True)(outputs, targets)
    assert calls == {"o2o": 3, "o2m": 3}
    # Box-only training: masks and semantic terms off.
    terms = Sam3Criterion(use_masks=False, use_semantic=False)(outputs, targets)
    assert not {k for k in terms if "mask" in k or "dice" in k or "semantic" in k}


def test_without_aux_loss_only_final_layers_are_supervised():
    """aux_loss=False: the earlier decoder layers (both halves) get no term; the final layers' terms are
    unchanged, since the box normaliser and the matchers do not depend on the aux layers."""
    outputs, _ = _full_outputs(3, 6, 2, 8)
    targets = _random_targets([2, 0, 1], 16, torch.Generator().manual_seed(1))
    torch.manual_seed(0)  # the point sampler draws random points
    full = Sam3Criterion()(outputs, targets)
    torch.manual_seed(0)
    final = Sam3Criterion(aux_loss=False)(outputs, targets)
    assert set(final) == {k for k in full if "_aux" not in k}
    for key, value in final.items():
        torch.testing.assert_close(value, full[key], rtol=0, atol=0, msg=key)


# --------------------------------------------------------------------------- robustness


@pytest.mark.parametrize("case", ["all_negative", "many_instances_degenerate", "non_exhaustive"])
def test_finite_losses_and_gradients(case):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    outputs, leaves = _full_outputs(3, 10, 1, 8, requires_grad=True)
    if case == "all_negative":
        targets = _random_targets([0, 0, 0], 32, g)
    elif case == "non_exhaustive":
        targets = _random_targets([0, 3, 0], 32, g, exhaustive=False)
    else:
        targets = _random_targets([300, 1, 0], 32, g)  # more instances than queries
        targets[0]["boxes"][:, 2] = 0.0  # zero-width targets
        with torch.no_grad():
            outputs["pred_boxes"][0, :5, 3] = 0.0  # zero-height predictions
    crit = Sam3Criterion()
    terms = crit(outputs, targets)
    assert all(torch.isfinite(v) for v in terms.values()), terms
    crit.weighted_total(terms, num_pairs=3).backward()
    assert all(leaf.grad is not None and torch.isfinite(leaf.grad).all() for leaf in leaves)


# --------------------------------------------------------------------------- point sampling


def test_point_sampled_mask_loss_approaches_full_resolution():
    torch.manual_seed(0)
    size = 64
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    masks = torch.stack([(xx - 0.4) ** 2 + (yy - 0.5) ** 2 < 0.09, (xx > 0.6) & (yy < 0.4)])
    pred = F.interpolate(torch.randn(1, 2, 4, 4) * 3, size=(16, 16), mode="bilinear")  # smooth [1, 2, 16, 16]
    packed = PackedTargets.from_list([{"boxes": torch.rand(2, 4), "masks": masks, "exhaustive": True}])
    idx = MatchIndices(torch.tensor([0, 0]), torch.tensor([0, 1]), torch.tensor([0, 1]))
    kw = dict(num_boxes=2.0, alpha=0.25, gamma=2.0, oversample_ratio=1.0, importance_sample_ratio=0.0)
    full = torch.stack(mask_losses(pred, packed, idx, num_points=None, **kw))

    def rel_error(k: int) -> torch.Tensor:
        runs = [torch.stack(mask_losses(pred, packed, idx, num_points=k, **kw)) for _ in range(3)]
        return ((torch.stack(runs) - full).abs() / full).mean(0)  # [focal, dice]

    coarse, fine = rel_error(32), rel_error(65536)
    assert (fine < 0.02).all(), fine
    assert (fine < coarse).all(), (coarse, fine)


def test_importance_sampling_prefers_uncertain_points():
    # Half the mask is confident (logit 8), the other half uncertain (logit 0.1): importance-sampled
    # points land mostly on the uncertain half.
    from sam3_train.losses.point_sampling import uncertain_points

    torch.manual_seed(0)
    logits = torch.full((1, 16, 16), 8.0)
    logits[:, :, 8:] = 0.1
    points = uncertain_points(logits, num_points=200, oversample_ratio=3.0, importance_sample_ratio=0.75)
    assert points.shape == (1, 200, 2)
    assert (points[0, :, 0] > 0).float().mean() > 0.8  # x in [-1, 1]; uniform sampling would give 0.5


# --------------------------------------------------------------------------- through the detector


def test_gradients_reach_detector_parameters_from_every_term():
    """One forward of the tiny detector; each term's gradient reaches some parameters, the total's all heads."""
    from sam3_train.data import Batch
    from sam3_train.model import build_detector

    torch.manual_seed(0)
    det = build_detector("tiny")
    det.train()
    size = int(getattr(det, "image_size", 224))
    g = torch.Generator().manual_seed(3)
    batch = Batch(
        images=torch.randn(2, 3, size, size, generator=g),
        image_sizes=torch.tensor([[size, size], [size, size]]),
        pair_image=torch.tensor([0, 0, 1]),
        input_ids=torch.randint(1, 1000, (3, 32), generator=g),
        attention_mask=torch.ones(3, 32, dtype=torch.long),
        exemplar_boxes=torch.zeros(3, 0, 4),
        exemplar_labels=torch.zeros(3, 0, dtype=torch.long),
        phrases=["a", "b", "c"],
        keys=["k0", "k1"],
    )
    outputs = det(batch)
    # Targets next to predicted boxes, so that the one-to-many matcher (IoU-gated) matches at random init.
    near = outputs["o2m"]["pred_boxes"].detach() + 0.01
    batch.targets = _random_targets([2, 0, 1], size, g)
    batch.targets[0]["boxes"] = near[0, :2].clamp(0.05, 0.95)
    batch.targets[2]["boxes"] = near[2, :1].clamp(0.05, 0.95)
    crit = Sam3Criterion(num_points=256)
    terms = crit(outputs, batch.targets)
    assert {"loss_align", "loss_presence", "loss_bbox", "loss_giou", "loss_mask", "loss_dice"} <= set(terms)
    assert {"loss_semantic", "loss_semantic_dice", "loss_align_o2m", "loss_mask_o2m"} <= set(terms)
    params = [p for p in det.parameters() if p.requires_grad]
    for name, value in terms.items():
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        assert any(gr is not None and gr.abs().sum() > 0 for gr in grads), f"{name} reaches no parameter"
    crit.weighted_total(terms, num_pairs=batch.num_pairs).backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in params)


def test_targets_masks_missing_on_a_positive_pair_is_a_clear_error():
    with_masks = {"boxes": torch.rand(1, 4), "masks": torch.zeros(1, 8, 8, dtype=torch.bool), "exhaustive": True}
    negative_without = {"boxes": torch.zeros(0, 4), "exhaustive": True}
    assert PackedTargets.from_list([with_masks, negative_without]).masks[1].shape == (0, 8, 8)
    with pytest.raises(ValueError, match=r"pairs \[1\] have boxes but no 'masks'"):
        PackedTargets.from_list([with_masks, {"boxes": torch.rand(1, 4), "exhaustive": True}])
