"""Image files on disk, as the converters meet them: bytes, tar extension, size after EXIF orientation."""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image

from sam3_train.data.schema import IMAGE_EXTENSIONS, SampleError, image_extension

_EXIF_ORIENTATION = 0x0112
_TRANSPOSING = {5, 6, 7, 8}  # EXIF orientations that swap width and height


def oriented_size(data: bytes) -> tuple[int, int]:
    """(width, height) of encoded image bytes once EXIF orientation is applied; reads the header only."""
    with Image.open(io.BytesIO(data)) as img:
        w, h = img.size
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    return (h, w) if orientation in _TRANSPOSING else (w, h)


def read_image_file(path: str | os.PathLike) -> tuple[bytes, str, tuple[int, int]]:
    """An image file -> (bytes, tar extension, (width, height) after EXIF orientation).

    Raises SampleError naming the file when it is missing, not an image, or unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise SampleError(f"image file {path} does not exist")
    ext = image_extension(path.name)
    data = path.read_bytes()
    try:
        size = oriented_size(data)
    except Exception as exn:
        raise SampleError(f"image file {path} cannot be read ({type(exn).__name__}: {exn})") from None
    return data, ext, size


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Every image file under ``folder`` (recursive), sorted; FileNotFoundError for a missing folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    exts = {f".{e}" for e in IMAGE_EXTENSIONS} | {".jpeg"}
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in exts)
