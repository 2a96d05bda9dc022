"""K-shot subsets of a COCO dataset, as few-shot detection benchmarks cut them.

Protocol: K images per category, GLIP's ODinW few-shot protocol (as SAM 3's Table 2 10-shot runs
use). The images are visited in an order shuffled by ``seed``; an image is kept when some category
it contains (crowd annotations aside) still has fewer than K kept images, and then every category
it contains counts it. Every category with at least K images in the full set ends with at least K
(co-occurring categories can end with more, as in GLIP's sampler); a rarer one keeps all its images.
A kept image keeps all its annotations, crowd ones included (its labels stay exhaustive), and the
converter makes every category absent from it a negative query. Images without annotations are
never picked. The same (dataset, K, seed) always gives the same subset.

    subset = kshot_subset(json.load(open("train/_annotations.coco.json")), shots=10, seed=0)
    python tools/make_shards.py coco --annotations train.json --images train/ --shots 10 --seed 0 --out DIR
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any


def kshot_subset(coco: dict[str, Any], *, shots: int, seed: int) -> dict[str, Any]:
    """A valid COCO dict of the K-shot training subset (module docstring): the kept ``images`` in
    their original order, their ``annotations``, every category, ``info`` / ``licenses`` kept, and
    ``info.kshot = {"shots", "seed", "protocol"}``."""
    if shots < 1:
        raise ValueError(f"shots must be at least 1, got {shots}")
    categories_of: dict[Any, set[int]] = defaultdict(set)
    for ann in coco.get("annotations", []):
        if not ann.get("iscrowd", 0):
            categories_of[ann["image_id"]].add(ann["category_id"])
    order = sorted(categories_of, key=lambda i: (str(type(i)), i))  # a fixed order before the seeded shuffle
    random.Random(f"kshot-{seed}").shuffle(order)
    counts: dict[int, int] = defaultdict(int)
    kept: set[Any] = set()
    for image_id in order:
        cats = categories_of[image_id]
        if any(counts[c] < shots for c in cats):
            kept.add(image_id)
            for c in cats:
                counts[c] += 1
    info = dict(coco.get("info") or {})
    info["kshot"] = {"shots": shots, "seed": seed, "protocol": "K images per category (GLIP ODinW)"}
    out = {k: v for k, v in coco.items() if k not in ("images", "annotations", "info")}
    out["info"] = info
    out["images"] = [e for e in coco["images"] if e["id"] in kept]
    out["annotations"] = [a for a in coco.get("annotations", []) if a["image_id"] in kept]
    out["categories"] = list(coco["categories"])
    return out


def images_per_category(coco: dict[str, Any]) -> dict[int, int]:
    """category id -> number of images with a non-crowd instance of it."""
    seen: dict[int, set] = defaultdict(set)
    for ann in coco.get("annotations", []):
        if not ann.get("iscrowd", 0):
            seen[ann["category_id"]].add(ann["image_id"])
    return {c: len(ids) for c, ids in seen.items()}
