"""Atomic file writes: a reader (or a run resumed after a kill) sees the old file or the whole new
one, never a part.

Every write goes to a partial file in the same folder (so the rename stays on one filesystem), is
fsync'ed, renamed over the target (``os.replace``: atomic on POSIX), and the folder is fsync'ed so
that the rename itself survives a power loss::

    with atomic_path("runs/x/model.ckpt") as tmp:
        torch.save(state, tmp)
    write_json_atomic("rounds/round_001/written.json", {"shards": [...]})
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PARTIAL_SUFFIX = ".partial"


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable. Some filesystems refuse to fsync a folder; the data
    itself is on disk by then, so that refusal is ignored."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a closed file's data to the disk (before a rename publishes it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, *, partial: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a partial path beside ``path`` to write to; on a clean exit fsync it and rename it over
    ``path``; on an exception remove it and re-raise. ``partial``: the partial file's path (default
    ``path`` + ``.partial``), for callers that name partials per process."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(partial) if partial is not None else path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as JSON (sorted keys, one-space indent, final newline), written atomically."""
    write_bytes_atomic(path, (json.dumps(obj, sort_keys=True, indent=1) + "\n").encode())


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename a finished folder (or file) ``tmp`` onto ``final`` (a folder must not exist there, or be
    empty) and make the rename durable. What ``tmp`` holds must already be complete (written through
    :func:`atomic_path`, a Lightning checkpoint save, or closed and fsync'ed by its writer)."""
    final = Path(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
