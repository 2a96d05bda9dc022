"""A folder of unlabelled images -> shards for the data engine's pool.

Each sample lists the vocabulary's phrases as non-exhaustive queries without instances: "ask the
model about these", never "these are absent". Without a vocabulary the samples have no queries.

    python tools/make_shards.py images --images photos/ --vocabulary datasets/shapes/vocabulary.txt --out DIR
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sam3_train.data.image_files import list_images, read_image_file
from sam3_train.data.schema import SampleError, make_key, query
from sam3_train.data.shards import DEFAULT_MAX_COUNT, DEFAULT_MAX_SIZE, ShardSink

log = logging.getLogger(__name__)


def read_vocabulary(path: str | os.PathLike) -> list[str]:
    """One phrase per line; blank lines and ``#`` comments ignored; duplicates dropped, order kept."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary file {path} does not exist")
    phrases: dict[str, None] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            phrases[" ".join(line.split())] = None
    return list(phrases)


def convert_images(
    *,
    images: str | os.PathLike,
    out: str | os.PathLike,
    vocabulary: str | os.PathLike | None = None,
    prefix: str = "images",
    max_count: int = DEFAULT_MAX_COUNT,
    max_size: int = DEFAULT_MAX_SIZE,
    progress: bool = True,
) -> dict[str, Any]:
    """Write shards for every image under ``images``; returns {"pattern", "written", "skipped"}."""
    files = list_images(images)
    phrases = read_vocabulary(vocabulary) if vocabulary is not None else []
    root = Path(images)
    skipped = 0
    with ShardSink(out_dir=out, prefix=prefix, max_count=max_count, max_size=max_size) as sink:
        for index, path in enumerate(tqdm(files, desc=f"images {root.name}", disable=not progress)):
            try:
                data, ext, (width, height) = read_image_file(path)
            except SampleError as exn:
                skipped += 1
                log.warning("skipped %s", exn)
                continue
            rel = path.relative_to(root).as_posix()
            meta = {
                "image_id": rel,
                "width": width,
                "height": height,
                "queries": [query(p, exhaustive=False) for p in phrases],
                "source": {"dataset": "images", "file_name": rel},
            }
            sink.write(make_key(index, path.stem), data, ext, meta)
    return {"pattern": sink.pattern if sink.count else None, "written": sink.count, "skipped": skipped}
