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


def test_exemplar_box_jitter_follows_meta():
    """Meta's RandomizeInputBbox (std 0.1 of the side, at most 20 px, clipped to the image), by hand."""
    from sam3_train.data.transforms import JitterExemplarBoxes

    image = torch.zeros(3, 100, 200, dtype=torch.uint8)
    boxes = torch.tensor([[10.0, 10.0, 110.0, 60.0], [190.0, 0.0, 200.0, 4.0]])  # 100 x 50, 10 x 4
    rng = random.Random(7)
    draws = random.Random(7)
    noise = torch.tensor([[draws.gauss(0.0, 0.1) for _ in range(4)] for _ in range(2)])
    _, target = JitterExemplarBoxes()(image, {"exemplar_boxes": boxes.clone()}, rng)
    expected = boxes + (noise * torch.tensor([[100.0, 50, 100, 50], [10, 4, 10, 4]])).clamp(-20, 20)
    expected = torch.minimum(expected.clamp(min=0), torch.tensor([200.0, 100, 200, 100]))
    torch.testing.assert_close(target["exemplar_boxes"], expected)
    # A move larger than 20 px is clipped: std 1 on a 100 px side.
    _, big = JitterExemplarBoxes(std=1.0)(image, {"exemplar_boxes": boxes[:1].clone()}, random.Random(0))
    assert (big["exemplar_boxes"] - boxes[:1]).abs().max() <= 20
    # A box the noise would leave without area keeps its corners; no jitter at std 0.
    class Leftwards:  # every draw -5 std: each corner moves 5 sides left / up, to the image border
        def gauss(self, mu, sigma):
            return -5.0 * sigma

    box = torch.tensor([[10.0, 10.0, 20.0, 20.0]])
    _, kept = JitterExemplarBoxes(std=1.0, max_pixels=None)(image, {"exemplar_boxes": box.clone()}, Leftwards())
    assert torch.equal(kept["exemplar_boxes"], box)  # all corners would clip to 0: no area
    _, same = JitterExemplarBoxes(std=0.0)(image, {"exemplar_boxes": boxes.clone()}, random.Random(0))
    assert torch.equal(same["exemplar_boxes"], boxes)
