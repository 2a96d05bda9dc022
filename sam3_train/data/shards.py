"""Writing shards (WebDataset's ShardWriter) and resolving shard patterns before training starts.

    with ShardSink(out_dir="datasets/coco/shards/train", prefix="coco") as sink:
        sink.write(key, image_bytes, "jpg", meta)
    sink.pattern   # "datasets/coco/shards/train/coco-{000000..000003}.tar"
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import webdataset as wds

from sam3_train.data.schema import IMAGE_EXTENSIONS, SampleError

DEFAULT_MAX_COUNT = 1000  # samples per shard
DEFAULT_MAX_SIZE = 1 << 30  # bytes per shard


class ShardSink:
    """Writes samples into numbered tar shards ``{out_dir}/{prefix}-%06d.tar``.

    A new shard starts after ``max_count`` samples or ``max_size`` bytes. Member times are fixed
    (mtime 0) so the same input gives byte-identical shards.
    """

    def __init__(
        self,
        *,
        out_dir: str | os.PathLike,
        prefix: str = "shard",
        max_count: int = DEFAULT_MAX_COUNT,
        max_size: int = DEFAULT_MAX_SIZE,
    ):
        if "." in prefix or "/" in prefix:
            raise ValueError(f"shard prefix {prefix!r} must not contain dots or slashes")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self._writer = wds.ShardWriter(
            str(self.out_dir / f"{prefix}-%06d.tar"), maxcount=max_count, maxsize=max_size, verbose=0, mtime=0.0
        )
        self._keys: set[str] = set()
        self._num_shards = 0
        self._closed = False
        self.count = 0

    def write(self, key: str, image: bytes, image_ext: str, meta: dict[str, Any]) -> None:
        """One sample: ``image`` the encoded file bytes, ``meta`` the schema dict (see schema.py)."""
        if "." in key or "/" in key:
            raise SampleError(f"sample key {key!r} must not contain dots or slashes")
        if key in self._keys:
            raise SampleError(f"duplicate sample key {key!r}")
        if image_ext not in IMAGE_EXTENSIONS:
            raise SampleError(f"image extension {image_ext!r} is not one of {IMAGE_EXTENSIONS}")
        self._keys.add(key)
        payload = json.dumps(meta, separators=(",", ":")).encode("utf-8")
        self._writer.write({"__key__": key, image_ext: image, "json": payload})
        self._num_shards = self._writer.shard  # ShardWriter counts shards opened so far
        self.count += 1

    @property
    def num_shards(self) -> int:
        return self._num_shards

    @property
    def pattern(self) -> str:
        """Brace pattern naming every shard written."""
        return shard_pattern(self.out_dir, self.prefix, self.num_shards)

    def close(self) -> None:
        if self._closed:
            return
        first = self._writer.fname  # ShardWriter opens shard 0 eagerly; drop it when nothing was written
        self._writer.close()
        self._closed = True
        if self.count == 0 and first is not None:
            Path(first).unlink(missing_ok=True)

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def shard_pattern(out_dir: str | os.PathLike, prefix: str, num_shards: int) -> str:
    """``{out_dir}/{prefix}-{000000..00000N}.tar`` for shards 0 .. num_shards - 1."""
    if num_shards <= 0:
        raise ValueError(f"no shards were written to {out_dir}")
    if num_shards == 1:
        return f"{out_dir}/{prefix}-000000.tar"
    return f"{out_dir}/{prefix}-{{000000..{num_shards - 1:06d}}}.tar"


def expand_urls(pattern: str | list[str]) -> list[str]:
    """Brace-expand a shard pattern (or a list of patterns / a ``::``-joined string) into existing files.

    Fails with a message naming the pattern when it matches nothing or names a missing file or
    folder: these are configuration errors and must stop before training starts.
    """
    patterns = pattern if isinstance(pattern, list) else str(pattern).split("::")
    urls: list[str] = []
    for p in patterns:
        expanded = list(wds.shardlists.expand_urls(p))
        if not expanded:
            raise FileNotFoundError(f"shard pattern {p!r} matches no file")
        for url in expanded:
            if "://" in url or url.startswith("pipe:"):
                urls.append(url)  # remote: cannot check here, the reader's handler will count failures
                continue
            path = Path(url)
            if not path.parent.is_dir():
                raise FileNotFoundError(f"shard pattern {p!r}: folder {path.parent} does not exist")
            if not path.is_file():
                raise FileNotFoundError(f"shard pattern {p!r}: {url} does not exist")
            urls.append(url)
    return urls
