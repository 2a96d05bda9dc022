"""A review set (review.json) <-> Label Studio tasks, and reviewers' annotations -> an edited review.json.

    tasks = review_tasks(coco, image_url=lambda file_name: ...)   # one task per exported (image, phrase) pair
    edited, counts = reviewed_coco(coco, tasks_from_the_server)    # then review.import_review / import_round

The edited review.json follows :mod:`sam3_train.engine.review`'s editing conventions, so importing it
goes through the one import path the COCO round trip uses:
  - only pairs whose task has a submitted (not skipped) annotation are in it: pairs nobody reviewed
    are left untouched; of several annotations of a task the latest counts;
  - a brush region is a label unless its per-region ``status`` choice is ``rejected``; a deleted
    region is a removed label; a region's brush label is its phrase;
  - a region whose mask is pixel-equal to an exported annotation's keeps that annotation's
    segmentation and box (as exported), so an unedited task imports as no change; an edited or
    added mask gets its mask's tight box;
  - the task's ``exhaustive`` choice sets the pair's exhaustivity (absent: the exported value).

Masks travel as Label Studio's brush RLE (its own format: run-length bits of an RGBA image),
encoded and decoded by label_studio_sdk's ``converter.brush`` helpers; brush keeps a mask exact
where polygons would approximate it.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from label_studio_sdk.converter import brush

from sam3_train.data import rle as rle_ops
from sam3_train.engine.label_studio.config import (
    COMPLETE,
    EXHAUSTIVE,
    IMAGE,
    INCOMPLETE,
    KEPT,
    MASK,
    REJECTED,
    STATUS,
)

MODEL_VERSION = "sam3-train-review"  # the predictions' model version: the project pre-labels from it
PAIR = "sam3_train_pair"  # task data field: the review.json image entry id of the task's pair


# ------------------------------------------------------------------------------------------------ masks
def mask_to_brush(mask: np.ndarray) -> list[int]:
    """A [H, W] mask (non-zero is on) -> Label Studio brush RLE (RGBA, 255 in every channel where on)."""
    if mask.ndim != 2:
        raise ValueError(f"mask_to_brush expects one [H, W] mask, got shape {mask.shape}")
    return [int(v) for v in brush.mask2rle((mask != 0).astype(np.uint8) * 255)]


def brush_to_mask(rle: list[int], height: int, width: int) -> np.ndarray:
    """Label Studio brush RLE -> [H, W] bool. The editor paints the alpha channel; a pixel is on at
    alpha >= 128 (the editor's brush is opaque: anti-aliased edges, if any, count when half covered)."""
    flat = brush.decode_rle(rle)
    if flat.size != height * width * 4:
        raise ValueError(f"a brush mask of {flat.size // 4} pixels does not fit a {width} x {height} image")
    return flat.reshape(height, width, 4)[:, :, 3] >= 128


def brush_region(mask: np.ndarray, label: str, *, region_id: str, from_name: str = MASK, to_name: str = IMAGE,
                 score: float | None = None) -> dict[str, Any]:
    """One brushlabels result (a region) of ``mask`` [H, W] labelled ``label``."""
    height, width = mask.shape
    region = {"id": region_id, "from_name": from_name, "to_name": to_name, "type": "brushlabels",
              "original_width": int(width), "original_height": int(height), "image_rotation": 0,
              "value": {"format": "rle", "rle": mask_to_brush(mask), "brushlabels": [label]}}
    if score is not None:
        region["score"] = float(score)
    return region


def _choice(name: str, value: str, region_id: str) -> dict[str, Any]:
    return {"id": region_id, "from_name": name, "to_name": IMAGE, "type": "choices", "value": {"choices": [value]}}


# ------------------------------------------------------------------------------------------------ export
def _by_image(coco: dict[str, Any]) -> dict[Any, list[dict[str, Any]]]:
    grouped = defaultdict(list)
    for ann in sorted(coco.get("annotations", []), key=lambda a: a["id"]):
        grouped[ann["image_id"]].append(ann)
    return grouped


def review_tasks(coco: dict[str, Any], *, image_url: Callable[[str], str]) -> list[dict[str, Any]]:
    """One Label Studio task per image entry of a review set, its annotations as one prediction.

    Args:
        coco: review.json (:func:`sam3_train.engine.review.export_review`).
        image_url: an entry's ``file_name`` (relative to the review folder) -> the URL the server
            serves it at (client.local_files_url).
    Returns: tasks ``{"data": {"image", "phrase", "flags", "sam3_train_pair", "sam3_train_key"},
        "predictions": [{"model_version", "score", "result"}]}``: per annotation a brush region
        (``a<annotation id>``, its detector score kept) and its status choice; the pair's exhaustivity.
        The prediction's score is the pair's highest instance score (0 without instances).
    """
    names = {c["id"]: c["name"] for c in coco.get("categories", [])}
    annotations = _by_image(coco)
    tasks = []
    for entry in coco.get("images", []):
        extra = entry["sam3_train"]
        height, width = int(entry["height"]), int(entry["width"])
        result, scores = [], []
        for ann in annotations[entry["id"]]:
            mask = rle_ops.decode(rle_ops.from_coco_segmentation(ann["segmentation"], height, width))
            region_id = f"a{ann['id']}"
            score = ann.get("score")
            result.append(brush_region(mask, names[ann["category_id"]], region_id=region_id, score=score))
            result.append(_choice(STATUS, (ann.get("sam3_train") or {}).get("status", KEPT), region_id))
            scores.append(float(score) if score is not None else 0.0)
        result.append(_choice(EXHAUSTIVE, COMPLETE if extra.get("exhaustive", True) else INCOMPLETE, EXHAUSTIVE))
        flags = ", ".join(extra.get("flags", []))
        tasks.append({
            "data": {"image": image_url(entry["file_name"]), "phrase": extra["phrase"],
                     "flags": f"flags: {flags}" if flags else "no flags", PAIR: entry["id"],
                     "sam3_train_key": extra["key"]},
            "predictions": [{"model_version": MODEL_VERSION, "score": max(scores, default=0.0), "result": result}],
        })
    return tasks


# ------------------------------------------------------------------------------------------------ import
def latest_annotation(task: dict[str, Any]) -> dict[str, Any] | None:
    """The task's latest submitted annotation (skipped ones, ``was_cancelled``, do not count)."""
    done = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    return max(done, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id", 0)),
               default=None)


def reviewed_coco(coco: dict[str, Any], tasks: Iterable[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, int]]:
    """The reviewers' decisions as an edited review.json (the module docstring's conventions).

    Args:
        coco: the exported review.json the tasks were made from.
        tasks: the project's tasks as the server returns them (``data``, ``annotations``).
    Returns: (the edited review.json with the reviewed pairs only; counts ``{"tasks", "reviewed",
        "labels", "rejected", "added", "edited"}``). Raises ValueError naming a task that does not
        belong to this review set or a region that does not fit it.
    """
    entries = {e["id"]: e for e in coco.get("images", [])}
    categories = {c["name"]: c["id"] for c in coco.get("categories", [])}
    exported = _by_image(coco)
    images, annotations = [], []
    counts = dict.fromkeys(("tasks", "reviewed", "labels", "rejected", "added", "edited"), 0)
    for task in sorted(tasks, key=lambda t: t["data"].get(PAIR, -1)):
        counts["tasks"] += 1
        annotation = latest_annotation(task)
        if annotation is None:
            continue
        entry = entries.get(task["data"].get(PAIR))
        if entry is None or entry["sam3_train"]["key"] != task["data"].get("sam3_train_key"):
            raise ValueError(f"Label Studio task {task.get('id')}: pair {task['data'].get(PAIR)!r} is not in this "
                             "review set (import from the project this review folder was exported to)")
        counts["reviewed"] += 1
        height, width = int(entry["height"]), int(entry["width"])
        entry = copy.deepcopy(entry)
        status, regions = {}, []
        for item in annotation.get("result") or []:
            if item.get("from_name") == EXHAUSTIVE and item["value"].get("choices"):
                entry["sam3_train"]["exhaustive"] = item["value"]["choices"][0] == COMPLETE
            elif item.get("from_name") == STATUS and item["value"].get("choices"):
                status[item.get("id")] = item["value"]["choices"][0]
            elif item.get("type") == "brushlabels":
                regions.append(item)
        images.append(entry)
        originals = [(a, rle_ops.decode(rle_ops.from_coco_segmentation(a["segmentation"], height, width)).astype(bool))
                     for a in exported[entry["id"]]]
        for item in regions:
            labels = item["value"].get("brushlabels") or []
            if len(labels) != 1 or labels[0] not in categories:
                raise ValueError(f"Label Studio task {task.get('id')}, region {item.get('id')}: label {labels} is not "
                                 f"one phrase of the review set ({sorted(categories)})")
            mask = brush_to_mask(item["value"]["rle"], height, width)
            if not mask.any():
                continue  # an empty brush stroke labels nothing
            same = [a for a, m in originals if np.array_equal(m, mask)]
            same.sort(key=lambda a: f"a{a['id']}" != item.get("id"))  # its own exported annotation first
            ann: dict[str, Any] = {"id": len(annotations) + 1, "image_id": entry["id"],
                                   "category_id": categories[labels[0]], "iscrowd": 0}
            if same:
                keep = same[0]
                ann.update(segmentation=keep["segmentation"], bbox=keep["bbox"], area=keep["area"])
                for field in ("score", "sam3_train"):
                    if field in keep:
                        ann[field] = copy.deepcopy(keep[field])
            else:
                rle = rle_ops.encode(mask.astype(np.uint8))
                ann.update(segmentation=rle, bbox=rle_ops.to_xywh(rle), area=int(mask.sum()))
                redrawn = any(f"a{a['id']}" == item.get("id") for a, _ in originals)  # an exported region
                counts["edited" if redrawn else "added"] += 1
            rejected = status.get(item.get("id")) == REJECTED
            extra = ann.setdefault("sam3_train", {"key": entry["sam3_train"]["key"], "phrase": labels[0]})
            extra["phrase"], extra["status"] = labels[0], REJECTED if rejected else KEPT
            counts["rejected" if rejected else "labels"] += 1
            annotations.append(ann)
    edited_coco = {"images": images, "annotations": annotations, "categories": copy.deepcopy(coco.get("categories", [])),
                   "info": {"description": "sam3-train data-engine review set, as reviewed in Label Studio"}}
    return edited_coco, counts
