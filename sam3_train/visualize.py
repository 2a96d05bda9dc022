"""Mask overlays: label maps for W&B and blended PNG pictures for people.

Images come from ``Batch.images`` (normalised with SAM 3's mean/std 0.5) or as uint8 arrays.
"""

from __future__ import annotations

import colorsys

import numpy as np
import torch
from PIL import Image, ImageDraw


def slug(phrase: str) -> str:
    """A phrase as a file-name part: alphanumerics kept, everything else ``_``, at most 60 characters."""
    return "".join(ch if ch.isalnum() else "_" for ch in phrase)[:60]


def denormalise(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] normalised (mean = std = 0.5) -> [H, W, 3] uint8."""
    pixels = (image.detach().float().cpu() * 0.5 + 0.5).clamp(0, 1)
    return (pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def label_map(masks: torch.Tensor) -> np.ndarray:
    """[n, H, W] bool -> [H, W] int: instance i painted as i + 1, later instances on top (wandb's format)."""
    if masks.ndim != 3:
        raise ValueError(f"label_map takes [n, H, W] masks, got shape {tuple(masks.shape)}")
    out = np.zeros(masks.shape[-2:], dtype=np.int32)
    for i, mask in enumerate(masks.detach().cpu().numpy().astype(bool)):
        out[mask] = i + 1
    return out


def palette(n: int) -> list[tuple[int, int, int]]:
    """n well-separated colours (golden-ratio hues)."""
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 1.0)) for i in range(n)]


def overlay(
    image: np.ndarray,
    masks: torch.Tensor,
    *,
    boxes: torch.Tensor | None = None,
    labels: list[str] | None = None,
    alpha: float = 0.5,
) -> Image.Image:
    """Blend [n, H, W] masks over an [H, W, 3] uint8 image; draw xyxy pixel boxes and labels if given."""
    canvas = image.astype(np.float32).copy()
    colours = palette(len(masks))
    for mask, colour in zip(masks.detach().cpu().numpy().astype(bool), colours):
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * np.asarray(colour, dtype=np.float32)
    picture = Image.fromarray(canvas.round().clip(0, 255).astype(np.uint8))
    if boxes is not None:
        draw = ImageDraw.Draw(picture)
        for i, (box, colour) in enumerate(zip(boxes.detach().cpu().tolist(), colours)):
            draw.rectangle(box, outline=colour, width=2)
            if labels:
                draw.text((box[0] + 2, box[1] + 1), labels[i], fill=colour)
    return picture
