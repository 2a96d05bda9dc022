"""Decoding one raw WebDataset sample into an image tensor and a target dict for the transforms.

The target (all in pixels of the decoded image, before any transform)::

    boxes           [N, 4]  float32, absolute xyxy; the instances of every kept query, concatenated
    masks           lazy :class:`~sam3_train.data.rle.RleMasks` [N, h, w] at the json's (height,
                    width), which equals the image's size unless JPEG drafting decoded it smaller;
                    ResizePad (in every transform recipe) decodes them on the output grid
    exemplar_boxes  [M, 4]  float32, absolute xyxy
    queries         list of {"phrase": str, "exhaustive": bool, "eval_exhaustive": bool,
                             "instances": list[int] (rows of boxes / masks),
                             "extra_sets": list of {"exhaustive": bool, "instances": list[int]}
                                           (other annotators' sets, SA-Co Gold),
                             "exemplars": list[int] (rows of exemplar_boxes),
                             "exemplar_labels": list[int] (1 positive, 0 negative)}
    size            (h, w) of the image content (the transforms keep it up to date)
    original_size   (H, W) of the image at full resolution (the json's, after EXIF orientation),
                    never changed by transforms: the frame predictions are mapped back to
    key             the sample key
    image_id        the json's ``image_id`` (the key when it has none)

Crowd instances are not targets. For training a query that has any is marked non-exhaustive, so
predictions on the crowd region are not punished (the Batch has no ignore regions); for SA-Co
scoring ``eval_exhaustive`` keeps the source's flag: Meta's evaluator ignores the crowd ground truth
but still scores the pair and all its predictions.
"""

from __future__ import annotations

import io
import json
import random
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageOps

from sam3_train.data import rle as rle_ops
from sam3_train.data.schema import IMAGE_EXTENSIONS, META_EXTENSION, SampleError, validate_meta

QuerySelector = Callable[[list[dict[str, Any]], random.Random], list[dict[str, Any]]]


def decode_image(data: bytes, *, draft_size: int | None = None) -> Image.Image:
    """Encoded bytes -> RGB PIL image with EXIF orientation applied.

    Grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit images all become 8-bit RGB.
    ``draft_size`` lets JPEG decode at a reduced scale (a power-of-two DCT shortcut) when the image
    is far larger than the size the transforms resize it to; sizes are reported after drafting.
    """
    img = Image.open(io.BytesIO(data))
    if draft_size is not None and img.format == "JPEG":
        img.draft("RGB", (draft_size, draft_size))
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        hi = max(float(arr.max()), 1.0)
        img = Image.fromarray((arr * (255.0 / (65535.0 if hi > 255 else 255.0))).clip(0, 255).astype(np.uint8))
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def split_raw(sample: dict[str, Any]) -> tuple[str, bytes, str, dict[str, Any]]:
    """A raw WebDataset sample -> (key, image bytes, image extension, validated meta)."""
    key = sample.get("__key__", "?")
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise SampleError(f"sample {key} has no image member (one of {', '.join(IMAGE_EXTENSIONS)})")
    if META_EXTENSION not in sample:
        raise SampleError(f"sample {key} has no .json member")
    try:
        meta = json.loads(sample[META_EXTENSION])
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise SampleError(f"sample {key}: invalid json ({exn})") from None
    return key, sample[ext], ext, validate_meta(meta)


def build_target(
    meta: dict[str, Any], queries: list[dict[str, Any]], *, image_height: int, image_width: int
) -> dict[str, Any]:
    """Target dict (see module docstring) for the chosen ``queries`` of ``meta``.

    Annotations live in the frame of ``meta``'s (width, height); when the decoded image is smaller
    (JPEG drafting) boxes are scaled to it and masks stay at annotation resolution (see above).
    """
    boxes, rles, ex_boxes, out_queries = [], [], [], []

    def add(instances: list[dict[str, Any]]) -> list[int]:
        """Rows of the non-crowd ``instances`` in ``boxes`` / ``rles`` (crowd regions are not targets)."""
        rows = []
        for inst in instances:
            if not inst.get("crowd", False):
                x, y, w, h = (float(v) for v in inst["box"])
                rows.append(len(boxes))
                boxes.append([x, y, x + w, y + h])
                rles.append(inst["rle"])
        return rows

    for q in queries:
        has_crowd = any(inst.get("crowd", False) for inst in q["instances"])
        inst_ids = add(q["instances"])
        extra_sets = [{"exhaustive": bool(s.get("exhaustive", True)), "instances": add(s.get("instances", []))}
                      for s in q.get("extra_sets", [])]
        ex_ids, ex_labels = [], []
        for ex in q.get("exemplars", []):
            x, y, w, h = (float(v) for v in ex["box"])
            ex_ids.append(len(ex_boxes))
            ex_boxes.append([x, y, x + w, y + h])
            ex_labels.append(1 if ex.get("positive", True) else 0)
        out_queries.append(
            {
                "phrase": q["phrase"],
                # Training reads a crowd pair as non-exhaustive (a crowd region may hold more instances);
                # SA-Co scoring (Meta's evaluator) ignores crowd regions but still scores the pair.
                "exhaustive": bool(q.get("exhaustive", True)) and not has_crowd,
                "eval_exhaustive": bool(q.get("exhaustive", True)),
                "instances": inst_ids,
                "extra_sets": extra_sets,
                "exemplars": ex_ids,
                "exemplar_labels": ex_labels,
            }
        )
    height, width = int(meta["height"]), int(meta["width"])
    masks = rle_ops.RleMasks(rles, height, width)  # lazy [N, H, W]: decoded at the transforms' output size
    box_t = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    ex_t = torch.tensor(ex_boxes, dtype=torch.float32).reshape(-1, 4)
    if (image_height, image_width) != (height, width):
        scale = torch.tensor([image_width / width, image_height / height] * 2)
        box_t, ex_t = box_t * scale, ex_t * scale
    box_t[:, 0::2] = box_t[:, 0::2].clamp(0, image_width)
    box_t[:, 1::2] = box_t[:, 1::2].clamp(0, image_height)
    return {
        "boxes": box_t,
        "masks": masks,
        "exemplar_boxes": ex_t,
        "queries": out_queries,
        "size": (image_height, image_width),
        "original_size": (height, width),
    }


def decode_sample(
    sample: dict[str, Any],
    *,
    select: QuerySelector | None = None,
    rng: random.Random | None = None,
    draft_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Raw sample -> (image [3, H, W] uint8, target). Raises on anything malformed.

    ``select(queries, rng)`` picks the queries to keep before any mask is decoded (train-time phrase
    sampling); None keeps all of them.
    """
    key, data, _, meta = split_raw(sample)
    try:
        img = decode_image(data, draft_size=draft_size)
    except Exception as exn:  # PIL raises many types for corrupt files
        raise SampleError(f"sample {key}: undecodable image ({type(exn).__name__}: {exn})") from None
    width, height = int(meta["width"]), int(meta["height"])
    got_w, got_h = img.size
    drafted = draft_size is not None and (got_w, got_h) != (width, height)
    # A drafted JPEG is smaller by one power-of-two factor in both sides; anything else disagrees.
    if (got_w, got_h) != (width, height) and not (drafted and abs(got_w / width - got_h / height) < 0.02):
        raise SampleError(f"sample {key}: image is {got_w}x{got_h}, its json says {width}x{height}")
    queries = meta["queries"] if select is None else select(meta["queries"], rng or random.Random())
    try:
        target = build_target(meta, queries, image_height=got_h, image_width=got_w)
    except (ValueError, TypeError, KeyError) as exn:
        raise SampleError(f"sample {key}: bad annotation ({exn})") from None
    target["key"] = key
    target["image_id"] = meta.get("image_id", key)
    image = torch.from_numpy(np.array(img)).permute(2, 0, 1)  # [3, H, W] uint8 (a channels-last view)
    return image, target
