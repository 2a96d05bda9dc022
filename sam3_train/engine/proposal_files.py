"""A rank's proposals file: one gzip member per image, each member one image record as a JSON line.

    proposals-rank000/proposals.jsonl.gz      (the record schema: proposals.py's module docstring)

    with ProposalFileWriter(path) as out:     # the propose step appends images as it proposes them
        out.write(record)
    for end, record in complete_records(path): ...   # what a killed rank had written (it resumes after)
    index = ProposalIndex(path)               # the write stage and review: an image by sample key
    record = index.get(key)

Concatenated gzip members are one valid gzip file: ``zcat proposals.jsonl.gz | jq`` and Python's
``gzip.open`` read it whole. One member per image lets :class:`ProposalIndex` seek to an image and
inflate only it, and lets a rank append images as it proposes them (a container such as ``.npz``
would hold a rank's arrays in memory until the end and inflate whole arrays to read one image). The
repeated keys, sizes and masks of a record (a pair's tight mask often equals its mask) compress
well: 4.5x smaller than the plain lines (docs/benchmarks.md). Members are written with mtime 0, so
the same records give the same bytes. A corrupt or truncated file fails with one error naming it
(gzip checks a CRC per member).

Files of the earlier format (``proposals.jsonl``, the same records as plain JSON lines) are still
read: :func:`proposals_file` finds either.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

from sam3_train.engine.manifest import LEGACY_PROPOSALS, PROPOSALS, PROPOSED

COMPRESS_LEVEL = 6  # zlib's default: ~4 ms an image; 9 saves 0.5% of the bytes at 1.6x the time
_CHUNK = 1 << 20
_KEY = re.compile(rb'"key": ("[^"\\]*")')  # sorted keys: the record's "key" precedes its "pairs"


def proposals_file(folder: str | os.PathLike) -> Path:
    """The proposals file of one ``proposals-rankNNN`` folder (this format's, else the plain JSON lines)."""
    folder = Path(folder)
    for name in (PROPOSALS, LEGACY_PROPOSALS):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder} holds no proposals file ({PROPOSALS}); delete the round's "
                            f"{PROPOSED} and run again to propose anew")


class ProposalFileWriter:
    """Appends image records to a new proposals file, one gzip member each (sorted JSON keys).
    ``append_at``: continue an existing file after its first that many bytes (the rest, a write a
    kill interrupted, is cut off; :func:`complete_records` finds the offset)."""

    def __init__(self, path: str | os.PathLike, *, append_at: int | None = None):
        self.path = Path(path)
        if append_at is None:
            self._file = open(self.path, "wb")
        else:
            self._file = open(self.path, "r+b")
            self._file.truncate(append_at)
            self._file.seek(append_at)

    def write(self, *records: dict[str, Any]) -> None:
        """Append ``records`` in one write: a batch's, so that a kill leaves whole batches (a resumed rank
        then batches the rest as an uninterrupted one would)."""
        self._file.write(b"".join(gzip.compress((json.dumps(r, sort_keys=True) + "\n").encode(),
                                                compresslevel=COMPRESS_LEVEL, mtime=0) for r in records))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ProposalIndex:
    """Random access to one rank's proposals file by sample key: the byte span of each image's
    record, found by one pass over the file; records are parsed on demand (a rank's proposals need
    not fit in memory). Keys iterate in file order."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.compressed = self.path.name.endswith(".gz")
        self.offsets: dict[str, tuple[int, int]] = {}  # key -> (byte offset, byte length)
        spans = self._members() if self.compressed else self._lines()
        for offset, length, text in spans:
            key = self._key(text, offset)
            if key in self.offsets:
                raise ValueError(f"{self.path}: sample {key} proposed twice")
            self.offsets[key] = (offset, length)

    def __contains__(self, key: str) -> bool:
        return key in self.offsets

    def __len__(self) -> int:
        return len(self.offsets)

    def __iter__(self) -> Iterator[str]:
        return iter(self.offsets)

    def get(self, key: str) -> dict[str, Any]:
        offset, length = self.offsets[key]
        with open(self.path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        try:
            record = json.loads(zlib.decompress(data, wbits=31) if self.compressed else data)
        except (zlib.error, ValueError) as e:
            raise self._damaged(f"the record of sample {key} at byte {offset} is unreadable ({e})") from e
        if record.get("key") != key:
            raise self._damaged(f"the record at byte {offset} is not sample {key}'s")
        return record

    # -------------------------------------------------------------------------------- reading the file
    def _damaged(self, reason: str) -> ValueError:
        marker = self.path.parent.parent / PROPOSED
        return ValueError(f"{self.path}: {reason}. The round's proposals are damaged: delete {marker} "
                          f"and run again (the rank keeps its whole records before the damage and proposes "
                          f"the rest; delete {self.path.parent} too to propose it all anew)")

    def _key(self, text: bytes, offset: int) -> str:
        match = _KEY.search(text)
        try:
            return json.loads(match.group(1)) if match else json.loads(text)["key"]
        except (ValueError, KeyError, TypeError) as e:
            raise self._damaged(f"the record at byte {offset} is not a proposals record ({e})") from e

    def _lines(self) -> Iterator[tuple[int, int, bytes]]:
        with open(self.path, "rb") as f:
            offset = 0
            for line in f:
                yield offset, len(line), line
                offset += len(line)

    def _members(self) -> Iterator[tuple[int, int, bytes]]:
        try:
            yield from _gzip_members(self.path)
        except _Damaged as e:
            raise self._damaged(str(e)) from e


class _Damaged(Exception):
    """A gzip member that does not inflate, or a file that ends inside one."""


def _gzip_members(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(offset, length, inflated bytes) of every gzip member of ``path``, streaming through the file."""
    with open(path, "rb") as f:
        offset, fed, parts = 0, 0, []  # the member's start, its compressed bytes fed so far, its output
        inflate = zlib.decompressobj(wbits=31)
        pending = b""
        while True:
            if not pending:
                pending = f.read(_CHUNK)
                if not pending:
                    break
            try:
                parts.append(inflate.decompress(pending))
            except zlib.error as e:
                raise _Damaged(f"the gzip member at byte {offset} is corrupt ({e})") from e
            if not inflate.eof:
                fed, pending = fed + len(pending), b""
                continue
            length = fed + len(pending) - len(inflate.unused_data)
            yield offset, length, b"".join(parts)
            offset, fed, parts, pending = offset + length, 0, [], inflate.unused_data
            inflate = zlib.decompressobj(wbits=31)
        if fed or any(parts):
            raise _Damaged(f"the file ends inside the gzip member at byte {offset} (truncated)")


def complete_records(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(end offset, record) of every whole record at the start of a proposals file a kill cut short,
    in file order, read lazily: the first member that does not inflate or parse (the write the kill
    interrupted, the only place damage can be) ends it. ``ProposalFileWriter(path, append_at=end)``
    then continues after the last one."""
    try:
        for offset, length, text in _gzip_members(Path(path)):
            try:
                record = json.loads(text)
            except ValueError:
                return
            if not isinstance(record, dict) or "key" not in record:
                return
            yield offset + length, record
    except _Damaged:
        return
