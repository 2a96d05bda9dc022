"""Where a round's data comes from: reading shard samples, phrase sources, the labelled / pool
split, weighted training mixes.

- ``read_samples``: every sample of some shards, failing on an unreadable one or skipping and
  counting it.
- Phrases: a vocabulary file, the labelled set's phrases, or (None) each pool image's own queries.
- ``split_labelled_pool``: the demonstration's setup, a share of a labelled split kept with its
  labels and the rest turned into an unlabelled pool (phrases kept as non-exhaustive queries without
  instances, exactly what ``make_shards.py images --vocabulary`` writes).
- ``weighted_shards``: per-source sampling weights as a ``::``-joined shard list. ``Sam3DataModule``
  trains on a resampled stream that draws shards uniformly from its URL list, duplicates included
  (``random.choice``), so repeating a source's shards ``c`` times multiplies its draws by ``c``: the
  weights need no change to the DataModule, only integer repeat counts. Compromise: integer counts
  approximate the weights (the achieved shares are returned and recorded).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import webdataset as wds

from sam3_train.data.decode import split_raw
from sam3_train.data.shards import ShardSink, expand_urls
from sam3_train.atomic import replace_dir, write_json_atomic
from sam3_train.engine.manifest import SPLIT_MARKER, TMP_SUFFIX

log = logging.getLogger(__name__)


def read_samples(urls: list[str], *, strict: bool = True,
                 skipped: dict[str, int] | None = None) -> Iterator[tuple[str, bytes, str, dict[str, Any]]]:
    """(key, image bytes, extension, validated meta) of every sample of ``urls``, in shard order (one
    process, no rank split).

    ``strict``: an unreadable shard or sample (bad json, no image member, schema error) raises, naming
    it. Otherwise (pools, labelled sets: a bad sample never stops a round) it is skipped, logged with
    shard and key, and counted in ``skipped["samples"]``.
    """
    if strict:
        for sample in wds.tarfile_samples([{"url": u} for u in urls]):
            yield split_raw(sample)
        return
    counts = skipped if skipped is not None else {}
    counts.setdefault("samples", 0)

    def on_error(exn: BaseException) -> bool:
        counts["samples"] += 1
        log.warning("skipped unreadable shard data: %s", exn)
        return True

    for sample in wds.tarfile_samples([{"url": u} for u in urls], handler=on_error):
        try:
            yield split_raw(sample)
        except Exception as exn:  # a bad sample never stops a round: count, warn, move on
            counts["samples"] += 1
            log.warning("skipped sample: shard %s, key %s: %s", sample.get("__url__"), sample.get("__key__"), exn)


# ------------------------------------------------------------------------------------------ phrases
def read_vocabulary(path: str | os.PathLike) -> list[str]:
    """Phrases of a vocabulary file: one per line, blank lines and ``#`` comments skipped, first
    occurrence kept. Fails naming the file when it is missing or holds no phrase."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary file {path} does not exist")
    phrases = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    phrases = list(dict.fromkeys(p for p in phrases if p))
    if not phrases:
        raise ValueError(f"vocabulary file {path} holds no phrase")
    return phrases


def labelled_set_phrases(urls: list[str]) -> list[str]:
    """Every phrase queried anywhere in the labelled set (the shards ``urls``), sorted."""
    phrases = {q["phrase"] for _, _, _, meta in read_samples(urls, strict=False) for q in meta["queries"]}
    if not phrases:
        raise ValueError(f"the labelled set ({urls[:2]}...) has no query phrase")
    return sorted(phrases)


# ------------------------------------------------------------------------------------------ split
def strip_labels(meta: dict[str, Any]) -> dict[str, Any]:
    """A pool meta: the same image and phrases, every query non-exhaustive with no instance."""
    phrases = list(dict.fromkeys(q["phrase"] for q in meta["queries"]))
    out = {k: meta[k] for k in ("image_id", "width", "height", "source") if k in meta}
    out["queries"] = [{"phrase": p, "exhaustive": False, "instances": []} for p in phrases]
    return out


def split_labelled_pool(*, urls: list[str], out_dir: str | os.PathLike, fraction: float, seed: int = 0,
                        num_shards: int = 8) -> dict[str, Any]:
    """Write ``{out_dir}/labelled/labelled-*.tar`` (``fraction`` of the images, chosen by ``seed``,
    labels kept) and ``{out_dir}/pool/pool-*.tar`` (the rest, :func:`strip_labels`), each part in
    ``num_shards`` shards, in input order; returns (and stores as ``split.json``) the patterns,
    counts and keys' split. Written under ``{out_dir}.tmp`` and renamed: a second call with the same
    arguments returns the stored result at once; different arguments fail, naming the folder.
    """
    out_dir = Path(out_dir)
    params = {"urls": list(urls), "fraction": fraction, "seed": seed, "num_shards": num_shards}
    marker = out_dir / SPLIT_MARKER
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done["params"] != params:
            raise ValueError(f"{out_dir} holds a split made with other settings ({done['params']}); "
                             "delete it or restore them")
        return done
    skipped: dict[str, int] = {}
    keys = [key for key, _, _, _ in read_samples(urls, strict=False, skipped=skipped)]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate sample keys in {urls[:2]}...: cannot split by key")
    num_labelled = max(1, round(fraction * len(keys))) if keys else 0
    chosen = set(random.Random(f"split-{seed}").sample(sorted(keys), num_labelled))
    tmp = out_dir.with_name(out_dir.name + TMP_SUFFIX)
    if tmp.exists():
        shutil.rmtree(tmp)
    parts = {"labelled": num_labelled, "pool": len(keys) - num_labelled}
    sinks = {name: ShardSink(out_dir=tmp / name, prefix=name, max_count=max(1, math.ceil(n / num_shards)))
             for name, n in parts.items() if n}
    for key, data, ext, meta in read_samples(urls, strict=False):
        if key in chosen:
            sinks["labelled"].write(key, data, ext, meta)
        else:
            sinks["pool"].write(key, data, ext, strip_labels(meta))
    for sink in sinks.values():
        sink.close()
    final = {name: sink.pattern.replace(str(tmp), str(out_dir), 1) for name, sink in sinks.items()}
    done = {"params": params, "patterns": final, "counts": {**parts, "skipped": skipped["samples"]}}
    write_json_atomic(tmp / SPLIT_MARKER, done)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    replace_dir(tmp, out_dir)
    return done


# ------------------------------------------------------------------------------------------ mixing
def count_samples(url: str) -> int:
    """Samples in one local shard (its ``.json`` members; headers only, no data read)."""
    with tarfile.open(url) as tar:
        return sum(1 for m in tar.getmembers() if m.name.endswith(".json"))


def weighted_shards(sources: dict[str, tuple[list[str], float]], *, tolerance: float = 0.01,
                    max_entries: int = 4096) -> tuple[str, dict[str, dict[str, Any]]]:
    """``{name: (shard urls, weight)}`` -> (a ``::``-joined shard list, per source {"weight", "shards",
    "samples", "repeats", "share"}).

    A shard drawn uniformly from the list brings all its samples, so a source whose shards appear
    ``c`` times each supplies ``c x samples`` per pass: ``c`` proportional to ``weight / samples`` gives
    each source ``weight / sum(weights)`` of the training samples. The smallest multiplier whose
    shares lie within ``tolerance`` of the target (or the best within ``max_entries`` list entries)
    is used. Sources of weight 0 are left out; an empty source with a weight fails, naming it.
    """
    live = {name: (urls, float(w)) for name, (urls, w) in sources.items() if w > 0}
    if not live:
        raise ValueError("weighted_shards: every source has weight 0")
    samples = {}
    for name, (urls, _) in live.items():
        samples[name] = sum(count_samples(u) for u in urls)
        if samples[name] == 0:
            raise ValueError(f"training source {name!r} ({urls[:2]}...) holds no sample")
    total_w = sum(w for _, w in live.values())
    target = {name: w / total_w for name, (_, w) in live.items()}
    rate = {name: w / samples[name] for name, (_, w) in live.items()}
    base = min(rate.values())
    best = None
    for mult in range(1, max_entries + 1):
        repeats = {name: max(1, round(mult * rate[name] / base)) for name in live}
        if sum(repeats[n] * len(live[n][0]) for n in live) > max_entries and best is not None:
            break
        got = sum(repeats[n] * samples[n] for n in live)
        shares = {n: repeats[n] * samples[n] / got for n in live}
        error = max(abs(shares[n] - target[n]) for n in live)
        if best is None or error < best[0] - 1e-12:
            best = (error, repeats, shares)
        if error <= tolerance:
            break
    _, repeats, shares = best
    entries = [u for name, (urls, _) in live.items() for _ in range(repeats[name]) for u in urls]
    info = {name: {"weight": live[name][1], "shards": len(live[name][0]), "samples": samples[name],
                   "repeats": repeats[name], "share": round(shares[name], 6)} for name in live}
    return "::".join(entries), info


def resolve(pattern: str | None, what: str) -> list[str]:
    """Shard files of a pattern, failing early with a message naming the setting."""
    if not pattern:
        raise ValueError(f"no {what} shards configured")
    try:
        return expand_urls(pattern)
    except FileNotFoundError as exn:
        raise FileNotFoundError(f"{what}: {exn}") from None
