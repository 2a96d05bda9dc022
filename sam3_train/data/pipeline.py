"""Reading shards: a WebDataset pipeline split by rank and worker, yielding collated Batches.

    stream = ShardStream(urls=expand_urls("shards/train-{000000..000031}.tar"), batch_size=8,
                         transforms=train_transforms(image_size=224), collate=Collator(tokenizer=tok),
                         rank=trainer.global_rank, world_size=trainer.world_size,
                         shuffle=True, shuffle_buffer=256, resampled=True, steps_per_epoch=500)
    loader = DataLoader(stream, batch_size=None, num_workers=2)   # batches are built in the workers

Splitting. Shard order is a permutation drawn from (seed, epoch), the same on every rank; rank r
of R takes shards r, r + R, ... (our node splitter, closed over the trainer's rank: worker processes
cannot be trusted to see the distributed state), then worker w of W takes every W-th of those.
Without resampling each epoch reads every sample exactly once across ranks and workers. With
``resampled=True`` each (rank, worker) draws shards with replacement from its own seeded stream
and stops after its share of ``steps_per_epoch`` batches, so every rank runs exactly the same
number of steps (uneven shards otherwise hang DDP at the next collective).

Randomness and resuming. Every random choice is a pure function of the stream's place: shard draws
from (seed, epoch, rank, worker), the shuffle buffer from the same, and a sample's phrase sampling
and augmentations from (seed, epoch, rank, worker, n), n being its index in that worker's shuffled
stream. :meth:`ShardStream.iter_with_positions` reports after each batch how far its worker got
(``StreamPosition``); :meth:`ShardStream.resume` makes the next pass of that epoch continue there:
each worker replays its shard draws and shuffle buffer and skips the samples it had used, reading
them but not decoding them (the compromise: a resume re-reads up to an epoch of raw bytes, which
is far cheaper than decoding and augmenting them). DataLoader workers hand out batches in turn, so
after a resume worker slot i plays the original worker ``(next_worker + i) % num_workers``.

Bad data. Any sample that fails (corrupt image, invalid json, bad RLE, box outside the image,
missing member, empty or truncated shard) is skipped with a warning naming shard and key, and
counted in a :class:`SkipCounter` shared with the main process (a ``multiprocessing.Value``: worker
processes inherit it when they are forked or spawned, so the count reaches the LightningModule).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import random
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterator

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from sam3_train.data.batch import Batch
from sam3_train.data.decode import QuerySelector, decode_sample
from sam3_train.data.mixing import TrainSource, mix_samples
from sam3_train.data.schema import SampleError

log = logging.getLogger(__name__)
_SHARED = mp.get_context("spawn")
MAX_CONSECUTIVE_FAILURES = 1000  # resampled streams only: a dataset this broken fails instead of spinning


class SkipCounter:
    """Process-shared count of skipped samples; ``skip`` warns with the shard, key and reason once per
    process that meets it: every skip is counted, but a sample met again in the same process (a later
    pass of a single-process stream) is not named again. Dataloader workers are new processes every
    epoch (``persistent_workers`` is off), so there it is once per worker and epoch."""

    def __init__(self) -> None:
        # Made in the spawn context: such a value can be handed to forked and spawned workers alike
        # (one made in the fork context refuses to be pickled for a spawned worker).
        self._value = _SHARED.Value("q", 0)
        self._warned: set[tuple[str | None, str | None, str]] = set()

    def skip(self, url: str | None, key: str | None, reason: BaseException | str) -> None:
        with self._value.get_lock():
            self._value.value += 1
        seen = (url, key, str(reason))  # a shard-level error has no key: its reason tells two apart
        if seen in self._warned:
            log.debug("skipped sample again: shard %s, key %s: %s", url, key, reason)
            return
        self._warned.add(seen)
        log.warning("skipped sample: shard %s, key %s: %s", url, key, reason)

    @property
    def value(self) -> int:
        return int(self._value.value)

    def restore(self, value: int) -> None:
        """Set the count (a resumed run continues the interrupted run's count)."""
        with self._value.get_lock():
            self._value.value = int(value)


@dataclass(frozen=True)
class StreamPosition:
    """Where one worker's stream stands after a batch it made.

    worker: the original worker index (0 .. num_workers - 1) whose stream this is.
    consumed: samples taken from its shuffled stream so far, bad ones included.
    batches: batches it has made so far in this epoch.
    """

    worker: int
    consumed: int
    batches: int


def split_by_rank(urls: list[str], rank: int, world_size: int) -> list[str]:
    """Our node splitter: rank ``rank`` of ``world_size`` keeps every ``world_size``-th shard."""
    return urls[rank::world_size]


def _counting(samples: Iterator[dict], state: dict[str, Any]) -> Iterator[dict]:
    """Pass samples through, noting that the shards drawn so far did hold some."""
    for sample in samples:
        state["draws_without_sample"] = 0
        yield sample


def _buffer_shuffle(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream through a buffer of ``size`` items (WebDataset's scheme, seeded)."""
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


class ShardStream(IterableDataset):
    """Iterable of :class:`Batch` from WebDataset shards (see the module docstring).

    Args:
        urls: shard files (already expanded, see ``shards.expand_urls``).
        batch_size: images per batch (each image brings all its kept phrases).
        transforms: ``(image, target, rng) -> (image, target)``, e.g. ``train_transforms(...)``.
        collate: list of (image, target) -> Batch, e.g. ``Collator(tokenizer=...)``.
        select: per-image query selection ``(queries, rng) -> queries``; None keeps every query.
        rank, world_size: this process's place in DDP (from the trainer).
        shuffle: permute shard order per (seed, epoch).
        shuffle_buffer: samples in the shuffle buffer (0: no sample shuffling).
        seed: base of every random stream (shard order, buffer, transforms, phrase sampling).
        resampled: draw shards with replacement and stop after ``steps_per_epoch`` batches per rank.
        steps_per_epoch: batches per rank and epoch when resampled (required then).
        drop_last: drop each worker's last incomplete batch.
        skip_counter: where skipped samples are counted (a fresh one by default).
        draft_size: let JPEG decode at reduced scale down to about this side (speed; None: full size).
        sources: weighted training sources (mixing.py), each sample drawn from one by weight and
            tagged with its name (``target["source"]``); needs ``resampled``. None: ``urls`` as one set.
        exclude_keys: sample keys read and passed over, not decoded (a resumed prediction pass: the
            images it had done before it was killed).
    """

    def __init__(
        self,
        *,
        urls: list[str],
        batch_size: int,
        transforms: Callable[..., Any],
        collate: Callable[[list[Any]], Batch],
        select: QuerySelector | None = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        resampled: bool = False,
        steps_per_epoch: int | None = None,
        drop_last: bool = False,
        skip_counter: SkipCounter | None = None,
        draft_size: int | None = None,
        sources: list[TrainSource] | None = None,
        exclude_keys: Collection[str] | None = None,
    ):
        if not urls:
            raise ValueError("ShardStream needs at least one shard")
        if resampled and not steps_per_epoch:
            raise ValueError("resampled=True needs steps_per_epoch (batches per rank and epoch)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.urls = list(urls)
        self.batch_size = batch_size
        self.transforms = transforms
        self.collate = collate
        self.select = select
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.resampled, self.steps_per_epoch, self.drop_last = resampled, steps_per_epoch, drop_last
        self.skip_counter = skip_counter or SkipCounter()
        self.draft_size = draft_size
        if sources is not None and not resampled:
            raise ValueError("weighted training sources need resampled=True (each source is an endless stream)")
        self.sources = list(sources) if sources else None
        self.exclude_keys = frozenset(exclude_keys or ())
        self._epoch = _SHARED.RawValue("q", 0)  # shared: persistent workers must see set_epoch from the main process
        self._resume: dict[str, Any] | None = None

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def resume(self, *, epoch: int, num_workers: int, next_worker: int, positions: list[tuple[int, int]]) -> None:
        """Make the next pass over ``epoch`` continue where an earlier one stopped.

        ``positions[w]`` is (consumed, batches) of original worker w (see :class:`StreamPosition`);
        ``next_worker`` the worker whose batch came next. Set before the DataLoader starts its
        workers (they receive a copy of this object); a pass over another epoch ignores it.
        """
        if len(positions) != max(1, num_workers):
            raise ValueError(f"{len(positions)} worker positions for {num_workers} workers")
        self._resume = {"epoch": int(epoch), "num_workers": max(1, num_workers), "next_worker": int(next_worker),
                        "positions": [(int(c), int(b)) for c, b in positions]}

    def clear_resume(self) -> None:
        self._resume = None

    def __len__(self) -> int:
        if self.resampled:
            return int(self.steps_per_epoch)
        raise TypeError("a ShardStream without resampling has no known length")

    def shard_order(self, epoch: int) -> list[str]:
        """Every shard in this epoch's order (identical on all ranks for the same seed and epoch)."""
        order = list(self.urls)
        if self.shuffle:
            random.Random(f"shards-{self.seed}-{epoch}").shuffle(order)
        return order

    def worker_shards(self, epoch: int, worker: int, num_workers: int) -> list[str]:
        """The shards (rank, worker) reads in ``epoch`` without resampling."""
        return split_by_rank(self.shard_order(epoch), self.rank, self.world_size)[worker::num_workers]

    def worker_steps(self, worker: int, num_workers: int) -> int | None:
        """Batches worker ``worker`` makes per epoch when resampled (its share of steps_per_epoch)."""
        if not self.resampled:
            return None
        return self.steps_per_epoch // num_workers + int(worker < self.steps_per_epoch % num_workers)

    def _url_source(self, epoch: int, worker: int, num_workers: int, state: dict[str, Any],
                    source: TrainSource | None = None) -> Iterator[dict]:
        if not self.resampled:
            for url in self.worker_shards(epoch, worker, num_workers):
                state["url"] = url
                yield {"url": url}
            return
        urls = list(source.urls) if source is not None else self.urls
        tag = f"-{source.name}" if source is not None else ""  # one source: the draws of an unmixed stream
        rng = random.Random(f"resample-{self.seed}-{epoch}-{self.rank}-{worker}{tag}")
        limit = max(10, 3 * len(urls))  # draws in a row without one sample: every shard empty or unreadable
        while True:
            state["draws_without_sample"] += 1
            if state["draws_without_sample"] > limit:
                raise RuntimeError(f"{limit} shard draws gave no readable sample; shards: {urls[:3]}...")
            url = rng.choice(urls)
            state["url"] = url
            yield {"url": url}

    def _raw_samples(self, epoch: int, worker: int, num_workers: int, state: dict[str, Any]) -> Iterator[dict]:
        """The worker's shuffled stream of raw (undecoded) samples: a function of (seed, epoch, rank, worker)."""

        def read(source: TrainSource | None, own: dict[str, Any]) -> Iterator[dict]:
            def on_shard_error(exn: BaseException) -> bool:
                if not state.get("replaying"):  # a resume replays what the interrupted run counted already
                    self.skip_counter.skip(own["url"], None, exn)
                return True  # keep going

            urls = self._url_source(epoch, worker, num_workers, own, source)
            return _counting(wds.tarfile_samples(urls, handler=on_shard_error), own)

        if self.sources is None:
            raw = read(None, state)
        else:  # each source its own endless stream (own draw limit), mixed per sample by weight
            streams = [read(s, {"url": None, "draws_without_sample": 0}) for s in self.sources]
            raw = mix_samples(streams, self.sources, random.Random(f"mix-{self.seed}-{epoch}-{self.rank}-{worker}"))
        if self.shuffle_buffer > 1:
            raw = _buffer_shuffle(raw, self.shuffle_buffer, random.Random(f"buffer-{self.seed}-{epoch}-{self.rank}-{worker}"))
        return raw

    def __iter__(self) -> Iterator[Batch]:
        for batch, _ in self.iter_with_positions():
            yield batch

    def iter_with_positions(self) -> Iterator[tuple[Batch, StreamPosition]]:
        """(batch, where its worker's stream stands after it), in this worker's order."""
        info = get_worker_info()
        slot, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            torch.set_num_threads(1)  # a worker process: intra-op threads would only oversubscribe the cores
        epoch = self.epoch
        resume = self._resume if self._resume is not None and self._resume["epoch"] == epoch else None
        if resume is not None and resume["num_workers"] != num_workers:
            raise RuntimeError(f"resume state for {resume['num_workers']} workers, but {num_workers} are running")
        worker = (slot + resume["next_worker"]) % num_workers if resume else slot
        consumed, made = resume["positions"][worker] if resume else (0, 0)
        steps = self.worker_steps(worker, num_workers)
        if steps is not None and made >= steps:
            return
        state: dict[str, Any] = {"url": None, "draws_without_sample": 0, "replaying": consumed > 0}
        pending: list[Any] = []
        failures = 0
        for index, sample in enumerate(self._raw_samples(epoch, worker, num_workers, state)):
            if index < consumed:
                continue  # used before the interruption: read (to replay the buffer), not decoded
            state["replaying"] = False
            if sample.get("__key__") in self.exclude_keys:
                continue
            rng = random.Random(f"sample-{self.seed}-{epoch}-{self.rank}-{worker}-{index}")
            try:
                image, target = decode_sample(sample, select=self.select, rng=rng, draft_size=self.draft_size)
                if self.select is not None and not target["queries"]:
                    raise SampleError("no query to train on (none, or only unlabelled ones: schema.is_unlabelled)")
                image, target = self.transforms(image, target, rng)
                if "__source__" in sample:
                    target["source"] = sample["__source__"]
            except Exception as exn:  # bad data never stops training: count, warn, move on
                self.skip_counter.skip(sample.get("__url__"), sample.get("__key__"), exn)
                failures += 1
                if self.resampled and failures > MAX_CONSECUTIVE_FAILURES:  # would loop forever otherwise
                    raise RuntimeError(f"{failures} samples in a row were bad; shards: {self.urls[:3]}...") from exn
                continue
            failures = 0
            pending.append((image, target))
            if len(pending) == self.batch_size:
                made += 1
                yield self.collate(pending), StreamPosition(worker, index + 1, made)
                pending = []
                if steps is not None and made >= steps:
                    return
        if pending and not self.drop_last:
            made += 1
            yield self.collate(pending), StreamPosition(worker, index + 1, made)
