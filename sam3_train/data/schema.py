"""The sample schema: one WebDataset sample per image, holding all of its noun-phrase queries.

A sample is two tar members sharing a key: the image bytes (``<key>.jpg`` / ``.png`` / ...) and
``<key>.json``::

    {"image_id": str | int, "width": int, "height": int,          # pixels, after EXIF orientation
     "queries": [{"phrase": str,
                  "exhaustive": bool,                               # default true
                  "instances": [{"box": [x, y, w, h],               # absolute pixels
                                 "rle": {"size": [h, w], "counts": str},
                                 "crowd": bool}],                   # optional, default false
                  "exemplars": [{"box": [x, y, w, h], "positive": bool}],
                  "extra_sets": [{"exhaustive": bool,               # optional: further annotators'
                                  "instances": [...]}]}],           # sets (evaluation only)
     "source": {...}}                                               # free-form provenance

A query with no instances and ``exhaustive: true`` is a negative phrase (the concept is absent).
``exhaustive: false`` says unmatched predictions are not errors (unlabelled or partly labelled).
``extra_sets`` (SA-Co Gold's annotators b and c; the query's own ``instances`` and ``exhaustive`` are
set a) are read by evaluation only: cgF1 scores the pair against every set and keeps the best.
Keys must not contain dots: WebDataset splits a member name at its first dot. Full description:
docs/data_format.md.
"""

from __future__ import annotations

import re
from typing import Any

IMAGE_EXTENSIONS = ("jpg", "png", "jpeg", "webp", "bmp", "tif", "tiff", "gif", "ppm")
META_EXTENSION = "json"
BOX_TOLERANCE = 1.0  # pixels a box may stick out of the image (rounding in source annotations)

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]+")


class SampleError(ValueError):
    """A sample that does not follow the schema; the reader skips and counts it."""


def make_key(index: int, name: str = "") -> str:
    """A shard key from a running index and a readable name: no dots, no slashes, unique by index."""
    stem = _KEY_UNSAFE.sub("_", name).strip("_")[:80]
    return f"{index:08d}_{stem}" if stem else f"{index:08d}"


def image_extension(file_name: str) -> str:
    """The tar extension for an image file name (``.jpeg`` -> ``jpg``); SampleError for non-images."""
    ext = file_name.rsplit(".", 1)[-1].lower() if "." in file_name else ""
    ext = "jpg" if ext == "jpeg" else ext
    if ext not in IMAGE_EXTENSIONS:
        raise SampleError(f"{file_name}: not an image extension we read ({', '.join(IMAGE_EXTENSIONS)})")
    return ext


def query(
    phrase: str,
    instances: list[dict[str, Any]] | None = None,
    *,
    exhaustive: bool = True,
    exemplars: list[dict[str, Any]] | None = None,
    extra_sets: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One query entry; ``instances`` are ``{"box": xywh, "rle": RLE, "crowd"?: bool}``; ``extra_sets``
    are further annotation sets of the same pair, ``{"exhaustive": bool, "instances": [...]}`` each."""
    entry: dict[str, Any] = {"phrase": phrase, "exhaustive": bool(exhaustive), "instances": list(instances or [])}
    if exemplars:
        entry["exemplars"] = list(exemplars)
    if extra_sets:
        entry["extra_sets"] = [
            {"exhaustive": bool(s.get("exhaustive", True)), "instances": list(s.get("instances") or [])} for s in extra_sets
        ]
    return entry


def _check_box(box: Any, width: int, height: int, what: str) -> None:
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise SampleError(f"{what}: box must be [x, y, w, h], got {box!r}")
    x, y, w, h = (float(v) for v in box)
    t = BOX_TOLERANCE
    if not (w >= 0 and h >= 0 and x >= -t and y >= -t and x + w <= width + t and y + h <= height + t):
        raise SampleError(f"{what}: box {list(box)} lies outside the {width}x{height} image")


def _check_instances(instances: Any, width: int, height: int, what: str) -> None:
    for ii, inst in enumerate(instances):
        where = f"{what} instance {ii}"
        if not isinstance(inst, dict) or "box" not in inst or "rle" not in inst:
            raise SampleError(f"{where} needs 'box' and 'rle'")
        _check_box(inst["box"], width, height, where)
        rle = inst["rle"]
        if not isinstance(rle, dict) or "counts" not in rle or "size" not in rle:
            raise SampleError(f"{where}: 'rle' must be {{'size': [h, w], 'counts': str}}")
        if [int(v) for v in rle["size"]] != [height, width]:
            raise SampleError(f"{where}: RLE size {rle['size']} differs from the image {[height, width]}")


def validate_meta(meta: Any) -> dict[str, Any]:
    """Check a decoded ``.json`` against the schema; returns it with defaults filled in.

    Raises SampleError naming the first problem: missing fields, boxes outside the image, RLE sizes
    that differ from the image size.
    """
    if not isinstance(meta, dict):
        raise SampleError(f"sample json must be an object, got {type(meta).__name__}")
    for field in ("width", "height", "queries"):
        if field not in meta:
            raise SampleError(f"sample json lacks {field!r}")
    width, height = int(meta["width"]), int(meta["height"])
    if width <= 0 or height <= 0:
        raise SampleError(f"bad image size {width}x{height}")
    if not isinstance(meta["queries"], list):
        raise SampleError("'queries' must be a list")
    for qi, q in enumerate(meta["queries"]):
        if not isinstance(q, dict) or not isinstance(q.get("phrase"), str) or not q["phrase"].strip():
            raise SampleError(f"query {qi} lacks a non-empty 'phrase'")
        q.setdefault("exhaustive", True)
        q.setdefault("instances", [])
        q.setdefault("exemplars", [])
        _check_instances(q["instances"], width, height, f"query {qi} ({q['phrase']!r})")
        extra_sets = q.get("extra_sets", [])
        if not isinstance(extra_sets, list):
            raise SampleError(f"query {qi} ({q['phrase']!r}): 'extra_sets' must be a list")
        for si, extra in enumerate(extra_sets):
            what = f"query {qi} ({q['phrase']!r}) extra set {si}"
            if not isinstance(extra, dict) or not isinstance(extra.setdefault("instances", []), list):
                raise SampleError(f"{what} must be {{'exhaustive': bool, 'instances': [...]}}")
            extra.setdefault("exhaustive", True)
            _check_instances(extra["instances"], width, height, what)
        for ei, ex in enumerate(q["exemplars"]):
            if not isinstance(ex, dict) or "box" not in ex:
                raise SampleError(f"query {qi} exemplar {ei} needs 'box'")
            _check_box(ex["box"], width, height, f"query {qi} exemplar {ei}")
    return meta


def is_negative(q: dict[str, Any]) -> bool:
    """An exhaustive query with no instances: the phrase names something absent from the image."""
    return bool(q.get("exhaustive", True)) and not q.get("instances")


def is_unlabelled(q: dict[str, Any]) -> bool:
    """A query without a target the objective can use: no instances and not exhaustive (it says
    neither present nor absent: a pseudo-label pair none of whose proposals verified), or crowd
    instances only (present, but nothing to match). SAM 3's presence loss would read either as
    absent, so training never samples them."""
    instances = q.get("instances") or []
    if any(not inst.get("crowd", False) for inst in instances):
        return False
    return bool(instances) or not bool(q.get("exhaustive", True))
