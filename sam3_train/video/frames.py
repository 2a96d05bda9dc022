"""Video frames read one at a time from disk: a folder of images, or an animated GIF / WebP / PNG.

    source = open_frames("clip/")            # clip/00000.jpg, clip/00001.jpg, ... (natural order)
    for index, pixels in model_inputs(source, image_size=1008):   # [3, S, S] normalised, one at a time
        ...

Frames come through the image path's evaluation transform (SAM 3's square resize to S x S and
normalisation, :func:`sam3_train.data.transforms.eval_transforms`), so a frame reaches the detector
exactly as a still image would. Video files (.mp4, ...) need a decoder library; none is installed
with this project (the installed torchvision, 0.29, has no video reader any more; PyAV, torchcodec and
OpenCV are not dependencies), so they are refused with the command that extracts their frames.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageSequence

from sam3_train.data.decode import decode_image
from sam3_train.data.transforms import eval_transforms

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
ANIMATED_SUFFIXES = (".gif", ".webp", ".png")
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")


def _natural_key(path: Path) -> list[object]:
    """``frame2`` before ``frame10``: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


class FrameFolder:
    """The image files of a folder (JPG, PNG, BMP, WebP) in natural name order."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        files = [p for p in self.directory.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES]
        if not files:
            raise FileNotFoundError(
                f"{self.directory} holds no frames: put the video's frames there as JPG or PNG files named in "
                f"order (00000.jpg, 00001.jpg, ...), e.g. `ffmpeg -i video.mp4 {self.directory}/%05d.jpg`."
            )
        self.files = sorted(files, key=_natural_key)
        self.names = [p.name for p in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> np.ndarray:
        """Frame ``index`` as [H, W, 3] uint8 RGB."""
        return np.array(decode_image(self.files[index].read_bytes()))


class AnimatedImage:
    """The frames of an animated GIF, WebP or PNG, decoded by Pillow on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with Image.open(self.path) as image:
            self._length = int(getattr(image, "n_frames", 1))
        self.names = [f"{self.path.stem}-{i:05d}" for i in range(self._length)]

    def __len__(self) -> int:
        return self._length

    def read(self, index: int) -> np.ndarray:
        with Image.open(self.path) as image:
            frame = ImageSequence.Iterator(image)[index]
            return np.array(frame.convert("RGB"))


FrameSource = FrameFolder | AnimatedImage


def open_frames(path: str | Path) -> FrameSource:
    """A frame source for ``path``: a folder of frames or an animated image; anything else is refused."""
    path = Path(path)
    if path.is_dir():
        return FrameFolder(path)
    if not path.exists():
        raise FileNotFoundError(f"Video {path} does not exist: pass a folder of frames (JPG/PNG) or an animated GIF.")
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        raise ValueError(
            f"Cannot decode {path}: no video decoder (PyAV, torchcodec, OpenCV) is installed with sam3-train. "
            f"Extract its frames into a folder and pass that: `ffmpeg -i {path} frames/%05d.jpg`."
        )
    if suffix in ANIMATED_SUFFIXES:
        return AnimatedImage(path)
    raise ValueError(f"{path} is neither a folder of frames nor an animated image ({', '.join(ANIMATED_SUFFIXES)}).")


def frame_size(source: FrameSource) -> tuple[int, int]:
    """(height, width) of the first frame; every frame must have it."""
    height, width = source.read(0).shape[:2]
    return height, width


def to_model_input(frame: np.ndarray, image_size: int) -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, S, S] float32, normalised: the image path's evaluation transform."""
    image = torch.from_numpy(np.array(frame, dtype=np.uint8)).permute(2, 0, 1)  # a writable copy
    height, width = image.shape[-2:]
    empty = {"boxes": torch.zeros(0, 4), "exemplar_boxes": torch.zeros(0, 4),
             "masks": torch.zeros(0, height, width, dtype=torch.uint8)}
    pixels, _ = eval_transforms(image_size=image_size)(image, empty, random.Random(0))
    return pixels


def model_inputs(source: FrameSource, image_size: int, *,
                 limit: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(index, [3, S, S] normalised frame) for the first ``limit`` frames (all by default), read one
    at a time; a frame of another size than the first is refused, naming it."""
    expected = None
    for index in range(len(source) if limit is None else min(limit, len(source))):
        frame = source.read(index)
        if expected is None:
            expected = frame.shape[:2]
        elif frame.shape[:2] != expected:
            raise ValueError(f"Frame {source.names[index]} is {frame.shape[1]}x{frame.shape[0]} px, the first frame "
                             f"{expected[1]}x{expected[0]}: every frame of a video must have one size.")
        yield index, to_model_input(frame, image_size)
