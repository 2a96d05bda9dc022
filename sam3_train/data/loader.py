"""``StreamLoader``: the training DataLoader over a :class:`ShardStream` that knows its place.

Lightning saves the ``state_dict()`` of a train dataloader that has one in every checkpoint and
hands it back through ``load_state_dict()`` before a resumed run starts iterating. The state says,
for every rank: the epoch, how many batches of it were consumed, which worker's batch comes next,
and per worker how far its stream got (see pipeline.py, "Randomness and resuming"). The next pass
over that epoch then yields exactly the batches the interrupted run had not yet used.

    loader = StreamLoader(stream, epoch_fn=lambda: trainer.current_epoch, num_workers=2)
    state = loader.state_dict()          # a collective under DDP: every rank's position
    loader.load_state_dict(state)        # the next pass continues there

Batches are counted when the loader hands them out. Lightning does not prefetch from a loader of
known length (a resampled stream has one), so at a checkpoint the count equals the batches trained.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from sam3_train.data.batch import Batch
from sam3_train.data.pipeline import ShardStream, StreamPosition
from sam3_train.dist import gather_objects

log = logging.getLogger(__name__)
STATE_VERSION = 1


class _WithPositions(IterableDataset):
    """The stream as the DataLoader sees it: (batch, position) pairs."""

    def __init__(self, stream: ShardStream):
        self.stream = stream

    def __iter__(self) -> Iterator[tuple[Batch, StreamPosition]]:
        return self.stream.iter_with_positions()

    def __len__(self) -> int:
        return len(self.stream)


def _generator_seed(seed: int, epoch: int, rank: int) -> int:
    return random.Random(f"loader-{seed}-{epoch}-{rank}").getrandbits(63)


class StreamLoader(DataLoader):
    """A DataLoader (``batch_size=None``: batches are made in the workers) with ``state_dict`` /
    ``load_state_dict`` for exact resumption.

    Args:
        stream: the training stream.
        epoch_fn: the epoch to read (the trainer's ``current_epoch``), asked when iteration starts;
            None: count passes.
        kwargs: DataLoader arguments (``num_workers``, ``pin_memory``, ...).

    The DataLoader's own generator is reseeded from (seed, epoch, rank) at every pass: its workers'
    base seed then never draws from the global torch RNG, whose state a resume restores exactly.
    """

    def __init__(self, stream: ShardStream, *, epoch_fn: Callable[[], int | None] = lambda: None, **kwargs: Any):
        super().__init__(_WithPositions(stream), batch_size=None, generator=torch.Generator(), **kwargs)
        self.stream = stream
        self._epoch_fn = epoch_fn
        self._passes = 0
        self._state: dict[str, Any] | None = None
        self._to_load: dict[str, Any] | None = None

    @property
    def num_slots(self) -> int:
        """Streams per rank: one per worker process, one without workers."""
        return max(1, self.num_workers)

    def _fresh(self, epoch: int) -> dict[str, Any]:
        return {"epoch": epoch, "batches": 0, "next_worker": 0, "num_workers": self.num_slots,
                "positions": [(0, 0)] * self.num_slots}

    def __iter__(self) -> Iterator[Batch]:  # type: ignore[override]
        return self._batches()  # a generator: the epoch is read at the first batch, not here

    def _batches(self) -> Iterator[Batch]:
        epoch = self._epoch_fn()
        epoch = self._passes if epoch is None else int(epoch)
        self._passes += 1
        stream = self.stream
        stream.set_epoch(epoch)
        self.generator.manual_seed(_generator_seed(stream.seed, epoch, stream.rank))
        loaded, self._to_load = self._to_load, None
        if loaded is not None and loaded["epoch"] == epoch:
            state = {**loaded, "positions": list(loaded["positions"])}
            stream.resume(epoch=epoch, num_workers=self.num_slots, next_worker=state["next_worker"],
                          positions=state["positions"])
            log.info("Resuming epoch %d of the training stream after %d batches (rank %d)",
                     epoch, state["batches"], stream.rank)
        else:
            state = self._fresh(epoch)
            stream.clear_resume()
        self._state = state
        try:
            for batch, position in super().__iter__():
                state["positions"][position.worker] = (position.consumed, position.batches)
                state["batches"] += 1
                state["next_worker"] = (position.worker + 1) % self.num_slots
                yield batch
        finally:
            stream.clear_resume()

    # ---- Lightning's stateful-dataloader interface ---------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Every rank's position (gathered: call it on all ranks, as Lightning's checkpointing does)."""
        local = dict(self._state) if self._state is not None else None
        if local is not None:
            local.update(rank=self.stream.rank, seed=self.stream.seed, skipped_samples=self.stream.skip_counter.value)
        return {"version": STATE_VERSION, "ranks": gather_objects(local)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict.get("ranks")
        if state_dict.get("version") != STATE_VERSION or not isinstance(ranks, list):
            log.warning("The checkpoint's data-stream state is of an unknown version: the epoch restarts its stream.")
            return
        rank, world = self.stream.rank, self.stream.world_size
        if len(ranks) != world:
            log.warning(
                "The checkpoint's data stream was written by %d rank(s), this run has %d: the interrupted epoch "
                "continues on fresh streams, so the resume is not exact (samples may repeat).", len(ranks), world)
            return
        mine = ranks[rank]
        if mine is None:
            return
        if mine["num_workers"] != self.num_slots or mine["seed"] != self.stream.seed:
            log.warning(
                "The checkpoint's data stream ran %d worker stream(s) per rank with seed %s, this run %d with seed "
                "%s (data.num_workers / data.seed changed): the interrupted epoch continues on fresh streams, so "
                "the resume is not exact.", mine["num_workers"], mine["seed"], self.num_slots, self.stream.seed)
            return
        self.stream.skip_counter.restore(mine["skipped_samples"])
        self._to_load = mine
