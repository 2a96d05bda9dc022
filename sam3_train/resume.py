"""Exact resumption: every process's random state travels in the checkpoint and comes back at the
step where it was taken.

What a bitwise-identical continuation needs, and where each part lives:

- weights, optimiser, scheduler, loop counters: Lightning's checkpoint;
- the position in the training stream (epoch, batches consumed, per-worker offsets; the workers'
  randomness is a function of that position): ``StreamLoader.state_dict`` (data/loader.py);
- the random state of the training processes (dropout, stochastic depth, mask point sampling):
  :class:`ExactResume`, which writes torch / CUDA / numpy / Python RNG states of every rank into the
  checkpoint and restores them just before the first training batch of the resumed run;
- validation in the middle of an epoch must not move the training's random stream (a resumed run
  skips the validation it was saved before): ExactResume restores the RNG after each validation,
  and the data module's loaders use their own generators;
- gradient-accumulation boundaries: checkpoints taken by ``every_n_train_steps`` and by
  :class:`~sam3_train.preemption.Preemption` fall on optimiser steps; one taken inside an
  accumulation window (``train_time_interval``) lacks the partial gradients, and loading it warns.

Compromise: RNG states are gathered from all ranks at every save (one small all-gather).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn

from sam3_train.dist import gather_objects

log = logging.getLogger(__name__)
CHECKPOINT_KEY = "sam3_resume"


def rng_state() -> dict[str, Any]:
    """This process's random states as plain data (tensors, ints, floats, tuples: weights-only loadable)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            log.warning("The checkpoint's CUDA RNG states are for %d devices, this process sees %d: not restored.",
                        len(state["cuda"]), torch.cuda.device_count())


def mid_accumulation(trainer: L.Trainer) -> bool:
    """Whether, at a train-batch end, the optimiser has not yet stepped on this window's gradients."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    every = trainer.accumulate_grad_batches
    return every > 1 and progress.current.ready % every != 0 and not progress.is_last_batch


class ExactResume(L.Callback):
    """Saves every rank's RNG states in checkpoints and restores them where training resumes (see the
    module docstring). ``Sam3LitModule`` adds one unless the trainer has it already."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._before_validation: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Lightning runs this on every rank (dump_checkpoint), so the gather is matched on all of them.
        fitting = trainer.state.fn == TrainerFn.FITTING
        checkpoint[CHECKPOINT_KEY] = {
            "rng": gather_objects(rng_state()),
            "mid_accumulation": bool(fitting and mid_accumulation(trainer)),
        }

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            log.warning("The checkpoint has no random states (written before exact resumption existed): "
                        "training continues, but not bitwise as the interrupted run would have.")
            return
        if state.get("mid_accumulation"):
            log.warning("The checkpoint was written inside a gradient-accumulation window: the gradients of that "
                        "window's first batches are not in it, so the resumed run differs from the interrupted one.")
        ranks = state["rng"]
        if len(ranks) != trainer.world_size:
            log.warning("The checkpoint's random states come from %d rank(s), this run has %d: not restored.",
                        len(ranks), trainer.world_size)
            return
        self._pending = ranks[trainer.global_rank]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        # As late as possible: nothing between the restore and the forward may draw random numbers.
        if self._pending is not None:
            set_rng_state(self._pending)
            self._pending = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._before_validation = rng_state()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs before ModelCheckpoint's on_validation_end (Lightning puts checkpoint callbacks last).
        if self._before_validation is not None:
            set_rng_state(self._before_validation)
            self._before_validation = None
