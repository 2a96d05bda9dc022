"""TopQueryLocalisation: the top query's box against the ground truth and against its own mask, with
hand-computed IoUs, medians read from the histogram, empty and non-exhaustive pairs, ranks merged."""

from __future__ import annotations

import math

import pytest
import torch

from sam3_train.metrics import TopQueryLocalisation
from sam3_train.metrics.localisation import BINS, histogram_median, iou_bins, mask_box

H = W = 40


def _mask(x0: int, y0: int, x1: int, y1: int) -> torch.Tensor:
    """[H, W] bool, True on columns x0..x1-1 and rows y0..y1-1 (tight box [x0, y0, x1, y1])."""
    m = torch.zeros(H, W, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def _pred(scores, boxes, masks) -> dict[str, torch.Tensor]:
    return {"scores": torch.tensor(scores, dtype=torch.float32), "boxes": torch.tensor(boxes, dtype=torch.float32),
            "masks": torch.stack(masks)}


def _target(boxes, exhaustive: bool = True) -> dict:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "exhaustive": exhaustive}


def _values(metric: TopQueryLocalisation) -> dict[str, float]:
    return {k: float(v) for k, v in metric.compute().items()}


# Three pairs with hand-computed IoUs:
# 1. top box = ground truth = own mask's box: every IoU 1.
# 2. top box [0, 0, 10, 10] against ground truth [5, 0, 15, 10]: 50 / 150 = 1/3; its mask's box
#    [5, 0, 15, 10] is the ground truth (1); box vs mask box: 1/3.
# 3. the lower-scoring query sits on the object, the top one (score 0.9) far away: box IoU 0; its mask
#    is empty: both mask-box IoUs 0.
PAIRS = [
    (_pred([0.8], [[0, 0, 10, 10]], [_mask(0, 0, 10, 10)]), _target([[0, 0, 10, 10]])),
    (_pred([0.3], [[0, 0, 10, 10]], [_mask(5, 0, 15, 10)]), _target([[5, 0, 15, 10], [30, 30, 40, 40]])),
    (_pred([0.2, 0.9], [[0, 0, 10, 10], [20, 20, 30, 30]], [_mask(0, 0, 10, 10), torch.zeros(H, W, dtype=torch.bool)]),
     _target([[0, 0, 10, 10]])),
]


def test_hand_computed_medians_means_and_shares():
    metric = TopQueryLocalisation()
    metric.update(*zip(*PAIRS))
    v = _values(metric)
    assert v["localisation_num_pairs"] == 3 and v["localisation_num_skipped"] == 0
    # IoUs (1, 1/3, 0) rounded down to their bins: (0.99, 0.33, 0.0) (IoU 1 joins the last bin), median 0.33.
    assert v["top_box_iou_median"] == pytest.approx(0.33)
    assert v["top_box_iou_mean"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert v["top_box_iou@50"] == pytest.approx(1 / 3) and v["top_box_iou@75"] == pytest.approx(1 / 3)
    # Mask boxes against the ground truth: (1, 1, 0).
    assert v["top_mask_box_iou_median"] == pytest.approx(0.99)
    assert v["top_mask_box_iou_mean"] == pytest.approx(2 / 3) and v["top_mask_box_iou@50"] == pytest.approx(2 / 3)
    # Box against its own mask's box: (1, 1/3, 0).
    assert v["box_mask_iou_median"] == pytest.approx(0.33) and v["box_mask_iou_mean"] == pytest.approx(4 / 9)


def test_pairs_without_instances_are_not_read_and_non_exhaustive_ones_are_skipped():
    metric = TopQueryLocalisation()
    empty = _target([])  # a negative phrase: no object to localise, whatever the top query does
    partial = _target([[0, 0, 10, 10]], exhaustive=False)
    metric.update([PAIRS[0][0], PAIRS[1][0], PAIRS[1][0]], [empty, partial, PAIRS[1][1]])
    v = _values(metric)
    assert v["localisation_num_pairs"] == 1 and v["localisation_num_skipped"] == 1
    assert v["top_box_iou_mean"] == pytest.approx(1 / 3) and v["top_box_iou_median"] == pytest.approx(0.33)


def test_no_pairs_give_minus_one():
    metric = TopQueryLocalisation()
    metric.update([PAIRS[0][0]], [_target([])])
    v = _values(metric)
    assert v["localisation_num_pairs"] == 0
    assert all(v[f"{m}_{s}"] == -1.0 for m in ("top_box_iou", "box_mask_iou") for s in ("median", "mean"))
    assert v["top_mask_box_iou@50"] == -1.0


def test_a_pair_with_instances_and_no_detection_is_refused():
    metric = TopQueryLocalisation()
    none = {"scores": torch.zeros(0), "boxes": torch.zeros(0, 4), "masks": torch.zeros(0, H, W, dtype=torch.bool)}
    with pytest.raises(ValueError, match="score_threshold=0.0"):
        metric.update([none], [_target([[0, 0, 10, 10]])])


def test_ties_go_to_the_first_query():
    metric = TopQueryLocalisation()
    pred = _pred([0.5, 0.5], [[0, 0, 10, 10], [20, 20, 30, 30]], [_mask(0, 0, 10, 10), _mask(0, 0, 10, 10)])
    metric.update([pred], [_target([[0, 0, 10, 10]])])
    assert _values(metric)["top_box_iou_mean"] == 1.0


def test_two_ranks_merged_equal_one():
    """The states are sums: two halves merged (what DDP's sync does) give one metric's values."""
    one, a, b = TopQueryLocalisation(), TopQueryLocalisation(), TopQueryLocalisation()
    preds, targets = zip(*PAIRS)
    one.update(preds, targets)
    a.update(preds[:1], targets[:1])
    b.update(preds[1:], targets[1:])
    a.merge_state(b)
    assert _values(a) == _values(one)


def test_mask_box_spans_pixel_edges():
    torch.testing.assert_close(mask_box(_mask(3, 2, 7, 5)), torch.tensor([3.0, 2.0, 7.0, 5.0], dtype=torch.float64))
    assert mask_box(torch.zeros(H, W, dtype=torch.bool)) is None


def test_bins_and_median():
    below_half = math.nextafter(0.5, 0.0)
    bins = iou_bins(torch.tensor([0.0, 0.009, 0.01, below_half, 0.5, 0.75, 0.999, 1.0], dtype=torch.float64))
    assert bins.tolist() == [0, 0, 1, 49, 50, 75, 99, 99]
    hist = torch.zeros(BINS, dtype=torch.int64)
    hist[[20, 60]] = 1  # two values, 0.2x and 0.6x: the mean of the middle two, 0.4
    assert histogram_median(hist) == pytest.approx(0.4)
    hist[0] = 3  # 0, 0, 0, 0.2x, 0.6x: the third smallest, 0
    assert histogram_median(hist) == 0.0
    assert histogram_median(torch.zeros(BINS, dtype=torch.int64)) == -1.0


def test_validation_logs_the_localisation_measure_beside_cgf1(shapes_root, one_thread):
    """A real validation (tiny model, 112 px, two batches): the measure is logged as val/<name> beside
    cgF1 and box cgF1, over every val pair with instances (the untrained model's scores are all low)."""
    import lightning as L

    from conftest import SHAPES_SPLITS
    from sam3_train.data import Sam3DataModule
    from sam3_train.lit import Sam3LitModule

    torch.manual_seed(0)
    dm = Sam3DataModule(shapes_root=shapes_root, shapes_splits=SHAPES_SPLITS, image_size=112, eval_batch_size=2,
                        num_workers=0, eval_max_phrases=2)
    module = Sam3LitModule(preset="tiny", image_size=112)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, limit_val_batches=2, enable_model_summary=False)
    (logged,) = trainer.validate(module, datamodule=dm)
    for name in ("cgF1", "box_cgF1", "top_box_iou_median", "top_box_iou@50", "box_mask_iou_median",
                 "top_mask_box_iou_median", "localisation_num_pairs"):
        assert f"val/{name}" in logged, sorted(logged)
    # 2 batches x 2 images x up to 2 phrases; the shapes phrases with instances are read, whatever the score.
    assert 1 <= logged["val/localisation_num_pairs"] <= 8
    assert 0.0 <= logged["val/top_box_iou_median"] <= 1.0 and 0.0 <= logged["val/box_mask_iou_median"] <= 1.0
