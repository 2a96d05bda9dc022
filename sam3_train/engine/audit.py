"""How good a round's pseudo-labels are, measured against labels the engine never saw.

When the pool was cut from a labelled split (the demonstration does this; so can anyone holding out
a labelled sample of their pool), the written shards can be scored against the withheld labels:

    quality = pseudo_label_quality(shard_paths(round_dir, manifest), labelled_urls)
    quality["instances"]   # precision / recall of the kept instances (mask IoU >= 0.5, one-to-one)
    quality["exhaustive"]  # pairs marked exhaustive whose instances are exactly the true ones
    quality["negatives"]   # instance-free exhaustive pairs whose phrase is truly absent

Instances are matched per (image, phrase) pair, greedily in the order written (the writer keeps
them by descending score), each to the unmatched true instance of highest IoU.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from sam3_train.engine.candidates import masks_of
from sam3_train.engine.sources import read_samples
from sam3_train.metrics.iou import mask_iou

MATCH_IOU = 0.5


def _masks(instances: list[dict[str, Any]], height: int, width: int) -> torch.Tensor:
    return masks_of([i["rle"] for i in instances], height, width)


def matched_instances(predicted: torch.Tensor, true: torch.Tensor, min_iou: float = MATCH_IOU) -> int:
    """How many of ``predicted`` [n, H, W] bool masks match a distinct one of ``true`` [m, H, W] at IoU >= min_iou."""
    if len(predicted) == 0 or len(true) == 0:
        return 0
    free = torch.ones(len(true), dtype=torch.bool)
    hits = 0
    for row in mask_iou(predicted, true):
        candidates = torch.where(free & (row >= min_iou), row, -1.0)
        j = int(candidates.argmax())
        if candidates[j] >= 0:
            free[j] = False
            hits += 1
    return hits


def pseudo_label_quality(written: Iterable[str], labelled: Iterable[str], *, min_iou: float = MATCH_IOU) -> dict[str, Any]:
    """Scores of the pseudo-labelled shards ``written`` against the labelled shards ``labelled``
    (the same images with their true labels; extra labelled images are ignored)."""
    truth = {key: {q["phrase"]: q["instances"] for q in meta["queries"]}
             for key, _, _, meta in read_samples(list(labelled))}
    kept = hits = true_total = 0
    exhaustive = exhaustive_right = negatives = negatives_right = 0
    for key, _, _, meta in read_samples(list(written)):
        if key not in truth:
            raise ValueError(f"written sample {key} has no labelled counterpart in {len(truth)} labelled samples")
        height, width = int(meta["height"]), int(meta["width"])
        for query in meta["queries"]:
            true = truth[key].get(query["phrase"])
            if true is None:
                raise ValueError(f"sample {key}: phrase {query['phrase']!r} is not among its labelled phrases")
            found = matched_instances(_masks(query["instances"], height, width), _masks(true, height, width), min_iou)
            kept, hits, true_total = kept + len(query["instances"]), hits + found, true_total + len(true)
            if query["exhaustive"]:
                exhaustive += 1
                exhaustive_right += int(found == len(query["instances"]) == len(true))
                if not query["instances"]:
                    negatives += 1
                    negatives_right += int(not true)
    share = lambda a, b: round(a / b, 4) if b else None  # noqa: E731
    return {
        "min_iou": min_iou,
        "instances": {"kept": kept, "true": true_total, "matched": hits,
                      "precision": share(hits, kept), "recall": share(hits, true_total)},
        "exhaustive": {"pairs": exhaustive, "right": exhaustive_right, "accuracy": share(exhaustive_right, exhaustive)},
        "negatives": {"pairs": negatives, "right": negatives_right, "accuracy": share(negatives_right, negatives)},
    }
