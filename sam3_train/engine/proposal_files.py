"""A rank's proposals file: one gzip member per image, each member one image record as a JSON line.

    proposals-rank000/proposals.jsonl.gz      (the record schema: proposals.py's module docstring)

    with ProposalFileWriter(path) as out:     # the propose step appends images as it proposes them
        out.write(record)
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
    """Appends image records to a new proposals file, one gzip member each (sorted JSON keys)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = open(self.path, "wb")

    def write(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        self._file.write(gzip.compress(line, compresslevel=COMPRESS_LEVEL, mtime=0))

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
                          "and run again to propose anew")

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
        """(offset, length, inflated bytes) of every gzip member, streaming through the file."""
        with open(self.path, "rb") as f:
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
                    raise self._damaged(f"the gzip member at byte {offset} is corrupt ({e})") from e
                if not inflate.eof:
                    fed, pending = fed + len(pending), b""
                    continue
                length = fed + len(pending) - len(inflate.unused_data)
                yield offset, length, b"".join(parts)
                offset, fed, parts, pending = offset + length, 0, [], inflate.unused_data
                inflate = zlib.decompressobj(wbits=31)
            if fed or any(parts):
                raise self._damaged(f"the file ends inside the gzip member at byte {offset} (truncated)")
