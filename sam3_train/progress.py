"""``StepProgressBar``: the training bar counts optimiser steps out of the run's total, not batches of
an epoch.

sam3-train's runs are bounded by ``trainer.max_steps`` over a resampled stream (``max_epochs: -1``),
so Lightning's bars read "Epoch 3/-2" with a bar that restarts every ``data.steps_per_epoch``. This
one reads ``step 1350/3000 45%|...| [elapsed<remaining, rate, loss]`` for the whole run, and starts at
the resumed step after ``--ckpt_path``. Validation, test and predict bars are Lightning's. ``Sam3CLI``
adds it to every Trainer it builds unless the config has its own progress bar or turns bars off.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


class StepProgressBar(TQDMProgressBar):
    """A TQDM progress bar whose training bar shows ``global_step`` out of the run's optimiser steps
    (``trainer.estimated_stepping_batches``: ``max_steps``, or what ``max_epochs`` amounts to); the
    postfix carries the progress-bar metrics (``train/loss``, ...) as Lightning's bar does.

    Args:
        refresh_rate: redraw every this many optimiser steps (0 disables the bar).
        process_position: as ``TQDMProgressBar``'s.
    """

    TRAIN_FORMAT = (
        "step {n_fmt}/{total_fmt} {percentage:3.0f}%|{bar}| "
        "[{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"
    )

    def __init__(self, *, refresh_rate: int = 1, process_position: int = 0):
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=False)

    def init_train_tqdm(self) -> Tqdm:
        """Lightning's training bar (its arguments) over the run's steps, from the current step."""
        trainer = self.trainer
        total = trainer.estimated_stepping_batches
        finite = math.isfinite(total)  # an endless run (max_steps -1, max_epochs -1) keeps Lightning's format
        # After --ckpt_path the run goes on from its step; the rate counts only this session's steps.
        return Tqdm(desc="step", total=int(total) if finite else None, initial=trainer.global_step,
                    position=2 * self.process_position, disable=self.is_disabled, leave=True, dynamic_ncols=True,
                    file=sys.stdout, smoothing=0, bar_format=self.TRAIN_FORMAT if finite else self.BAR_FORMAT)

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        """The bar spans the run: an epoch boundary neither resets nor renames it."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step, bar = trainer.global_step, self.train_progress_bar
        if bar.disable or not self.is_enabled or bar.n == step:  # no optimiser step yet (gradient accumulation)
            return
        if step % self.refresh_rate == 0 or step == bar.total:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # set_postfix redraws the bar

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
