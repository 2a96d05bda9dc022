"""cgF1, the SA-Co benchmark metric of SAM 3, as a DDP-safe torchmetrics Metric.

Definition (Meta's ``sam3/eval/cgf1_eval.py``: ``CGF1Eval`` and its wrapper ``CGF1Evaluator``,
reproduced to the last epsilon). Meta's "image" is one (image, phrase) pair.

A pair is scored against one or more annotation sets (SA-Co Gold: three annotators, a, b, c). It is
evaluated only when it is exhaustive in every set. Crowd instances (COCO ``iscrowd``) are ignored
ground truth: removed before matching, while the pair and all its predictions are still scored (a
prediction on a crowd region is a false positive). Against each set, keep the predictions scoring
>= 0.5 (``n`` of them, in the order given) and the set's ``m`` non-crowd targets:

- Image level: IL_TP if m > 0 and n > 0, IL_FP if m = 0 and n > 0, IL_TN if both are 0, IL_FN if
  m > 0 and n = 0.
- Instance level: Hungarian matching (``scipy.optimize.linear_sum_assignment`` on -IoU, predictions
  as rows) on mask IoU (pycocotools' float64 IoU, see ``iou.py``); at each threshold t in
  ``np.linspace(0.5, 0.95, 10)`` TP = matches with IoU >= t, FP = n - TP, FN = m - TP; the pair's
  local F1 per threshold from these counts (none when n = m = 0).
- Best of the sets (Meta's "oracle", ``_select_best_scoring``), decided per pair and per IoU type:
  start from the first set; a later set replaces the current choice when both have a local F1 and
  the later one's mean over thresholds is strictly larger, or when the later one has none (n = m =
  0, a perfect true negative). Only the chosen set's counts go on. (With n = 0 this keeps the first
  set's FN count unless some set is empty: ties go to the earlier set, not to the smaller FN.)
- Summed over pairs, per threshold:
  pm_precision = TP / (TP + FP_pos + 1e-4), FP_pos counting only pairs with targets and predictions;
  recall = TP / (TP + FN + 1e-4) over all pairs; pmF1 = 2 P R / (P + R + 1e-4) (a micro F1 from
  summed counts, Meta's ``positive_micro_F1``, not a mean of per-pair F1 values). A pair with
  m = 0 and n > 0 adds FP = n to the all-pairs precision only.
- IL_MCC = (TP TN - FP FN) / (sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) + 1e-6) on the IL counts.
- cgF1 = pmF1 x IL_MCC per threshold, averaged over the 10 thresholds (``cgF1``) or read at 0.5 and
  0.75 (``cgF1@50``, ``cgF1@75``).

Meta reports fractions; we report the instance-level numbers x 100 and the image-level ones as
fractions, as the SAM 3 paper's tables do (cgF1 54.1, IL_MCC 0.82, pmF1 66.1). There is no cap on
detections: Meta's Gold evaluation keeps every query (``max_dets_per_img: -1``, ``maxDets 1e6``).

Every state is a sum (``dist_reduce_fx="sum"``), so DDP ranks may see any number of pairs; the
best-of-sets choice is made per pair in ``update``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torchmetrics import Metric

from sam3_train.metrics.iou import METRIC_PREFIX, IouType, box_iou_coco, checked_iou_types, mask_iou

# COCO's IoU thresholds, built exactly as pycocotools' Params (which Meta's evaluator inherits) does.
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
_EPS = 1e-4  # Meta's epsilon in precision, recall and F1
_IL_EPS = 1e-6  # Meta's epsilon in the image-level metrics (IL_MCC: outside the square root)

# (has predictions, has targets) -> index into the IL counts (TP, FP, TN, FN)
_IL_INDEX = {(True, True): 0, (True, False): 1, (False, False): 2, (False, True): 3}


def match_tp(ious: np.ndarray, thresholds: np.ndarray = IOU_THRESHOLDS) -> np.ndarray:
    """True positives of one pair at each threshold.

    Args:
        ious: [n, m] float64 IoU, predictions as rows (the order decides ties, as in Meta's code).
        thresholds: [T] IoU thresholds.

    Returns:
        [T] int64: matches of the maximum-IoU one-to-one assignment with IoU >= threshold.
    """
    rows, cols = linear_sum_assignment(-ious)
    matched = ious[rows, cols]  # (k,)
    return (matched[None, :] >= thresholds[:, None]).sum(1).astype(np.int64)


def f1_terms(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, F1) with Meta's 1e-4 epsilons; int64 counts in, float64 out."""
    precision = tp / (tp + fp + _EPS)
    recall = tp / (tp + fn + _EPS)
    return precision, recall, 2 * precision * recall / (precision + recall + _EPS)


def mcc(tp: int, fp: int, tn: int, fn: int) -> float:
    """Matthews correlation with Meta's ``+ 1e-6`` outside the square root (0 when a margin is 0)."""
    denom = (float(tp + fp) * float(tp + fn) * float(tn + fp) * float(tn + fn)) ** 0.5
    return float(tp * tn - fp * fn) / (denom + _IL_EPS)


def best_set(local_f1s: Sequence[np.ndarray | None]) -> int:
    """Index of the annotation set a pair is scored against, Meta's ``_select_best_scoring``.

    Args:
        local_f1s: per set, the pair's [T] F1 against it, or None when the pair has neither targets
            in that set nor predictions (a true negative: Meta's result without ``local_F1s``).
    """
    best = 0
    for k in range(1, len(local_f1s)):
        if local_f1s[best] is not None and local_f1s[k] is not None:
            if local_f1s[k].mean() > local_f1s[best].mean():  # strictly: ties keep the earlier set
                best = k
        elif local_f1s[k] is None:  # "we can assume it's a perfect prediction"
            best = k
    return best


def _summarize(values: np.ndarray) -> float:
    # Meta's ``summarize``: the mean over thresholds of the values > -1, or -1 when none is (NaN).
    kept = values[values > -1]
    return float(np.mean(kept)) if kept.size else -1.0


class CGF1(Metric):
    """cgF1 and its parts on masks (``segm``) and boxes (``bbox``), Meta's SA-Co definition.

    ``update(preds, targets)`` takes one entry per (image, phrase) pair:
        preds[i]    {"scores": [n] float, "masks": [n, H, W] bool, "boxes": [n, 4] xyxy pixels}
        targets[i]  {"masks": [m, H, W] bool, "boxes": [m, 4] xyxy pixels, "exhaustive": bool,
                     "crowd": [m] bool (optional, default all False),
                     "extra_sets": [further annotation sets, each a dict with the same keys]
                                   (optional; the target's own keys are the first set)}
    Masks are needed for ``segm`` and boxes for ``bbox`` only. Prediction masks must have the targets'
    size (Meta compares them at the original image size). Every prediction given is scored: cap
    nothing upstream. A pair that is not exhaustive in every set is skipped and counted in
    ``num_skipped``; crowd instances are ignored targets (see the module docstring).

    ``compute()`` returns 0-d float64 tensors. For ``segm`` (no prefix) and ``bbox`` (prefix ``box_``):
        cgF1, cgF1@50, cgF1@75        pmF1 x IL_MCC x 100; mean over IoU 0.50:0.95, at 0.50, at 0.75
        pmF1, pmF1@50, pmF1@75        positive micro F1 x 100 (summed counts)
        pm_precision, recall          x 100, mean over thresholds
        precision, F1                 x 100, mean over thresholds, precision over all pairs (false
                                      positives on negative phrases included; not part of cgF1)
        pmF1_macro                    x 100, mean of per-pair F1 over pairs with targets and
                                      predictions (Meta's ``positive_macro_F1``; -1 if no such pair)
        IL_MCC, IL_precision, IL_recall, IL_F1, IL_FPR
                                      image-level presence, fractions. They depend on the IoU type
                                      only through the best-of-sets choice (equal with one set);
                                      without ``segm`` the unprefixed IL keys repeat the box ones.
    and once:
        num_pairs, num_skipped        pairs evaluated; pairs skipped as non-exhaustive in some set
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        *,
        iou_types: Sequence[IouType] = ("segm", "bbox"),
        score_threshold: float = 0.5,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            iou_types: which IoU to evaluate: "segm" (masks, SA-Co's headline cgF1), "bbox" or both.
            score_threshold: predictions scoring >= this count as detections; 0.5 in SA-Co.
            kwargs: torchmetrics ``Metric`` options (``process_group``, ``sync_on_compute``, ...).
        """
        super().__init__(**kwargs)
        self.iou_types = checked_iou_types(iou_types)
        self.score_threshold = score_threshold
        n_thr = len(IOU_THRESHOLDS)
        self.add_state("num_skipped", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        for t in self.iou_types:
            # il: (IL_TP, IL_FP, IL_TN, IL_FN), per IoU type since the chosen set may differ;
            # fp_pos: FPs on pairs with targets and predictions; fp_neg: predictions on pairs without
            # targets (threshold independent); f1_sum: per-pair F1 summed for the macro variant.
            self.add_state(f"{t}_il", default=torch.zeros(4, dtype=torch.int64), dist_reduce_fx="sum")
            for name in ("tp", "fp_pos", "fn"):
                self.add_state(f"{t}_{name}", default=torch.zeros(n_thr, dtype=torch.int64), dist_reduce_fx="sum")
            self.add_state(f"{t}_fp_neg", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
            self.add_state(f"{t}_f1_sum", default=torch.zeros(n_thr, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Sequence[dict[str, torch.Tensor]], targets: Sequence[dict[str, Any]]) -> None:
        """Add a batch of pairs; see the class docstring for the dict keys and shapes."""
        if len(preds) != len(targets):
            raise ValueError(f"CGF1.update got {len(preds)} predictions for {len(targets)} targets; give one per pair")
        n_thr = len(IOU_THRESHOLDS)
        skipped = 0
        il = {t: np.zeros(4, dtype=np.int64) for t in self.iou_types}
        acc = {t: {k: np.zeros(n_thr, np.int64) for k in ("tp", "fp_pos", "fn")} for t in self.iou_types}
        fp_neg = dict.fromkeys(self.iou_types, 0)
        f1_sum = {t: np.zeros(n_thr, np.float64) for t in self.iou_types}
        for pred, target in zip(preds, targets):
            sets = [target, *target.get("extra_sets", ())]
            if not all(bool(s["exhaustive"]) for s in sets):
                skipped += 1
                continue
            keep = pred["scores"] >= self.score_threshold  # (n_all,)
            n = int(keep.sum())
            gts = [self._targets(s) for s in sets]
            for t in self.iou_types:
                counts = [self._counts(t, pred, keep, n, gt[t]) for gt in gts]  # per set (tp, fp, fn, m)
                f1s = [None if n == 0 and m == 0 else f1_terms(tp, fp, fn)[2] for tp, fp, fn, m in counts]
                chosen = best_set(f1s)
                tp, fp, fn, m = counts[chosen]
                il[t][_IL_INDEX[n > 0, m > 0]] += 1
                if n > 0 and m > 0:
                    acc[t]["tp"] += tp
                    acc[t]["fp_pos"] += fp
                    acc[t]["fn"] += fn
                    f1_sum[t] += f1s[chosen]
                elif m > 0:
                    acc[t]["fn"] += fn  # = m
                else:
                    fp_neg[t] += n
        dev = self.num_skipped.device
        self.num_skipped.add_(skipped)
        for t in self.iou_types:
            getattr(self, f"{t}_il").add_(torch.as_tensor(il[t], device=dev))
            for k, v in acc[t].items():
                getattr(self, f"{t}_{k}").add_(torch.as_tensor(v, device=dev))
            getattr(self, f"{t}_fp_neg").add_(fp_neg[t])
            getattr(self, f"{t}_f1_sum").add_(torch.as_tensor(f1_sum[t], device=dev))

    def _targets(self, target: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One annotation set's targets per IoU type, crowd instances removed (ignored, as Meta's
        evaluator ignores ``iscrowd`` ground truth)."""
        gt = {t: target["masks" if t == "segm" else "boxes"] for t in self.iou_types}
        counts = {t: len(v) for t, v in gt.items()}
        if len(set(counts.values())) != 1:
            raise ValueError(f"a target has different numbers of masks and boxes: {counts}")
        crowd = target.get("crowd")
        if crowd is not None:
            crowd = torch.as_tensor(crowd, dtype=torch.bool).reshape(-1)
            if len(crowd) != next(iter(counts.values())):
                raise ValueError(f"a target's 'crowd' flags ({len(crowd)}) do not match its instances {counts}")
            if crowd.any():
                gt = {t: v[~crowd.to(v.device)] for t, v in gt.items()}
        return gt

    @staticmethod
    def _counts(
        iou_type: IouType, pred: dict[str, torch.Tensor], keep: torch.Tensor, n: int, gt: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(TP, FP, FN) [T] int64 and m of the kept predictions against one set's targets ``gt``."""
        m = len(gt)
        if n > 0 and m > 0:
            if iou_type == "segm":
                ious = mask_iou(pred["masks"][keep].bool(), gt.to(pred["masks"].device).bool())
            else:
                ious = box_iou_coco(pred["boxes"][keep], gt.to(pred["boxes"].device))
            tp = match_tp(ious.cpu().numpy())  # (n, m) float64 IoU
        else:
            tp = np.zeros(len(IOU_THRESHOLDS), dtype=np.int64)
        return tp, n - tp, m - tp, m

    def compute(self) -> dict[str, torch.Tensor]:
        """The named values of the class docstring, from the summed counts (numpy float64, Meta's order)."""
        out: dict[str, float] = {"num_skipped": float(self.num_skipped)}
        i50, i75 = (int(np.flatnonzero(IOU_THRESHOLDS == v)[0]) for v in (0.5, 0.75))
        for t in self.iou_types:
            p = METRIC_PREFIX[t]
            il_tp, il_fp, il_tn, il_fn = (int(v) for v in getattr(self, f"{t}_il"))
            out["num_pairs"] = float(il_tp + il_fp + il_tn + il_fn)
            il_mcc = mcc(il_tp, il_fp, il_tn, il_fn)
            il_recall = il_tp / (il_tp + il_fn + _IL_EPS)
            il_precision = il_tp / (il_tp + il_fp + _IL_EPS)
            il_values = {
                "IL_MCC": il_mcc,
                "IL_precision": il_precision,
                "IL_recall": il_recall,
                "IL_F1": 2 * il_precision * il_recall / (il_precision + il_recall + _IL_EPS),
                "IL_FPR": il_fp / (il_fp + il_tn + _IL_EPS),
            }
            out.update({p + k: v for k, v in il_values.items()})
            if "segm" not in self.iou_types:
                out.update(il_values)
            tp, fp_pos, fn = (getattr(self, f"{t}_{k}").cpu().numpy() for k in ("tp", "fp_pos", "fn"))
            pm_precision, recall, pm_f1 = f1_terms(tp, fp_pos, fn)
            precision, _, f1 = f1_terms(tp, fp_pos + int(getattr(self, f"{t}_fp_neg")), fn)
            cg = pm_f1 * il_mcc  # (T,)
            with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 -> NaN -> -1, as in Meta's code
                macro = getattr(self, f"{t}_f1_sum").cpu().numpy() / il_tp  # il_tp: pairs with a per-pair F1
            out[f"{p}cgF1"] = 100 * _summarize(cg)
            out[f"{p}cgF1@50"] = 100 * _summarize(cg[[i50]])
            out[f"{p}cgF1@75"] = 100 * _summarize(cg[[i75]])
            out[f"{p}pmF1"] = 100 * _summarize(pm_f1)
            out[f"{p}pmF1@50"] = 100 * _summarize(pm_f1[[i50]])
            out[f"{p}pmF1@75"] = 100 * _summarize(pm_f1[[i75]])
            out[f"{p}pm_precision"] = 100 * _summarize(pm_precision)
            out[f"{p}recall"] = 100 * _summarize(recall)
            out[f"{p}precision"] = 100 * _summarize(precision)
            out[f"{p}F1"] = 100 * _summarize(f1)
            macro_value = _summarize(macro)
            out[f"{p}pmF1_macro"] = 100 * macro_value if macro_value != -1 else -1.0
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}
