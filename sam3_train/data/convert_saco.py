"""SAM 3's SA-Co style JSON -> shards: (image, noun phrase) pairs grouped into one sample per image.

In SA-Co files every ``images`` entry is one pair: ``file_name``, ``height``, ``width``,
``text_input`` (the phrase), ``is_instance_exhaustive`` (absent: true), optionally
``queried_category``; its ``annotations`` (matched by ``image_id``) carry ``bbox`` as *normalised*
xywh and ``segmentation`` as RLE (or polygons), ``iscrowd`` optional. A pair without annotations is
a negative (when exhaustive). Optional ``input_box`` (normalised xywh, one box or a list) with
``input_box_label`` (1 / 0) become exemplars, as Meta's loader reads them.

    python tools/make_shards.py saco --annotations saco_gold.json --images images/ --out DIR
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sam3_train.data import rle as rle_ops
from sam3_train.data.convert_coco import clip_box
from sam3_train.data.image_files import read_image_file
from sam3_train.data.schema import SampleError, make_key, query
from sam3_train.data.shards import DEFAULT_MAX_COUNT, DEFAULT_MAX_SIZE, ShardSink

log = logging.getLogger(__name__)


def _absolute(box: list[float], width: int, height: int) -> list[float]:
    """Normalised xywh -> absolute pixel xywh, clipped to the image."""
    x, y, w, h = (float(v) for v in box)
    return clip_box([x * width, y * height, w * width, h * height], width, height)


def _exemplars(entry: dict[str, Any], width: int, height: int) -> list[dict[str, Any]]:
    boxes = entry.get("input_box")
    if not boxes:
        return []
    if not isinstance(boxes[0], (list, tuple)):
        boxes = [boxes]
    labels = entry.get("input_box_label") or [1] * len(boxes)
    if not isinstance(labels, (list, tuple)):
        labels = [labels]
    return [{"box": _absolute(b, width, height), "positive": bool(l)} for b, l in zip(boxes, labels)]


def saco_query(entry: dict[str, Any], anns: list[dict[str, Any]], width: int, height: int) -> dict[str, Any]:
    """One SA-Co pair -> schema query."""
    instances = []
    for ann in anns:
        inst: dict[str, Any] = {
            "box": _absolute(ann["bbox"], width, height),
            "rle": rle_ops.from_coco_segmentation(ann["segmentation"], height, width),
        }
        if ann.get("iscrowd", 0):
            inst["crowd"] = True
        instances.append(inst)
    return query(
        str(entry["text_input"]),
        instances,
        exhaustive=bool(entry.get("is_instance_exhaustive", True)),
        exemplars=_exemplars(entry, width, height),
    )


def convert_saco(
    *,
    annotations: str | os.PathLike,
    images: str | os.PathLike,
    out: str | os.PathLike,
    prefix: str = "saco",
    max_count: int = DEFAULT_MAX_COUNT,
    max_size: int = DEFAULT_MAX_SIZE,
    progress: bool = True,
) -> dict[str, Any]:
    """Write shards for an SA-Co style file; returns {"pattern", "written", "skipped"}.

    Pairs that share a ``file_name`` become the queries of one sample, in file order.
    """
    ann_path, image_dir = Path(annotations), Path(images)
    if not ann_path.is_file():
        raise FileNotFoundError(f"SA-Co annotation file {ann_path} does not exist")
    if not image_dir.is_dir():
        raise FileNotFoundError(f"SA-Co image folder {image_dir} does not exist")
    data_json = json.loads(ann_path.read_text())
    anns_by_pair: dict[Any, list[dict]] = defaultdict(list)
    for ann in data_json.get("annotations", []):
        anns_by_pair[ann["image_id"]].append(ann)
    pairs_by_file: dict[str, list[dict]] = {}
    for entry in data_json["images"]:
        pairs_by_file.setdefault(entry["file_name"], []).append(entry)
    skipped = 0
    with ShardSink(out_dir=out, prefix=prefix, max_count=max_count, max_size=max_size) as sink:
        items = list(pairs_by_file.items())
        for index, (file_name, entries) in enumerate(tqdm(items, desc=f"saco {ann_path.name}", disable=not progress)):
            try:
                data, ext, (width, height) = read_image_file(image_dir / file_name)
                queries = []
                for entry in entries:
                    if (int(entry["width"]), int(entry["height"])) != (width, height):
                        raise SampleError(f"{file_name}: file is {width}x{height}, pair {entry['id']} says "
                                          f"{entry['width']}x{entry['height']}")
                    try:
                        queries.append(saco_query(entry, anns_by_pair.get(entry["id"], []), width, height))
                    except (ValueError, KeyError, TypeError) as exn:
                        skipped += 1
                        log.warning("%s: skipped pair %s: %s", file_name, entry.get("id"), exn)
                meta = {
                    "image_id": entries[0]["id"],
                    "width": width,
                    "height": height,
                    "queries": queries,
                    "source": {"dataset": "saco", "file_name": file_name, "pair_ids": [e["id"] for e in entries]},
                }
                sink.write(make_key(index, Path(file_name).stem), data, ext, meta)
            except SampleError as exn:
                skipped += 1
                log.warning("skipped image %s: %s", file_name, exn)
    return {"pattern": sink.pattern if sink.count else None, "written": sink.count, "skipped": skipped}
