"""SAM 3's SA-Co style JSON -> shards: (image, noun phrase) pairs grouped into one sample per image.

In SA-Co files every ``images`` entry is one pair: ``file_name``, ``height``, ``width``,
``text_input`` (the phrase), ``is_instance_exhaustive`` (absent: true), optionally
``queried_category``; its ``annotations`` (matched by ``image_id``) carry ``bbox`` as *normalised*
xywh and ``segmentation`` as RLE (or polygons), ``iscrowd`` optional. A pair without annotations is
a negative (when exhaustive). Optional ``input_box`` (normalised xywh, one box or a list) with
``input_box_label`` (1 / 0) become exemplars, as Meta's loader reads them.

Several files may describe the same pairs (same ``id``, ``file_name`` and ``text_input``): SA-Co
Gold's three annotators, ``*_merged_a/b/c_release_test.json``, which Meta's ``CGF1Evaluator`` takes
as a ``gt_path`` list. The first file's annotations become each query's own ``instances`` and
``exhaustive`` (set a, which training reads); the others go to ``extra_sets`` in the order given,
for cgF1's best-of-sets scoring.

    python tools/make_shards.py saco --annotations saco_gold.json --images images/ --out DIR
    python tools/make_shards.py saco --annotations gold_x_merged_a_release_test.json \
        gold_x_merged_b_release_test.json gold_x_merged_c_release_test.json --images images/ --out DIR
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Sequence
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


def saco_instances(anns: list[dict[str, Any]], width: int, height: int) -> list[dict[str, Any]]:
    """A pair's SA-Co annotations -> schema instances (absolute boxes, compressed RLE, crowd flag)."""
    instances = []
    for ann in anns:
        inst: dict[str, Any] = {
            "box": _absolute(ann["bbox"], width, height),
            "rle": rle_ops.from_coco_segmentation(ann["segmentation"], height, width),
        }
        if ann.get("iscrowd", 0):
            inst["crowd"] = True
        instances.append(inst)
    return instances


def saco_query(
    entry: dict[str, Any],
    anns: list[dict[str, Any]],
    width: int,
    height: int,
    extra_sets: Sequence[tuple[dict[str, Any], list[dict[str, Any]]]] = (),
) -> dict[str, Any]:
    """One SA-Co pair -> schema query; ``extra_sets`` are the same pair's (entry, annotations) in
    further annotation files."""
    return query(
        str(entry["text_input"]),
        saco_instances(anns, width, height),
        exhaustive=bool(entry.get("is_instance_exhaustive", True)),
        exemplars=_exemplars(entry, width, height),
        extra_sets=[{"exhaustive": bool(e.get("is_instance_exhaustive", True)),
                     "instances": saco_instances(a, width, height)} for e, a in extra_sets],
    )


def _read_saco(path: Path) -> tuple[list[dict], dict[Any, list[dict]]]:
    """An SA-Co file -> (its ``images`` entries, {pair id: annotations})."""
    data_json = json.loads(path.read_text())
    anns_by_pair: dict[Any, list[dict]] = defaultdict(list)
    for ann in data_json.get("annotations", []):
        anns_by_pair[ann["image_id"]].append(ann)
    return data_json["images"], anns_by_pair


def _check_same_pairs(first: Path, pairs: dict[Any, dict], other: Path, other_pairs: dict[Any, dict]) -> None:
    """Refuse annotation sets that do not describe the same (image, phrase) pairs."""
    missing = [i for i in pairs if i not in other_pairs]
    extra = [i for i in other_pairs if i not in pairs]
    if missing or extra:
        raise ValueError(
            f"{other} and {first} do not describe the same pairs: {len(missing)} pair ids of the first are "
            f"missing from it (first few: {missing[:3]}), {len(extra)} of its pair ids are not in the first "
            f"(first few: {extra[:3]}). Pass the annotation sets of one subset together (SA-Co Gold: its a, b "
            "and c files)."
        )
    for i, entry in pairs.items():
        theirs = other_pairs[i]
        for field in ("file_name", "text_input"):
            if entry.get(field) != theirs.get(field):
                raise ValueError(f"pair {i} has {field} {entry.get(field)!r} in {first} but {theirs.get(field)!r} "
                                 f"in {other}: the files do not describe the same pairs")


def convert_saco(
    *,
    annotations: str | os.PathLike | Sequence[str | os.PathLike],
    images: str | os.PathLike,
    out: str | os.PathLike,
    prefix: str = "saco",
    max_count: int = DEFAULT_MAX_COUNT,
    max_size: int = DEFAULT_MAX_SIZE,
    progress: bool = True,
) -> dict[str, Any]:
    """Write shards for an SA-Co style file, or several annotation sets of the same pairs (the first
    one's are the queries' own, the others ``extra_sets``); returns {"pattern", "written", "skipped"}.

    Pairs that share a ``file_name`` become the queries of one sample, in the first file's order.
    """
    paths = [Path(annotations)] if isinstance(annotations, (str, os.PathLike)) else [Path(a) for a in annotations]
    if not paths:
        raise ValueError("convert_saco needs at least one SA-Co annotation file")
    image_dir = Path(images)
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"SA-Co annotation file {path} does not exist")
    if not image_dir.is_dir():
        raise FileNotFoundError(f"SA-Co image folder {image_dir} does not exist")
    entries_a, anns_by_pair = _read_saco(paths[0])
    pairs = {entry["id"]: entry for entry in entries_a}
    others = []  # per further file: ({pair id: entry}, {pair id: annotations})
    for path in paths[1:]:
        other_entries, other_anns = _read_saco(path)
        others.append(({entry["id"]: entry for entry in other_entries}, other_anns))
        _check_same_pairs(paths[0], pairs, path, others[-1][0])
    pairs_by_file: dict[str, list[dict]] = {}
    for entry in entries_a:
        pairs_by_file.setdefault(entry["file_name"], []).append(entry)
    skipped = 0
    with ShardSink(out_dir=out, prefix=prefix, max_count=max_count, max_size=max_size) as sink:
        items = list(pairs_by_file.items())
        for index, (file_name, entries) in enumerate(tqdm(items, desc=f"saco {paths[0].name}", disable=not progress)):
            try:
                data, ext, (width, height) = read_image_file(image_dir / file_name)
                queries = []
                for entry in entries:
                    if (int(entry["width"]), int(entry["height"])) != (width, height):
                        raise SampleError(f"{file_name}: file is {width}x{height}, pair {entry['id']} says "
                                          f"{entry['width']}x{entry['height']}")
                    extra = [(by_id[entry["id"]], anns.get(entry["id"], [])) for by_id, anns in others]
                    try:
                        queries.append(saco_query(entry, anns_by_pair.get(entry["id"], []), width, height, extra))
                    except (ValueError, KeyError, TypeError) as exn:
                        skipped += 1
                        log.warning("%s: skipped pair %s: %s", file_name, entry.get("id"), exn)
                source = {"dataset": "saco", "file_name": file_name, "pair_ids": [e["id"] for e in entries]}
                if others:
                    source["annotation_files"] = [path.name for path in paths]
                meta = {"image_id": entries[0]["id"], "width": width, "height": height, "queries": queries,
                        "source": source}
                sink.write(make_key(index, Path(file_name).stem), data, ext, meta)
            except SampleError as exn:
                skipped += 1
                log.warning("skipped image %s: %s", file_name, exn)
    return {"pattern": sink.pattern if sink.count else None, "written": sink.count, "skipped": skipped}
