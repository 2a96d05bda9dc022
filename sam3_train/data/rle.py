"""COCO run-length encoding of binary masks, in the one form our shards store.

Shards hold every mask as compressed COCO RLE ``{"size": [h, w], "counts": str}`` (``counts`` as a
string, so it is plain JSON). Sources may give polygons, uncompressed RLE (``counts`` a list of
ints) or compressed RLE with ``counts`` as bytes or str; :func:`from_coco_segmentation` takes them all.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

RLE = dict[str, Any]  # {"size": [h, w], "counts": str}


def encode(mask: np.ndarray) -> RLE:
    """Binary mask [H, W] (any dtype, non-zero is on) -> RLE with string counts."""
    if mask.ndim != 2:
        raise ValueError(f"encode expects one [H, W] mask, got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _to_pycoco(rle: RLE) -> dict:
    """Our RLE (or one with bytes / list counts) -> what ``pycocotools.mask.decode`` accepts."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE
        return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    if not isinstance(counts, bytes):
        raise ValueError(f"RLE counts must be str, bytes or a list of ints, got {type(counts).__name__}")
    return {"size": [h, w], "counts": counts}


def decode(rle: RLE) -> np.ndarray:
    """RLE -> mask [H, W] uint8 in {0, 1}. Raises ValueError when the counts do not fill the mask."""
    return decode_many([rle], *rle["size"])[0]


def decode_many(rles: list[RLE], height: int, width: int) -> np.ndarray:
    """A list of RLEs of one image -> masks [n, H, W] uint8 in {0, 1} (n may be 0).

    The result is a transposed view of pycocotools' column-major output (not C-contiguous): copying
    full-resolution masks costs more than the resize that usually follows, which reads only what it keeps.
    """
    if not rles:
        return np.zeros((0, height, width), dtype=np.uint8)
    objs = []
    for rle in rles:
        if [int(v) for v in rle["size"]] != [height, width]:
            raise ValueError(f"RLE size {rle['size']} differs from the image size {[height, width]}")
        obj = _to_pycoco(rle)
        objs.append(obj)
        _check_counts(obj, height * width)
    masks = mask_utils.decode(objs)  # [H, W, n], Fortran order
    return masks.transpose(2, 0, 1)


def _check_counts(obj: dict, num_pixels: int) -> None:
    # pycocotools decodes a short or overlong counts string without complaint (it zero-fills or
    # overruns); the run lengths must add up to the pixel count exactly.
    counts = obj["counts"]
    if isinstance(counts, list):
        total = sum(counts)
    else:
        total = _sum_compressed_runs(counts)
    if total != num_pixels:
        raise ValueError(f"RLE runs cover {total} pixels, the mask has {num_pixels}")


def _sum_compressed_runs(counts: bytes) -> int:
    """Sum of run lengths in COCO's compressed counts string."""
    return int(compressed_runs(counts).sum())


def compressed_runs(counts: bytes) -> np.ndarray:
    """Run lengths [m] int64 of COCO's compressed counts string (zeros first), vectorised.

    The format: numbers of 5-bit groups (6 bits per char, offset 48; bit 0x20 continues the number,
    bit 0x10 of the last char is the sign); from the fourth number on, each is a delta to the number
    two places before. pycocotools decodes without bounds checks, so this must hold before decoding.
    """
    if not counts:
        return np.zeros(0, dtype=np.int64)
    c = np.frombuffer(counts, dtype=np.uint8).astype(np.int64) - 48
    if ((c < 0) | (c > 63)).any():
        raise ValueError("RLE counts hold an invalid character")
    more = (c & 0x20) != 0
    if more[-1]:
        raise ValueError("RLE counts string ends inside a number")
    ends = np.flatnonzero(~more)  # last char of each number
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > 10:
        raise ValueError("RLE counts hold a number too long to be a run length")
    number = np.repeat(np.arange(len(ends)), lengths)
    shift = 5 * (np.arange(len(c)) - starts[number])
    values = np.bincount(number, weights=((c & 0x1F) << shift).astype(np.float64)).astype(np.int64)
    negative = (c[ends] & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * lengths[negative])
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])  # runs[m] = x[m] + runs[m - 2] for m > 2
    runs[2::2] = np.cumsum(values[2::2])
    if (runs < 0).any():
        raise ValueError("RLE counts hold a negative run length")
    return runs


def from_coco_segmentation(segmentation: Any, height: int, width: int) -> RLE:
    """A COCO ``segmentation`` (polygons, uncompressed RLE or compressed RLE) -> RLE with str counts."""
    if isinstance(segmentation, list):
        if not segmentation or any(len(poly) < 6 or len(poly) % 2 for poly in segmentation):
            raise ValueError("a COCO polygon needs at least 3 points given as flat [x0, y0, x1, y1, ...]")
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        rle = _to_pycoco({"size": segmentation.get("size", [height, width]), "counts": segmentation["counts"]})
        if [int(v) for v in rle["size"]] != [height, width]:
            raise ValueError(f"RLE size {rle['size']} differs from the image size {[height, width]}")
        _check_counts(rle, height * width)
    else:
        raise ValueError(f"unknown segmentation format: {type(segmentation).__name__}")
    counts = rle["counts"]
    return {"size": [height, width], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def to_xywh(rle: RLE) -> list[float]:
    """Tight box of the mask in absolute pixel xywh ([0, 0, 0, 0] for an empty mask)."""
    return [float(v) for v in mask_utils.toBbox(_to_pycoco(rle))]


class RleMasks:
    """Masks of one image kept as RLE until their output size is known (a lazy [n, H, W] stack).

    Decoding full-resolution masks and shrinking them costs more than decoding a photo; ``resized``
    samples each output pixel centre straight from the runs (nearest-exact): its cost grows with the
    output size and the number of runs, not with the source resolution. Counts are parsed and checked here, so a bad RLE fails when the sample is read.
    """

    def __init__(self, rles: list[RLE], height: int, width: int):
        self.height, self.width = height, width
        self._runs = []
        for rle in rles:
            if [int(v) for v in rle["size"]] != [height, width]:
                raise ValueError(f"RLE size {rle['size']} differs from the image size {[height, width]}")
            runs = _runs_of(rle)
            if int(runs.sum()) != height * width:
                raise ValueError(f"RLE runs cover {int(runs.sum())} pixels, the mask has {height * width}")
            self._runs.append(runs)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self._runs), self.height, self.width)

    def resized(self, out_height: int, out_width: int) -> torch.Tensor:
        """Masks [n, out_height, out_width] uint8 tensor, nearest-exact from the (height, width) grid."""
        n, h, w = self.shape
        if n == 0:
            return torch.zeros((0, out_height, out_width), dtype=torch.uint8)
        rows = np.minimum(((np.arange(out_height) + 0.5) * (h / out_height)).astype(np.int64), h - 1)
        cols = np.minimum(((np.arange(out_width) + 0.5) * (w / out_width)).astype(np.int64), w - 1)
        # Upsampling repeats rows or columns: sample each distinct one once, expand at the end.
        rows_u, rows_inv = np.unique(rows, return_inverse=True)
        cols_u, cols_inv = np.unique(cols, return_inverse=True)
        where = (cols_u[:, None] * h + rows_u[None, :]).ravel()  # column-major pixel indices, ascending
        q = len(where)
        # A sample's value is the parity of the number of run ends at or before it. Each run end
        # toggles every sample from the first one at or after it: place the toggles, then a running XOR.
        ends = np.concatenate([np.cumsum(r) for r in self._runs])
        mask_id = np.repeat(np.arange(n), [len(r) for r in self._runs])
        first = np.searchsorted(where, ends, side="left")
        toggles = np.bincount(mask_id * (q + 1) + first, minlength=n * (q + 1)).reshape(n, q + 1)[:, :q]
        # Running parity: a uint8 cumulative sum (wrapping keeps parity; torch's is ~7x numpy's XOR here).
        values = torch.cumsum(torch.from_numpy((toggles & 1).astype(np.uint8)), dim=1, dtype=torch.uint8) & 1
        values = values.view(n, len(cols_u), len(rows_u)).transpose(1, 2)  # [n, rows, cols]
        if len(rows_u) != out_height or len(cols_u) != out_width:
            values = values[:, torch.from_numpy(rows_inv)[:, None], torch.from_numpy(cols_inv)[None, :]]
        return values.contiguous()


def _runs_of(rle: RLE) -> np.ndarray:
    counts = rle["counts"]
    if isinstance(counts, list):
        return np.asarray(counts, dtype=np.int64)
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    if not isinstance(counts, bytes):
        raise ValueError(f"RLE counts must be str, bytes or a list of ints, got {type(counts).__name__}")
    return compressed_runs(counts)
