"""COCO instances JSON + image folder -> shards (one sample per image, one query per category).

Category names become phrases (underscores to spaces). Polygons, uncompressed and compressed RLE
all become compressed RLE. Crowd annotations are kept with ``"crowd": true`` (readers exclude them
from the targets and make the query non-exhaustive, so predictions there are not errors). Every
category absent from an image becomes a negative query: all of them (``negatives=None``) or a
seeded sample of ``negatives`` of them.

    python tools/make_shards.py coco --annotations instances_val2017.json --images val2017/ \
        --out datasets/coco/shards/val --negatives 20

With ``shots`` only a K-shot subset is written (data/kshot.py: K images per category, seeded), and its
COCO JSON next to the shards (``{prefix}-{K}shot-seed{S}.json``), for COCO-style scoring of it.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sam3_train.data import rle as rle_ops
from sam3_train.data.image_files import read_image_file
from sam3_train.data.kshot import kshot_subset
from sam3_train.data.schema import SampleError, make_key, query
from sam3_train.data.shards import DEFAULT_MAX_COUNT, DEFAULT_MAX_SIZE, ShardSink

log = logging.getLogger(__name__)


def category_phrase(name: str) -> str:
    """COCO / LVIS category name -> noun phrase ("traffic_light" -> "traffic light")."""
    return " ".join(name.replace("_", " ").split())


def clip_box(box: list[float], width: int, height: int) -> list[float]:
    """Absolute xywh clipped to the image."""
    x0, y0 = max(0.0, float(box[0])), max(0.0, float(box[1]))
    x1, y1 = min(float(width), float(box[0]) + float(box[2])), min(float(height), float(box[1]) + float(box[3]))
    return [x0, y0, max(0.0, x1 - x0), max(0.0, y1 - y0)]


def coco_instance(ann: dict[str, Any], width: int, height: int) -> dict[str, Any]:
    """One COCO annotation -> schema instance {box, rle, crowd?}. Raises ValueError when unusable."""
    segm = ann.get("segmentation")
    if not segm:
        raise ValueError(f"annotation {ann.get('id')} has no segmentation")
    inst: dict[str, Any] = {
        "box": clip_box(ann["bbox"], width, height),
        "rle": rle_ops.from_coco_segmentation(segm, height, width),
    }
    if ann.get("iscrowd", 0):
        inst["crowd"] = True
    return inst


def convert_coco(
    *,
    annotations: str | os.PathLike,
    images: str | os.PathLike,
    out: str | os.PathLike,
    negatives: int | None = None,
    seed: int = 0,
    shots: int | None = None,
    prefix: str = "coco",
    max_count: int = DEFAULT_MAX_COUNT,
    max_size: int = DEFAULT_MAX_SIZE,
    progress: bool = True,
) -> dict[str, Any]:
    """Write shards for a COCO instances file; returns {"pattern", "written", "skipped", "subset_json"}.

    Args:
        annotations: the instances JSON.
        images: folder the JSON's ``file_name`` entries are relative to.
        out: output folder for ``{prefix}-%06d.tar``.
        negatives: absent categories per image as negatives; None: all of them, 0: none.
        seed: seeds the sampling of negatives and of the K-shot subset.
        shots: write only the K-shot subset (K images per category, data/kshot.py) and its COCO JSON.
    """
    ann_path, image_dir = Path(annotations), Path(images)
    if not ann_path.is_file():
        raise FileNotFoundError(f"COCO annotation file {ann_path} does not exist")
    if not image_dir.is_dir():
        raise FileNotFoundError(f"COCO image folder {image_dir} does not exist")
    coco = json.loads(ann_path.read_text())
    subset_json = None
    if shots is not None:
        coco = kshot_subset(coco, shots=shots, seed=seed)
        Path(out).mkdir(parents=True, exist_ok=True)
        subset_json = Path(out) / f"{prefix}-{shots}shot-seed{seed}.json"
        subset_json.write_text(json.dumps(coco))
    phrases = {c["id"]: category_phrase(c["name"]) for c in coco["categories"]}
    by_image: dict[Any, list[dict]] = defaultdict(list)
    for ann in coco.get("annotations", []):
        by_image[ann["image_id"]].append(ann)
    rng = random.Random(seed)
    skipped = 0
    with ShardSink(out_dir=out, prefix=prefix, max_count=max_count, max_size=max_size) as sink:
        entries = sorted(coco["images"], key=lambda e: e["id"])
        for index, entry in enumerate(tqdm(entries, desc=f"coco {ann_path.name}", disable=not progress)):
            try:
                data, ext, (width, height) = read_image_file(image_dir / entry["file_name"])
                if (width, height) != (int(entry["width"]), int(entry["height"])):
                    raise SampleError(
                        f"{entry['file_name']}: file is {width}x{height}, the JSON says {entry['width']}x{entry['height']}"
                    )
                per_cat: dict[int, list[dict]] = defaultdict(list)
                for ann in by_image.get(entry["id"], []):
                    try:
                        per_cat[ann["category_id"]].append(coco_instance(ann, width, height))
                    except (ValueError, KeyError, TypeError) as exn:
                        skipped += 1
                        log.warning("%s: skipped annotation %s: %s", entry["file_name"], ann.get("id"), exn)
                queries = [query(phrases[c], per_cat[c]) for c in sorted(per_cat)]
                absent = [c for c in sorted(phrases) if c not in per_cat]
                if negatives is not None and len(absent) > negatives:
                    absent = sorted(rng.sample(absent, negatives))
                queries += [query(phrases[c]) for c in absent]
                meta = {
                    "image_id": entry["id"],
                    "width": width,
                    "height": height,
                    "queries": queries,
                    "source": {"dataset": "coco", "file_name": entry["file_name"], "annotations": ann_path.name},
                }
                sink.write(make_key(index, Path(entry["file_name"]).stem), data, ext, meta)
            except SampleError as exn:
                skipped += 1
                log.warning("skipped image %s: %s", entry.get("file_name"), exn)
    return {"pattern": sink.pattern if sink.count else None, "written": sink.count, "skipped": skipped,
            "subset_json": str(subset_json) if subset_json else None}
