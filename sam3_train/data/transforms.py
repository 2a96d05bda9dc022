"""Joint transforms on (image, target): every geometric change moves boxes, masks and exemplars too.

``image`` is [3, H, W] uint8 until :class:`Normalize` turns it into float; ``target`` is the dict of
:mod:`sam3_train.data.decode` (boxes / exemplar_boxes [., 4] absolute xyxy pixels, masks [N, H, W]
uint8 (or lazy :class:`RleMasks`, decoded by :class:`ResizePad` at its output size), queries with
phrases, size (h, w) of the content). Each transform takes an explicit
``random.Random`` so a worker's stream is reproducible from its seed.

SAM 3's recipes (Meta's train/eval configs): training resizes to a random *square* side drawn from
``range(min_size, S + 1, step)`` (aspect ratio not kept) and pads to S at a random offset; evaluation
resizes to S x S. ``square=False`` keeps the aspect ratio instead (longest side = the drawn size)
and, for evaluation, pads at the bottom right, which leaves the image untouched when S equals its
longest side.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from sam3_train.data.phrases import swap_left_right
from sam3_train.data.rle import RleMasks

Target = dict[str, Any]
IMAGE_MEAN = (0.5, 0.5, 0.5)  # SAM 3 (transformers' Sam3ImageProcessor): x / 255, then (x - 0.5) / 0.5
IMAGE_STD = (0.5, 0.5, 0.5)


class Compose:
    def __init__(self, transforms: Sequence[Any]):
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, target: Target, rng: random.Random) -> tuple[torch.Tensor, Target]:
        for t in self.transforms:
            image, target = t(image, target, rng)
        return image, target


class RandomHorizontalFlip:
    """Mirror with probability ``p``; "left" and "right" swap in every phrase."""

    def __init__(self, *, p: float = 0.5):
        self.p = p

    def __call__(self, image: torch.Tensor, target: Target, rng: random.Random) -> tuple[torch.Tensor, Target]:
        if rng.random() >= self.p:
            return image, target
        width = image.shape[-1]
        target = dict(target)
        for name in ("boxes", "exemplar_boxes"):
            b = target[name]
            target[name] = torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], dim=1)
        target["masks"] = as_mask_tensor(target["masks"]).flip(-1)
        if "offset" in target:  # content placed on a padded canvas: mirror its position too
            (top, left), (_, w) = target["offset"], target["size"]
            target["offset"] = (top, width - left - w)
        target["queries"] = [{**q, "phrase": swap_left_right(q["phrase"])} for q in target["queries"]]
        return image.flip(-1), target


class JitterExemplarBoxes:
    """Meta's ``RandomizeInputBbox``: each exemplar box's xyxy corners move by N(0, std) x its side
    (std 0.1 of the width for x, of the height for y), each move clipped to ``max_pixels``, the box
    clipped to the image; a box left with no area keeps its old corners. Training only, before the
    resize (the noise is in source pixels, as Meta's transform runs before ``RandomResizeAPI``).
    """

    def __init__(self, *, std: float = 0.1, max_pixels: float | None = 20.0):
        self.std, self.max_pixels = std, max_pixels

    def __call__(self, image: torch.Tensor, target: Target, rng: random.Random) -> tuple[torch.Tensor, Target]:
        boxes = target.get("exemplar_boxes")
        if self.std <= 0 or boxes is None or not len(boxes):
            return image, target
        h, w = image.shape[-2:]
        sides = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, dim=1)  # [M, 4] w h w h
        noise = torch.tensor([[rng.gauss(0.0, self.std) for _ in range(4)] for _ in range(len(boxes))]) * sides
        if self.max_pixels is not None:
            noise = noise.clamp(-self.max_pixels, self.max_pixels)
        limit = torch.tensor([w, h, w, h], dtype=boxes.dtype)
        moved = torch.minimum((boxes + noise).clamp(min=0), limit)
        area = (moved[:, 2] - moved[:, 0]) * (moved[:, 3] - moved[:, 1])
        target["exemplar_boxes"] = torch.where((area > 0)[:, None], moved, boxes)
        return image, target


class ColorJitter:
    """Brightness, contrast and saturation, each a factor drawn from [1 - x, 1 + x], in random order.

    No hue jitter: phrases name colours ("red star"), and a hue shift would falsify them. Only the
    content region (``target["size"]`` at ``target["offset"]``) changes, so padding stays black.
    All three are linear in the pixels and in their gray level g, so the random sequence is folded
    into one map ``x -> a x + b g + c`` applied once, in float on [0, 255]; the result is float.
    """

    def __init__(self, *, brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2):
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation

    def __call__(self, image: torch.Tensor, target: Target, rng: random.Random) -> tuple[torch.Tensor, Target]:
        ops = [(name, rng.uniform(1 - x, 1 + x)) for name, x in
               (("brightness", self.brightness), ("contrast", self.contrast), ("saturation", self.saturation)) if x > 0]
        if not ops:
            return image, target
        rng.shuffle(ops)
        h, w = target.get("size", image.shape[-2:])
        top, left = target.get("offset", (0, 0))
        x = image.float()
        content = x[:, top : top + h, left : left + w]  # a view: edited in place
        g0 = 0.299 * content[0] + 0.587 * content[1] + 0.114 * content[2]  # [h, w]
        g0_mean = float(g0.mean())
        a, b, c = 1.0, 0.0, 0.0  # x = a x0 + b g0 + c; its gray level is (a + b) g0 + c
        for name, f in ops:
            if name == "brightness":
                a, b, c = f * a, f * b, f * c
            elif name == "contrast":  # towards the mean gray level
                m = (a + b) * g0_mean + c
                a, b, c = f * a, f * b, f * c + (1 - f) * m
            else:  # saturation: towards the pixel's own gray level
                a, b = f * a, f * b + (1 - f) * (a + b)
        content.mul_(a).add_(g0.unsqueeze(0), alpha=b).add_(c).clamp_(0.0, 255.0)
        return x, target


class ResizePad:
    """Resize to a side drawn from ``sizes`` (square, or longest side when ``square=False``), pad to ``size``.

    Args:
        size: S, the padded square side of the output.
        min_size: smallest drawn side (scale jitter); None draws S only.
        step: spacing of the drawn sides, ``range(min_size, S + 1, step)`` plus S itself.
        square: SAM 3's square resize (aspect ratio not kept); False keeps the aspect ratio.
        random_offset: pad at a random offset (training) instead of at the bottom right.
    """

    def __init__(
        self, *, size: int, min_size: int | None = None, step: int = 32, square: bool = True, random_offset: bool = False
    ):
        if min_size is not None and not 0 < min_size <= size:
            raise ValueError(f"min_size must lie in (0, size={size}], got {min_size}")
        self.size = size
        self.sizes = sorted(set(range(min_size, size + 1, step)) | {size}) if min_size else [size]
        self.square = square
        self.random_offset = random_offset

    def __call__(self, image: torch.Tensor, target: Target, rng: random.Random) -> tuple[torch.Tensor, Target]:
        side = rng.choice(self.sizes) if len(self.sizes) > 1 else self.sizes[0]
        h, w = image.shape[-2:]
        if self.square:
            nh, nw = side, side
        else:
            scale = side / max(h, w)
            nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        target = dict(target)
        if (nh, nw) != (h, w):
            image = TF.resize(image, [nh, nw], antialias=True)
            scale_t = torch.tensor([nw / w, nh / h, nw / w, nh / h])
            target["boxes"] = target["boxes"] * scale_t
            target["exemplar_boxes"] = target["exemplar_boxes"] * scale_t
        target["masks"] = resize_masks(target["masks"], nh, nw)
        top = rng.randint(0, self.size - nh) if self.random_offset else 0
        left = rng.randint(0, self.size - nw) if self.random_offset else 0
        pad = [left, top, self.size - nw - left, self.size - nh - top]  # left, top, right, bottom
        if any(pad):
            image = TF.pad(image, pad, fill=0)
            target["masks"] = F.pad(target["masks"], (pad[0], pad[2], pad[1], pad[3]))
            shift = torch.tensor([left, top, left, top], dtype=torch.float32)
            target["boxes"] = target["boxes"] + shift
            target["exemplar_boxes"] = target["exemplar_boxes"] + shift
        target["size"] = (nh, nw)
        target["offset"] = (top, left)
        return image, target


def as_mask_tensor(masks: torch.Tensor | RleMasks) -> torch.Tensor:
    """Masks [n, h, w] uint8 as a tensor, decoding lazy RLE masks at their own size."""
    if isinstance(masks, RleMasks):
        return masks.resized(masks.height, masks.width)
    return masks


def resize_masks(masks: torch.Tensor | RleMasks, height: int, width: int) -> torch.Tensor:
    """Nearest-neighbour ("nearest-exact": pixel centres) resize of masks [n, h, w] -> [n, height, width].

    Lazy RLE masks decode straight at the new size; tensors go through a gather that reads only
    the kept pixels.
    """
    if isinstance(masks, RleMasks):
        return masks.resized(height, width)
    n, h, w = masks.shape
    if (h, w) == (height, width):
        return masks
    if n == 0:
        return masks.new_zeros((0, height, width))
    rows = ((torch.arange(height, dtype=torch.float64) + 0.5) * (h / height)).long().clamp_(max=h - 1)
    cols = ((torch.arange(width, dtype=torch.float64) + 0.5) * (w / width)).long().clamp_(max=w - 1)
    return masks[:, rows[:, None], cols[None, :]]


class Normalize:
    """[3, S, S] pixels in [0, 255] (uint8 or float) -> float32 (x / 255 - mean) / std, SAM 3's mean and std."""

    def __call__(self, image: torch.Tensor, target: Target, rng: random.Random) -> tuple[torch.Tensor, Target]:
        mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGE_STD).view(3, 1, 1)
        return (image.float() * (1.0 / 255.0) - mean) / std, target


def train_transforms(
    *,
    image_size: int,
    min_scale: float = 0.5,
    step: int = 32,
    square: bool = True,
    hflip: float = 0.5,
    color_jitter: float = 0.2,
    exemplar_box_noise: float = 0.1,
    exemplar_box_noise_max: float | None = 20.0,
) -> Compose:
    """SAM 3's training recipe at side ``image_size``: exemplar-box jitter, random square size, random
    pad, flip, colour jitter."""
    min_size = max(1, round(min_scale * image_size)) if min_scale < 1 else None
    # Resize first, while uint8 (torchvision's fast path) and before anything touches full-size masks;
    # a flip after a random-offset pad has the same distribution as one before it.
    ts: list[Any] = []
    if exemplar_box_noise > 0:
        ts.append(JitterExemplarBoxes(std=exemplar_box_noise, max_pixels=exemplar_box_noise_max))
    ts.append(ResizePad(size=image_size, min_size=min_size, step=step, square=square, random_offset=True))
    if hflip > 0:
        ts.append(RandomHorizontalFlip(p=hflip))
    if color_jitter > 0:
        ts.append(ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    ts.append(Normalize())
    return Compose(ts)


def eval_transforms(*, image_size: int, square: bool = True) -> Compose:
    """SAM 3's evaluation recipe: resize to ``image_size`` (square, or longest side + bottom-right pad)."""
    return Compose([ResizePad(size=image_size, square=square), Normalize()])
