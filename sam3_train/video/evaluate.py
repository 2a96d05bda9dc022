"""Scores of predicted masklets against ground-truth masklets (both in the masklets JSON layout).

- **Per-frame cgF1**: every (frame, phrase) pair is one SA-Co pair for
  :class:`sam3_train.metrics.CGF1` (masks; every output masklet counts as a detection, since the
  video model has already thresholded and confirmed them): cgF1, pmF1, IL_MCC over all frames.
- **Identity consistency**: the share of ground-truth tracks that one predicted id covers on most of
  their frames. On each frame, ground truth and predictions of a phrase are matched one to one
  (Hungarian on mask IoU, pairs with IoU >= 0.5 kept); a track is *consistent* when a single predicted
  id is matched to it on more than half of the frames where the track is visible. An id switch
  halfway through leaves no id with more than half: the track does not count.
- **ID switches**: along each track, how often its matched id changes between matched frames.

    python -m sam3_train.video.evaluate --pred runs/x/video/masklets.json --gt runs/moving/gt.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from sam3_train.data import rle as rle_ops
from sam3_train.metrics import CGF1, mask_iou
from sam3_train.video.masklets import read_masklets

FrameMasks = dict[int, torch.Tensor]  # track or object id -> [H, W] bool mask on one frame


def match_frame(gt: FrameMasks, pred: FrameMasks, *, iou_threshold: float = 0.5) -> dict[int, int]:
    """One frame's ground-truth id -> matched predicted id (one to one, IoU >= ``iou_threshold``)."""
    if not gt or not pred:
        return {}
    gt_ids, pred_ids = list(gt), list(pred)
    ious = mask_iou(torch.stack([gt[i] for i in gt_ids]), torch.stack([pred[i] for i in pred_ids])).numpy()
    rows, cols = linear_sum_assignment(-ious)
    return {gt_ids[r]: pred_ids[c] for r, c in zip(rows, cols) if ious[r, c] >= iou_threshold}


class IdentityTally:
    """Identity figures of one phrase's tracks, fed one frame at a time (module docstring)."""

    def __init__(self, *, iou_threshold: float = 0.5):
        self.iou_threshold = iou_threshold
        self.matched: dict[int, list[int | None]] = {}  # track -> its matched id on each frame it is visible

    def update(self, gt: FrameMasks, pred: FrameMasks) -> None:
        pairs = match_frame(gt, pred, iou_threshold=self.iou_threshold)
        for track in gt:
            self.matched.setdefault(track, []).append(pairs.get(track))

    def compute(self) -> dict[str, float]:
        """``identity_consistency`` (consistent tracks / tracks; 1.0 without tracks), ``consistent_tracks``,
        ``gt_tracks`` and ``id_switches``."""
        consistent, switches = 0, 0
        for ids in self.matched.values():
            counts = Counter(i for i in ids if i is not None)
            if counts and 2 * counts.most_common(1)[0][1] > len(ids):
                consistent += 1
            seen = [i for i in ids if i is not None]
            switches += sum(a != b for a, b in zip(seen, seen[1:]))
        tracks = len(self.matched)
        return {"identity_consistency": consistent / tracks if tracks else 1.0, "consistent_tracks": float(consistent),
                "gt_tracks": float(tracks), "id_switches": float(switches)}


def identity_consistency(gt_frames: Sequence[FrameMasks], pred_frames: Sequence[FrameMasks], *,
                         iou_threshold: float = 0.5) -> dict[str, float]:
    """:class:`IdentityTally` over a whole video: one dict of masks per frame on each side."""
    tally = IdentityTally(iou_threshold=iou_threshold)
    for gt, pred in zip(gt_frames, pred_frames, strict=True):
        tally.update(gt, pred)
    return tally.compute()


def _phrase_annotations(record: dict[str, Any], phrase: str, *, ground_truth: bool) -> list[dict[str, Any]]:
    """Annotations of ``phrase`` (ground truth: those listing it among their ``phrases``)."""
    def names(ann: dict[str, Any]) -> list[str]:
        return (ann.get("phrases") or [ann.get("phrase")]) if ground_truth else [ann.get("phrase")]

    return [ann for ann in record["annotations"] if phrase in names(ann)]


def _frame_masks(annotations: list[dict[str, Any]], frame: int) -> FrameMasks:
    """id -> [H, W] bool mask of the annotations visible on ``frame``."""
    return {int(a["id"]): torch.from_numpy(np.ascontiguousarray(rle_ops.decode(a["segmentations"][frame]))).bool()
            for a in annotations if a["segmentations"][frame] is not None}


def evaluate_masklets(pred: dict[str, Any], gt: dict[str, Any], *, phrases: Sequence[str] | None = None,
                      iou_threshold: float = 0.5) -> dict[str, float]:
    """cgF1 over (frame, phrase) pairs and identity figures over tracks of ``pred`` against ``gt``
    (masklets JSON records), decoding one frame at a time. ``phrases``: those to score (default: the
    predictions' categories)."""
    video, gt_video = pred["videos"][0], gt["videos"][0]
    shape = [(v["length"], v["height"], v["width"]) for v in (video, gt_video)]
    if shape[0] != shape[1]:
        raise ValueError(f"Predictions cover {video['length']} frames of {video['width']}x{video['height']} px, the "
                         f"ground truth {gt_video['length']} frames of {gt_video['width']}x{gt_video['height']}: "
                         "evaluate predictions of the same video (all its frames).")
    phrases = list(phrases) if phrases is not None else [c["name"] for c in pred["categories"]]
    height, width = int(video["height"]), int(video["width"])
    cgf1 = CGF1(iou_types=("segm",))
    totals: Counter[str] = Counter()

    def stack(masks: FrameMasks) -> torch.Tensor:
        return torch.stack(list(masks.values())) if masks else torch.zeros(0, height, width, dtype=torch.bool)

    for phrase in phrases:
        gt_anns = _phrase_annotations(gt, phrase, ground_truth=True)
        pred_anns = _phrase_annotations(pred, phrase, ground_truth=False)
        tally = IdentityTally(iou_threshold=iou_threshold)
        for frame in range(int(video["length"])):
            g, p = _frame_masks(gt_anns, frame), _frame_masks(pred_anns, frame)
            cgf1.update([{"scores": torch.ones(len(p)), "masks": stack(p)}], [{"masks": stack(g), "exhaustive": True}])
            tally.update(g, p)
        for key, value in tally.compute().items():
            if key != "identity_consistency":
                totals[key] += value
    scores = {k: float(v) for k, v in cgf1.compute().items() if k in ("cgF1", "cgF1@50", "pmF1", "IL_MCC", "num_pairs")}
    scores.update({k: float(v) for k, v in totals.items()})
    scores["identity_consistency"] = totals["consistent_tracks"] / totals["gt_tracks"] if totals["gt_tracks"] else 1.0
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Score predicted masklets against ground truth (masklets JSON).")
    parser.add_argument("--pred", required=True, type=Path, help="masklets.json written by sam3-train predict-video")
    parser.add_argument("--gt", required=True, type=Path,
                        help="ground truth in the same layout (e.g. moving_shapes' gt.json)")
    args = parser.parse_args(argv)
    print(json.dumps(evaluate_masklets(read_masklets(args.pred), read_masklets(args.gt)), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
