"""Image decoding: EXIF orientation and every common mode to 8-bit RGB; JPEG draft keeps annotations aligned."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from sam3_train.data import rle as rle_ops
from sam3_train.data.decode import decode_image, decode_sample
from sam3_train.data.image_files import oriented_size
from sam3_train.data.schema import query
from sam3_train.data.transforms import eval_transforms


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_exif_orientation_is_applied():
    # A 40 x 20 picture, stored rotated: EXIF orientation 6 means "rotate 90 degrees clockwise to view".
    view = np.zeros((20, 40, 3), dtype=np.uint8)
    view[:, :10] = (250, 0, 0)  # red band on the left of what a viewer shows
    stored = Image.fromarray(view).transpose(Image.Transpose.ROTATE_90)  # 20 wide, 40 high on disk
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(stored, "PNG", exif=exif.tobytes())
    assert oriented_size(data) == (40, 20)
    img = np.asarray(decode_image(data))
    assert img.shape == (20, 40, 3)
    assert img[:, :10, 0].min() > 200 and img[:, 12:, 0].max() < 50


@pytest.mark.parametrize(
    "mode, fmt",
    [("L", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("I;16", "PNG"), ("CMYK", "JPEG"), ("1", "PNG")],
)
def test_modes_become_rgb(mode, fmt):
    base = Image.fromarray(np.tile(np.linspace(0, 255, 16, dtype=np.uint8), (8, 1)))  # a horizontal ramp
    if mode == "I;16":
        img = Image.fromarray((np.asarray(base, dtype=np.uint16) * 257).astype(np.uint16))
    else:
        img = base.convert(mode)
    out = np.asarray(decode_image(_encode(img, fmt)))
    assert out.shape == (8, 16, 3) and out.dtype == np.uint8
    gray = out.mean(axis=2)
    assert gray[:, -1].mean() > gray[:, 0].mean() + 100  # still a ramp, not garbage or black


def test_draft_decoding_keeps_masks_and_boxes_aligned():
    # A 1200 x 800 JPEG with a white rectangle; read for S = 224, JPEG decodes at 1/2 (600 x 400).
    h, w = 800, 1200
    pixels = np.zeros((h, w, 3), dtype=np.uint8)
    pixels[200:600, 300:900] = 255
    mask = np.zeros((h, w), dtype=bool)
    mask[200:600, 300:900] = True
    rle = rle_ops.encode(mask)
    meta = {"width": w, "height": h, "queries": [query("box", [{"box": rle_ops.to_xywh(rle), "rle": rle}])]}
    sample = {"__key__": "k", "jpg": _encode(Image.fromarray(pixels), "JPEG", quality=95), "json": json.dumps(meta).encode()}
    image, target = decode_sample(sample, draft_size=224)
    assert image.shape == (3, 400, 600)  # drafted
    assert torch.allclose(target["boxes"], torch.tensor([[150.0, 100.0, 450.0, 300.0]]))
    assert target["original_size"] == (800, 1200)  # the full-resolution frame, for mapping predictions back
    image, target = eval_transforms(image_size=224, square=False)(image, target, random.Random(0))
    m = target["masks"][0].bool()
    assert m.shape == (224, 224) and m.sum() > 0
    bright = image.mean(0) > 0.5
    assert (m == bright).float().mean() > 0.99  # the mask lies on the white pixels
