"""Tests for sam3_train.metrics: cgF1 (hand-computed, brute force, Meta's evaluator), mAP, presence.

Meta's evaluator (``sam3/eval/cgf1_eval.py``, needs only numpy, scipy, pycocotools, tqdm) is loaded by
file path, without importing the ``sam3`` package (its ``__init__`` pulls in the model and timm): from
an installed ``sam3`` (``pip install --no-deps sam3==0.1.4``) or from ``$SAM3_CGF1_EVAL``.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import meta_reference_missing
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sam3_train.metrics import CGF1, CocoMeanAveragePrecision, PresenceAccuracy, box_iou_coco, mask_iou

H = W = 12
THRESHOLDS = np.linspace(0.5, 0.95, 10).tolist()  # COCO's, as the spec says; exact values matter (IoU 3/5)


# ---------------------------------------------------------------------------------------- helpers


def rect_mask(x0: int, y0: int, x1: int, y1: int) -> torch.Tensor:
    m = torch.zeros(H, W, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def pair(rects: list[tuple[int, int, int, int]], scores: list[float] | None = None, exhaustive: bool = True) -> dict:
    """A prediction (when scores are given) or a target whose masks fill the given xyxy boxes."""
    masks = torch.stack([rect_mask(*r) for r in rects]) if rects else torch.zeros(0, H, W, dtype=torch.bool)
    out = {"masks": masks, "boxes": torch.tensor(rects, dtype=torch.float32).reshape(-1, 4)}
    if scores is None:
        out["exhaustive"] = exhaustive
    else:
        out["scores"] = torch.tensor(scores, dtype=torch.float32)
    return out


def value(metric_out: dict, key: str) -> float:
    return float(metric_out[key])


def random_case(rng: np.random.Generator, n_pairs: int) -> tuple[list[dict], list[dict]]:
    """Random pairs: 0-3 target rectangles; predictions are most targets jittered by a pixel plus 0-2
    random rectangles, shuffled, with masks flipped at 2% of pixels (so mask and box IoUs differ) and
    scores around 0.5; some pairs negative, some non-exhaustive."""

    def rects(k: int) -> list[tuple[int, int, int, int]]:
        out = []
        for _ in range(k):
            x0, y0 = rng.integers(0, W - 3, size=2)
            out.append((int(x0), int(y0), int(rng.integers(x0 + 3, W + 1)), int(rng.integers(y0 + 3, H + 1))))
        return out

    def jitter(r: tuple[int, ...]) -> tuple[int, int, int, int]:
        x0, y0, x1, y1 = (int(np.clip(v + rng.choice([-1, 0, 0, 1]), 0, W)) for v in r)
        return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)

    preds, targets = [], []
    for _ in range(n_pairs):
        target_rects = rects(int(rng.integers(0, 4)))
        pred_rects = [jitter(r) for r in target_rects if rng.random() < 0.8] + rects(int(rng.integers(0, 3)))
        pred_rects = [pred_rects[i] for i in rng.permutation(len(pred_rects))]
        p = pair(pred_rects, scores=[float(s) for s in rng.uniform(0.3, 1.0, size=len(pred_rects))])
        p["masks"] = p["masks"] ^ torch.from_numpy(rng.random((len(pred_rects), H, W)) < 0.02)
        preds.append(p)
        targets.append(pair(target_rects, exhaustive=bool(rng.random() > 0.15)))
    return preds, targets


def random_multi_case(rng: np.random.Generator, n_pairs: int) -> tuple[list[dict], list[dict]]:
    """random_case with SA-Co Gold's three annotators: set a is random_case's target, sets b and c
    (``extra_sets``) agree with it, drop an instance, add one, move one by a pixel or call the phrase
    absent; about 7% of the sets are non-exhaustive and 15% of the instances crowd regions. Pair 0
    has 150 predictions above 0.5 (more than the 100 a detection cap would keep)."""
    preds, targets = random_case(rng, n_pairs)
    many = [(int(x), int(y), int(x) + 3, int(y) + 3) for x, y in rng.integers(0, W - 3, size=(150, 2))]
    preds[0] = pair(many, scores=rng.uniform(0.5, 1.0, size=150).tolist())
    targets[0] = pair([(0, 0, 4, 4), (6, 6, 10, 10)])

    def variant(rects: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
        kind = rng.integers(0, 5)
        if kind == 1 and rects:
            return [r for i, r in enumerate(rects) if i != rng.integers(0, len(rects))]
        if kind == 2:
            x0, y0 = (int(v) for v in rng.integers(0, W - 4, size=2))
            return [*rects, (x0, y0, x0 + 4, y0 + 4)]
        if kind == 3 and rects:
            x0, y0, x1, y1 = rects[0]
            return [(max(x0 - 1, 0), y0, x1, min(y1 + 1, H)), *rects[1:]]
        return [] if kind == 4 else list(rects)

    def with_crowd(target: dict) -> dict:
        target["crowd"] = torch.from_numpy(rng.random(len(target["masks"])) < 0.15)
        return target

    for target in targets:
        rects = [tuple(int(v) for v in box) for box in target["boxes"].tolist()]
        target["extra_sets"] = [with_crowd(pair(variant(rects), exhaustive=bool(rng.random() > 0.07)))
                                for _ in range(2)]
        with_crowd(target)
    for annotated in (targets[0], *targets[0]["extra_sets"]):  # pair 0 is scored, against set a's targets at least
        annotated["exhaustive"] = True
    targets[0]["crowd"][:] = False
    return preds, targets


# -------------------------------------------------------------------------------- IoU arithmetic


def test_iou_matches_pycocotools_bit_for_bit():
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.random((5, 9, 11)) < 0.4)
    b = torch.from_numpy(rng.random((3, 9, 11)) < 0.4)
    b[0] = False  # an empty mask: pycocotools gives 0, not NaN
    rle = lambda m: mask_utils.encode(np.asfortranarray(m.permute(1, 2, 0).numpy().astype(np.uint8)))  # noqa: E731
    expected = mask_utils.iou(rle(a), rle(b), [0] * len(b))
    assert np.array_equal(mask_iou(a, b).numpy(), expected)

    xy = rng.uniform(0, 50, size=(12, 2))
    boxes = torch.from_numpy(np.concatenate([xy, xy + rng.uniform(0.5, 30, size=(12, 2))], 1))
    d, g = boxes[:7], boxes[7:]
    to_xywh = lambda bx: [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in bx.tolist()]  # noqa: E731
    expected = mask_utils.iou(to_xywh(d), to_xywh(g), [0] * len(g))
    assert np.array_equal(box_iou_coco(d, g).numpy(), expected)


# ------------------------------------------------------------------------------ cgF1 by hand


def f1_by_hand(tp: int, fp: int, fn: int) -> float:
    p, r = tp / (tp + fp + 1e-4), tp / (tp + fn + 1e-4)
    return 2 * p * r / (p + r + 1e-4)


def test_cgf1_perfect_predictions():
    metric = CGF1()
    rects = [(0, 0, 4, 4), (5, 5, 12, 10)]
    # A score of exactly 0.5 is kept (>= 0.5).
    metric.update([pair(rects, [0.9, 0.5]), pair([], [])], [pair(rects), pair([])])
    out = metric.compute()
    # TP 2 at every threshold; IL: one TP pair, one TN pair -> MCC 1 / (1 + 1e-6).
    expected = 100 * f1_by_hand(2, 0, 0) * (1 / (1 + 1e-6))
    for prefix in ("", "box_"):
        for key in ("cgF1", "cgF1@50", "cgF1@75"):
            assert value(out, prefix + key) == pytest.approx(expected, rel=1e-13)
        assert value(out, prefix + "pmF1") == pytest.approx(100 * f1_by_hand(2, 0, 0), rel=1e-13)
    assert value(out, "IL_MCC") == pytest.approx(1 / (1 + 1e-6), rel=1e-15)
    assert 99.989 < expected < 99.990  # the epsilons cost about 1e-4 of F1, and MCC 1e-6


def test_cgf1_all_missed():
    metric = CGF1()
    rects = [(0, 0, 4, 4)]
    # The only prediction is perfect but scores 0.4 < 0.5: nothing is detected.
    metric.update([pair(rects, [0.4]), pair([], [])], [pair(rects), pair([])])
    out = metric.compute()
    assert value(out, "cgF1") == 0 and value(out, "box_cgF1") == 0 and value(out, "pmF1") == 0
    assert value(out, "IL_MCC") == 0  # IL: FN 1, TN 1 -> numerator 0
    assert value(out, "recall") == 0


def test_cgf1_false_positive_on_negative_phrase_hits_il_mcc_only():
    rects = [(0, 0, 4, 4)]
    clean, noisy = CGF1(), CGF1()
    clean.update([pair(rects, [0.9]), pair([], [])], [pair(rects), pair([])])
    # Extra negative pair with a confident prediction: IL_FP.
    noisy.update(
        [pair(rects, [0.9]), pair([(2, 2, 6, 6)], [0.8]), pair([], [])], [pair(rects), pair([]), pair([])]
    )
    a, b = clean.compute(), noisy.compute()
    assert value(b, "pmF1") == value(a, "pmF1") == pytest.approx(100 * f1_by_hand(1, 0, 0), rel=1e-13)
    mcc = 1 / (2**0.5 * 2**0.5 + 1e-6)  # IL TP 1, FP 1, TN 1, FN 0: (1*1 - 0) / (sqrt(2*1*2*1) + 1e-6)
    assert value(b, "IL_MCC") == pytest.approx(mcc, rel=1e-13)
    assert value(b, "cgF1") == pytest.approx(100 * f1_by_hand(1, 0, 0) * mcc, rel=1e-13)
    assert value(b, "IL_FPR") == pytest.approx(1 / (2 + 1e-6), rel=1e-13)
    assert value(b, "precision") == pytest.approx(100 * 1 / (2 + 1e-4), rel=1e-13)  # all-pairs precision sees it


def test_cgf1_ignores_non_exhaustive_pairs():
    rects = [(0, 0, 4, 4)]
    preds, targets = [pair(rects, [0.9]), pair([], [])], [pair(rects), pair([])]
    base, extra = CGF1(), CGF1()
    base.update(preds, targets)
    extra.update(
        preds + [pair([(5, 5, 9, 9), (0, 0, 3, 3)], [0.9, 0.9])],
        targets + [pair([(0, 0, 2, 2)], exhaustive=False)],
    )
    a, b = base.compute(), extra.compute()
    assert value(b, "num_skipped") == 1 and value(a, "num_skipped") == 0
    for key in a:
        if key != "num_skipped":
            assert torch.equal(a[key], b[key]), key


def test_cgf1_partial_iou_passes_some_thresholds():
    # Target 10x10 = 100 px; prediction 9 wide x 8 high inside it: IoU 72/100 = 0.72 for mask and box.
    target, pred = [(0, 0, 10, 10)], [(0, 0, 9, 8)]
    metric = CGF1()
    metric.update([pair(pred, [0.9]), pair([], [])], [pair(target), pair([])])
    out = metric.compute()
    mcc = 1 / (1 + 1e-6)
    hit = f1_by_hand(1, 0, 0)  # thresholds 0.50 .. 0.70: TP 1
    miss = f1_by_hand(0, 1, 1)  # thresholds 0.75 .. 0.95: FP 1, FN 1 -> 0
    assert miss == 0
    for prefix in ("", "box_"):
        assert value(out, prefix + "cgF1") == pytest.approx(100 * np.mean([hit] * 5 + [miss] * 5) * mcc, rel=1e-13)
        assert value(out, prefix + "cgF1@50") == pytest.approx(100 * hit * mcc, rel=1e-13)
        assert value(out, prefix + "cgF1@75") == 0


def with_sets(target: dict, *others: dict) -> dict:
    return {**target, "extra_sets": list(others)}


def test_cgf1_scores_each_pair_against_its_best_annotation_set():
    pred = pair([(0, 0, 4, 4), (6, 6, 10, 10)], [0.9, 0.8])
    a, b = pair([(0, 0, 4, 4)]), pair([(0, 0, 4, 4), (6, 6, 10, 10)])  # b saw both objects
    one_set, oracle, b_alone = CGF1(), CGF1(), CGF1()
    one_set.update([pred, pair([], [])], [a, pair([])])
    oracle.update([pred, pair([], [])], [with_sets(a, b), pair([])])
    b_alone.update([pred, pair([], [])], [b, pair([])])
    out, ref = oracle.compute(), b_alone.compute()
    assert value(one_set.compute(), "pmF1") == pytest.approx(100 * f1_by_hand(1, 1, 0), rel=1e-13)
    assert value(out, "pmF1") == pytest.approx(100 * f1_by_hand(2, 0, 0), rel=1e-13)
    for key in ref:  # the pair was scored against set b, whose F1 is higher
        assert torch.equal(out[key], ref[key]), key
    # The same sets in the other order choose b as well: nothing favours the first set but ties.
    swapped = CGF1()
    swapped.update([pred, pair([], [])], [with_sets(b, a), pair([])])
    for key in ref:
        assert torch.equal(swapped.compute()[key], ref[key]), key


def test_cgf1_best_set_rules_without_predictions():
    none = pair([], [])
    # A set that calls the phrase absent makes a pair without predictions a true negative.
    metric = CGF1()
    metric.update([none], [with_sets(pair([(0, 0, 4, 4), (5, 5, 9, 9)]), pair([]))])
    assert metric.segm_il.tolist() == [0, 0, 1, 0] and metric.segm_fn.tolist() == [0] * 10  # IL_TN, no FN
    # All sets have targets: every local F1 is 0, a tie, so the first set's FN count stays (3, not 1).
    metric = CGF1()
    metric.update([none], [with_sets(pair([(0, 0, 3, 3), (4, 4, 7, 7), (8, 8, 11, 11)]), pair([(0, 0, 3, 3)]))])
    assert metric.segm_fn.tolist() == [3] * 10 and metric.bbox_fn.tolist() == [3] * 10
    assert metric.segm_il.tolist() == [0, 0, 0, 1]


def test_cgf1_skips_pairs_non_exhaustive_in_any_set():
    pred = pair([(0, 0, 4, 4)], [0.9])
    metric = CGF1()
    metric.update([pred, pred, pred], [with_sets(pair([(0, 0, 4, 4)]), pair([(0, 0, 4, 4)], exhaustive=False)),
                                       with_sets(pair([(0, 0, 4, 4)], exhaustive=False), pair([(0, 0, 4, 4)])),
                                       with_sets(pair([(0, 0, 4, 4)]), pair([(0, 0, 4, 4)]))])
    out = metric.compute()
    assert value(out, "num_skipped") == 2 and value(out, "num_pairs") == 1


def test_cgf1_ignores_crowd_targets_but_scores_the_pair():
    crowd_region = (0, 0, 6, 6)
    preds = [pair([crowd_region, (7, 7, 11, 11)], [0.9, 0.9]), pair([crowd_region], [0.9]), pair([], [])]
    targets = [pair([crowd_region, (7, 7, 11, 11)]), pair([crowd_region]), pair([])]
    targets[0]["crowd"] = torch.tensor([True, False])
    targets[1]["crowd"] = torch.tensor([True])
    metric, removed = CGF1(), CGF1()
    metric.update(preds, targets)
    # The same as giving only the non-crowd targets: the pair counts, its prediction on the crowd
    # region is a false positive (Meta's evaluator drops iscrowd ground truth before matching).
    removed.update(preds, [pair([(7, 7, 11, 11)]), pair([]), pair([])])
    out, ref = metric.compute(), removed.compute()
    for key in ref:
        assert torch.equal(out[key], ref[key]), key
    assert value(out, "num_pairs") == 3 and value(out, "num_skipped") == 0
    assert metric.segm_il.tolist() == [1, 1, 1, 0] and metric.segm_fp_pos.tolist() == [1] * 10


def test_cgf1_scores_every_prediction():
    preds = [pair([(i % 9, i % 7, i % 9 + 3, i % 7 + 3) for i in range(250)], [0.9] * 250)]
    metric = CGF1(iou_types=("bbox",))
    metric.update(preds, [pair([(0, 0, 3, 3)])])
    assert metric.bbox_tp.tolist() == [1] * 10 and metric.bbox_fp_pos.tolist() == [249] * 10
    assert value(metric.compute(), "IL_MCC") == value(metric.compute(), "box_IL_MCC")


# ------------------------------------------------------------------------------ cgF1 brute force


def brute_force_cgf1(preds: list[dict], targets: list[dict]) -> dict[str, float]:
    """Plain loops: IoU from pixel counts, matching by trying every assignment."""
    tp = [0] * 10
    fp_pos = [0] * 10
    fn = [0] * 10
    il = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    for pred, target in zip(preds, targets):
        if not target["exhaustive"]:
            continue
        kept = [i for i, s in enumerate(pred["scores"].tolist()) if s >= 0.5]
        n, m = len(kept), len(target["masks"])
        il["tp" if n and m else "fp" if n else "fn" if m else "tn"] += 1
        if m == 0:
            continue
        iou = [[0.0] * m for _ in range(n)]
        for a, i in enumerate(kept):
            for b in range(m):
                pm, tm = pred["masks"][i].numpy(), target["masks"][b].numpy()
                inter, union = int((pm & tm).sum()), int((pm | tm).sum())
                iou[a][b] = inter / union if inter else 0.0
        best: list[float] = []
        if n >= m:
            for perm in itertools.permutations(range(n), m):
                cand = [iou[perm[b]][b] for b in range(m)]
                if sum(cand) > sum(best) or not best:
                    best = cand
        else:
            for perm in itertools.permutations(range(m), n):
                cand = [iou[a][perm[a]] for a in range(n)]
                if sum(cand) > sum(best) or not best:
                    best = cand
        for k, thr in enumerate(THRESHOLDS):
            hits = sum(1 for v in best if v >= thr)
            tp[k] += hits
            fn[k] += m - hits
            if n:
                fp_pos[k] += n - hits
    denom = ((il["tp"] + il["fp"]) * (il["tp"] + il["fn"]) * (il["tn"] + il["fp"]) * (il["tn"] + il["fn"])) ** 0.5
    mcc = (il["tp"] * il["tn"] - il["fp"] * il["fn"]) / (denom + 1e-6)
    pm_f1 = [f1_by_hand(tp[k], fp_pos[k], fn[k]) for k in range(10)]
    precision = [tp[k] / (tp[k] + fp_pos[k] + 1e-4) for k in range(10)]
    recall = [tp[k] / (tp[k] + fn[k] + 1e-4) for k in range(10)]
    return {"cgF1": 100 * sum(f * mcc for f in pm_f1) / 10, "pmF1": 100 * sum(pm_f1) / 10, "IL_MCC": mcc,
            "cgF1@50": 100 * pm_f1[0] * mcc, "cgF1@75": 100 * pm_f1[5] * mcc,
            "pm_precision": 100 * sum(precision) / 10, "recall": 100 * sum(recall) / 10}


def test_cgf1_agrees_with_brute_force_on_random_cases():
    rng = np.random.default_rng(1)
    for _ in range(20):
        preds, targets = random_case(rng, int(rng.integers(1, 7)))
        metric = CGF1(iou_types=("segm",))
        metric.update(preds, targets)
        out, expected = metric.compute(), brute_force_cgf1(preds, targets)
        for key, ref in expected.items():
            assert value(out, key) == pytest.approx(ref, rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize("case", [random_case, random_multi_case])
def test_cgf1_sum_states_merge_like_one_process(case):
    rng = np.random.default_rng(2)
    preds, targets = case(rng, 12)
    whole, rank0, rank1 = CGF1(), CGF1(), CGF1()
    whole.update(preds, targets)
    rank0.update(preds[:3], targets[:3])  # ranks saw different numbers of pairs
    rank1.update(preds[3:7], targets[3:7])
    rank1.update(preds[7:], targets[7:])
    rank0.merge_state(rank1)
    a, b = whole.compute(), rank0.compute()
    assert value(a, "num_pairs") > 0
    for key in a:
        if key.endswith("pmF1_macro"):  # a float sum: the order of additions may move the last bit
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-12)
        else:
            assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------- parity with Meta's code


def _meta_cgf1_module():
    spec = importlib.util.find_spec("sam3")
    candidates = [os.environ.get("SAM3_CGF1_EVAL", "")]
    if spec is not None and spec.submodule_search_locations:
        candidates += [str(Path(p) / "eval" / "cgf1_eval.py") for p in spec.submodule_search_locations]
    for path in candidates:
        if path and Path(path).is_file():
            module_spec = importlib.util.spec_from_file_location("_meta_cgf1_eval", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            return module
    meta_reference_missing("Meta's cgf1_eval.py not found (or set SAM3_CGF1_EVAL to it)")


def _rle_json(mask: torch.Tensor) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def write_meta_files(folder: Path, preds: list[dict], targets: list[dict]) -> tuple[list[str], str]:
    """SA-Co style GT files, one per annotation set (the target's own, then its ``extra_sets``), with
    ``iscrowd`` from the optional ``crowd`` flags; and the COCO result file of the predictions."""
    n_sets = 1 + len(targets[0].get("extra_sets", []))
    gt_paths = []
    for k in range(n_sets):
        images, gts = [], []
        for image_id, target in enumerate(targets, start=1):
            annotated = target if k == 0 else target["extra_sets"][k - 1]
            images.append({"id": image_id, "height": H, "width": W, "is_instance_exhaustive": annotated["exhaustive"]})
            crowd = annotated.get("crowd", torch.zeros(len(annotated["masks"]), dtype=torch.bool)).tolist()
            for mask, box, is_crowd in zip(annotated["masks"], annotated["boxes"].tolist(), crowd):
                x0, y0, x1, y1 = box
                gts.append({"id": len(gts) + 1, "image_id": image_id, "category_id": 1, "iscrowd": int(is_crowd),
                            "segmentation": _rle_json(mask), "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "area": float(mask.sum())})
        gt_paths.append(str(folder / f"gt_{'abcdefgh'[k]}.json"))
        Path(gt_paths[-1]).write_text(json.dumps({"images": images, "annotations": gts,
                                                  "categories": [{"id": 1, "name": "c"}]}))
    dts = []
    for image_id, pred in enumerate(preds, start=1):
        for mask, box, score in zip(pred["masks"], pred["boxes"].tolist(), pred["scores"].tolist()):
            x0, y0, x1, y1 = box
            dts.append({"image_id": image_id, "category_id": 1, "score": score,
                        "segmentation": _rle_json(mask), "bbox": [x0, y0, x1 - x0, y1 - y0]})
    pred_path = folder / "pred.json"
    pred_path.write_text(json.dumps(dts))
    return gt_paths, str(pred_path)


def assert_meta_parity(ours: dict, gt_paths: list[str], pred_path: str, iou_types=("segm", "bbox")) -> None:
    """Our compute() against Meta's ``CGF1Evaluator(gt_paths)`` for each IoU type: equal, bit for bit,
    except the macro F1 (a float sum in another order)."""
    meta = _meta_cgf1_module()
    for iou_type in iou_types:
        prefix = "" if iou_type == "segm" else "box_"
        gt_path = gt_paths if len(gt_paths) > 1 else gt_paths[0]
        theirs = meta.CGF1Evaluator(gt_path, iou_type=iou_type).evaluate(pred_path)
        ref = lambda name: theirs[f"cgF1_eval_{iou_type}_{name}"]  # noqa: E731
        exact = {"cgF1": "cgF1", "cgF1@50": "cgF1@0.5", "cgF1@75": "cgF1@0.75", "pmF1": "positive_micro_F1",
                 "pmF1@50": "positive_micro_F1@0.5", "pmF1@75": "positive_micro_F1@0.75",
                 "pm_precision": "positive_micro_precision", "recall": "recall", "precision": "precision",
                 "F1": "F1"}
        for ours_key, meta_key in exact.items():
            assert value(ours, prefix + ours_key) == 100 * ref(meta_key), (iou_type, ours_key)
        assert value(ours, prefix + "pmF1_macro") == pytest.approx(100 * ref("positive_macro_F1"), rel=1e-12)
        for key in ("IL_MCC", "IL_precision", "IL_recall", "IL_F1", "IL_FPR"):
            assert value(ours, prefix + key) == ref(key), (iou_type, key)


def test_cgf1_matches_meta_evaluator(tmp_path):
    _meta_cgf1_module()
    rng = np.random.default_rng(3)
    preds, targets = random_case(rng, 40)
    metric = CGF1()
    metric.update(preds, targets)
    ours = metric.compute()
    assert value(ours, "num_pairs") > 20 and value(ours, "num_skipped") > 0
    assert_meta_parity(ours, *write_meta_files(tmp_path, preds, targets))
    for key in ("IL_MCC", "IL_precision", "IL_recall", "IL_F1", "IL_FPR"):  # one set: one presence decision
        assert torch.equal(ours[key], ours["box_" + key]), key


def test_cgf1_matches_meta_evaluator_on_three_annotators(tmp_path):
    """SA-Co Gold's setting: three GT files (annotators a, b, c) that disagree, crowd instances, pairs
    non-exhaustive in one set only, and a pair with 150 detections; Meta's evaluator takes the list."""
    _meta_cgf1_module()
    rng = np.random.default_rng(6)
    preds, targets = random_multi_case(rng, 60)
    metric, set_a = CGF1(), CGF1()
    metric.update(preds, targets)
    set_a.update(preds, [{k: v for k, v in t.items() if k != "extra_sets"} for t in targets])
    ours, only_a = metric.compute(), set_a.compute()
    # The case exercises what it claims: sets b and c skip more pairs and change the score; crowd.
    assert value(ours, "num_skipped") > value(only_a, "num_skipped") > 0 and value(ours, "num_pairs") > 40
    assert value(ours, "cgF1") != value(only_a, "cgF1") and value(ours, "box_cgF1") != value(only_a, "box_cgF1")
    assert sum(int(t["crowd"].sum()) for t in targets) > 3
    assert int(metric.segm_fp_pos[0]) >= 148  # pair 0's 150 detections were all scored
    assert_meta_parity(ours, *write_meta_files(tmp_path, preds, targets))


def test_cgf1_presence_follows_the_set_chosen_for_each_iou_type(tmp_path):
    """Set a calls the phrase absent, set b has one object. The prediction's box is b's box but its
    mask only the box's 1-px border (IoU 28/64): boxes choose b (IL_TP), masks tie at F1 0 and keep a
    (IL_FP). Meta runs one evaluator per IoU type, so its IL_MCC differs between them too."""
    frame = pair([(0, 0, 8, 8)], [0.9])
    frame["masks"][0, 1:7, 1:7] = False
    preds = [frame, pair([(9, 9, 12, 12)], [0.8]), pair([], [])]
    targets = [with_sets(pair([]), pair([(0, 0, 8, 8)]), pair([])),  # annotators a, b, c
               with_sets(pair([(9, 9, 12, 12)]), pair([(9, 9, 12, 12)]), pair([(9, 9, 12, 12)])),
               with_sets(pair([]), pair([]), pair([]))]
    metric = CGF1()
    metric.update(preds, targets)
    out = metric.compute()
    assert metric.segm_il.tolist() == [1, 1, 1, 0] and metric.bbox_il.tolist() == [2, 0, 1, 0]
    assert value(out, "box_IL_MCC") > value(out, "IL_MCC")
    assert_meta_parity(out, *write_meta_files(tmp_path, preds, targets))


# ----------------------------------------------------------------------------------------- mAP


def test_map_perfect_predictions_give_one():
    rects = [(0, 0, 4, 4), (5, 5, 12, 10)]
    preds = [pair(rects, [0.9, 0.2]), pair([(1, 1, 6, 6)], [0.7]), pair([], []), pair([(0, 0, 5, 5)], [0.99])]
    # The last pair is non-exhaustive: its unlabelled prediction must not count as a false positive.
    targets = [pair(rects), pair([(1, 1, 6, 6)]), pair([]), pair([(7, 7, 12, 12)], exhaustive=False)]
    metric, everything = CocoMeanAveragePrecision(), CocoMeanAveragePrecision(exhaustive_only=False)
    metric.update(preds, targets)
    everything.update(preds, targets)
    out, all_pairs = metric.compute(), everything.compute()
    for key in ("mAP", "mAP@50", "mAP@75", "box_mAP", "box_mAP@50", "box_mAP@75"):
        assert value(out, key) == 1.0, key
        assert value(all_pairs, key) < 1.0, key
    assert value(out, "map_num_skipped") == 1 and value(out, "map_num_pairs") == 3


def _pycocotools_reference(preds: list[dict], targets: list[dict], iou_type: str, max_dets: list[int]) -> list[float]:
    """Standard pycocotools path: gt dataset + loadRes on a result list, one category."""
    images, gts, results = [], [], []
    for image_id, (pred, target) in enumerate(zip(preds, targets), start=1):
        images.append({"id": image_id, "height": H, "width": W})
        for mask, box in zip(target["masks"], target["boxes"].tolist()):
            x0, y0, x1, y1 = box
            gts.append({"id": len(gts) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                        "segmentation": _rle_json(mask), "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": float(mask.sum())})
        for mask, box, score in zip(pred["masks"], pred["boxes"].tolist(), pred["scores"].tolist()):
            x0, y0, x1, y1 = box
            entry = {"image_id": image_id, "category_id": 1, "score": score}
            entry.update({"segmentation": _rle_json(mask)} if iou_type == "segm" else
                         {"bbox": [x0, y0, x1 - x0, y1 - y0]})
            results.append(entry)
    coco_gt = COCO()
    coco_gt.dataset = {"images": images, "annotations": gts, "categories": [{"id": 1, "name": "c"}]}
    coco_gt.createIndex()
    evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), iouType=iou_type)
    evaluator.params.maxDets = max_dets
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return list(evaluator.stats[:3])


def test_map_matches_pycocotools_on_a_simple_case():
    preds = [pair([(0, 0, 9, 8), (0, 0, 4, 4), (6, 6, 12, 12)], [0.9, 0.8, 0.3]), pair([(2, 2, 6, 6)], [0.95])]
    targets = [pair([(0, 0, 10, 10), (6, 5, 12, 12)]), pair([])]
    # (1, 1, 2) makes the top-k cut matter: pair 1 has three predictions. (pycocotools' summarize
    # reads mAP at maxDets 100 whatever the setting: -1 here; its mAP@50 and mAP@75 are at 2.)
    for max_dets in ([1, 10, 100], [1, 1, 2]):
        metric = CocoMeanAveragePrecision(max_detections=max_dets)
        metric.update(preds, targets)
        out = metric.compute()
        for iou_type, prefix in (("segm", ""), ("bbox", "box_")):
            ref = _pycocotools_reference(preds, targets, iou_type, max_dets)
            assert 0 < ref[1] < 1  # the case is not trivial
            for key, r in list(zip(("mAP", "mAP@50", "mAP@75"), ref))[0 if max_dets[-1] == 100 else 1 :]:
                assert value(out, prefix + key) == pytest.approx(r, abs=1e-12), (iou_type, key, max_dets)


def test_map_uneven_ranks_give_the_same_result(monkeypatch):
    rng = np.random.default_rng(4)
    preds, targets = random_case(rng, 9)
    whole, rank0, rank1 = CocoMeanAveragePrecision(), CocoMeanAveragePrecision(), CocoMeanAveragePrecision()
    whole.update(preds, targets)
    expected = whole.compute()
    rank0.update(preds[:2], targets[:2])
    rank1.update(preds[2:], targets[2:])
    # A two-rank all_gather_object: rank 0 receives its own pairs and rank 1's.
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)

    sent = {}  # rank -> what its compute() put into the gather, whatever form the metric's state takes

    def gather_as(rank: int):
        def all_gather_object(out: list, obj, group=None):
            sent[rank] = obj
            out[0], out[1] = sent.get(0, obj), sent.get(1, obj)

        return all_gather_object

    monkeypatch.setattr(dist, "all_gather_object", gather_as(1))
    rank1.compute()  # rank 1's own result is not under test: this records what it sends
    monkeypatch.setattr(dist, "all_gather_object", gather_as(0))
    out = rank0.compute()
    assert value(out, "map_num_pairs") + value(out, "map_num_skipped") == len(preds)  # every pair counted once
    assert value(expected, "box_mAP") > 0
    for key in expected:
        assert torch.equal(expected[key], out[key]), key


# ------------------------------------------------------------------------------------ presence


def test_presence_accuracy_counts():
    metric = PresenceAccuracy()
    targets = [pair([(0, 0, 2, 2)]), pair([(0, 0, 2, 2)]), pair([]), pair([]), pair([(0, 0, 2, 2)], exhaustive=False)]
    metric.update(torch.tensor([0.9, 0.2, 0.5, 0.1, 0.9]), targets)  # TP, FN, FP (0.5 counts), TN, skipped
    out = metric.compute()
    assert value(out, "presence_accuracy") == 0.5
    assert value(out, "presence_precision") == 0.5 and value(out, "presence_recall") == 0.5
    assert value(out, "presence_num_pairs") == 4 and value(out, "presence_num_skipped") == 1


# ---------------------------------------------------------------------------- real two-rank run


def _two_rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        preds, targets = random_case(np.random.default_rng(5), 11)
        mine = slice(0, 3) if rank == 0 else slice(3, None)  # uneven: 3 pairs and 8 pairs
        results = {}
        for metric in (CGF1(), CocoMeanAveragePrecision()):
            metric.update(preds[mine], targets[mine])
            results.update(metric.compute())
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters re-import torch: ~5 s idle, ~25 s on a loaded 2-core box
def test_metrics_under_real_ddp_with_uneven_ranks(tmp_path):
    """Two gloo processes (no environment variables set, so nothing leaks into later tests)."""
    torch.multiprocessing.spawn(_two_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    preds, targets = random_case(np.random.default_rng(5), 11)
    expected = {}
    for metric in (CGF1(), CocoMeanAveragePrecision()):
        metric.update(preds, targets)
        expected.update(metric.compute())
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == expected.keys()
        for key in expected:
            assert float(got[key]) == pytest.approx(float(expected[key]), rel=1e-12, abs=1e-12), (rank, key)


@pytest.mark.parametrize("metric", [CGF1, CocoMeanAveragePrecision])
def test_iou_types_are_checked_once_for_both_metrics(metric):
    """One IouType: both metrics take segm and/or bbox (repeats dropped, order kept) and name anything else."""
    assert metric(iou_types=("bbox", "segm", "bbox")).iou_types == ("bbox", "segm")
    for bad in ((), ("segm", "mask")):
        with pytest.raises(ValueError, match=r"iou_types must be a non-empty subset of \('segm', 'bbox'\)"):
            metric(iou_types=bad)
