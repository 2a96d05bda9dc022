"""Weighted training sources: several shard sets drawn per sample by weight (``data.train_sources``).

    data:
      train_sources:
        - {name: domain, shards: datasets/mine/shards/train/mine-{000000..000003}.tar, weight: 1}
        - {name: general, shards: datasets/saco/shards/train/saco-train-{000000..000099}.tar, weight: 1}

Each sample of a worker's stream comes from source i with probability ``weight_i / sum(weights)``,
whatever the sources' sizes and shard sizes (a per-shard draw would favour the source with the larger
shards). Every source is an endless resampled stream of its own, so a small k-shot source simply
repeats while a large general source goes on. The choice of source is one draw of a seeded
``random.Random`` per sample, a function of (seed, epoch, rank, worker) like every other draw of
the stream (pipeline.py): a resumed pass replays it exactly, and every rank still runs
``steps_per_epoch`` batches (the mix needs ``resampled``).

Each image carries its source's name (``Batch.sources``); ``sam3_train.finetune.SourceShare`` logs
the share of training images each source gave as ``train/source_share/<name>``, an image-weighted
mean over the epoch that Lightning reduces over DDP ranks (sums of values and of counts).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # becomes part of logged metric names


@dataclass(frozen=True)
class TrainSource:
    """One weighted training source: ``name`` (letters, digits, ``_``, ``-``), its shard files
    (expanded), and its sampling ``weight`` (> 0; only ratios matter)."""

    name: str
    urls: tuple[str, ...]
    weight: float


def check_name(name: str, option: str) -> None:
    """A source or validation-set name becomes part of metric names: letters, digits, ``_``, ``-``."""
    if not _NAME.match(name):
        raise ValueError(f"{option} {name!r}: use letters, digits, '_' and '-' only (it becomes part of the "
                         "logged metric names, e.g. train/source_share/<name>, val/<name>/cgF1)")


def check_source_specs(specs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validate ``data.train_sources`` entries (``{name, shards, weight}``, weight defaulting to 1);
    raise ValueError naming the entry and what to write instead."""
    if not specs:
        raise ValueError("data.train_sources is empty: list at least one {name, shards, weight}, or use train_shards")
    out, seen = [], set()
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or "name" not in spec or "shards" not in spec:
            raise ValueError(f"data.train_sources[{i}] must be a mapping with keys name, shards and (optional) "
                             f"weight, got {spec!r}")
        unknown = set(spec) - {"name", "shards", "weight"}
        if unknown:
            raise ValueError(f"data.train_sources[{i}] has unknown keys {sorted(unknown)}: only name, shards, weight")
        name, weight = str(spec["name"]), float(spec.get("weight", 1.0))
        check_name(name, f"data.train_sources[{i}].name")
        if name in seen:
            raise ValueError(f"data.train_sources: the name {name!r} is used twice")
        if not weight > 0:
            raise ValueError(f"data.train_sources[{i}] ({name}): weight must be positive, got {weight}")
        seen.add(name)
        out.append({"name": name, "shards": spec["shards"], "weight": weight})
    return out


def mix_samples(streams: Sequence[Iterator[dict]], sources: Sequence[TrainSource], rng: random.Random) -> Iterator[dict]:
    """Endless weighted mix: each step draws a source by weight and takes its next raw sample,
    tagged ``__source__`` with the source's name. ``streams[i]`` must be endless (resampled)."""
    names = [s.name for s in sources]
    weights = [s.weight for s in sources]
    index = list(range(len(sources)))
    while True:
        i = rng.choices(index, weights=weights)[0]
        sample = next(streams[i], None)
        if sample is None:  # an endless stream ended: only when its own draw limit raised inside it
            raise RuntimeError(f"training source {names[i]!r} stopped yielding samples")
        sample["__source__"] = names[i]
        yield sample


def source_shares(sources: Sequence[str], names: Sequence[str]) -> dict[str, float]:
    """Share of the images (``sources``: one name per image) from each of ``names``."""
    counts = Counter(sources)
    total = max(1, len(sources))
    return {name: counts.get(name, 0) / total for name in names}
