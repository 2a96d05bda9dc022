"""``SkipNonFinite``: an optimiser step whose loss or gradient is NaN or infinite is skipped, counted and named.

When the loss of any micro-batch of an accumulation window, or any gradient, is not finite (on any
rank), the optimiser step is skipped: the gradients are dropped before it, so neither the weights
nor AdamW's moments change (AdamW leaves a parameter without a gradient untouched); the schedule
still advances. Each skip is counted as ``train/skipped_steps`` and named in a warning with the
batch's sample keys; ``max_consecutive`` skips in a row stop training with an error.

``Sam3LitModule`` adds one (``model.max_consecutive_skipped_steps``) to every Trainer it runs in,
unless the Trainer already has one (``trainer.callbacks`` in a config, or a test's own):

    trainer = L.Trainer(callbacks=[SkipNonFinite(max_consecutive=10)])

What a module must do for it: return a loss for every micro-batch (a NaN loss tied to its outputs
when they are not finite, so that backward runs and DDP's all-reduce is reached on every rank). A
micro-batch for which the module returns None (Lightning then runs no backward for it) counts as
non-finite too: ``Sam3LitModule`` does that only when its outputs are not finite and no output
requires grad. The counts travel in the checkpoint (``sam3_skipped_steps``), so a resumed run goes
on counting.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)
CHECKPOINT_KEY = "sam3_skipped_steps"


class SkipNonFinite(L.Callback):
    """Skip, count and name optimiser steps with a non-finite loss or gradient (module docstring).

    Args:
        max_consecutive: skipped steps in a row after which training stops with an error (None: never).
        limit_setting: how the error names the limit's setting (the module passes its own key).

    Attributes:
        skipped_steps: optimiser steps skipped in the whole run (resumed runs included).
        skipped_in_a_row: the current run of skipped steps.
    """

    def __init__(self, *, max_consecutive: int | None = 10, limit_setting: str = "SkipNonFinite.max_consecutive"):
        if max_consecutive is not None and max_consecutive < 1:
            raise ValueError(f"max_consecutive_skipped_steps must be at least 1 or None, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.limit_setting = limit_setting
        self.skipped_steps = 0
        self.skipped_in_a_row = 0
        # Since the last optimiser step (every micro-batch of the window):
        self._nonfinite_loss = False
        self._batches = 0
        self._backwards = 0
        self._keys: list[str] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._batches += 1
        self._keys.extend(getattr(batch, "keys", None) or [])

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self._backwards += 1
        if not bool(torch.isfinite(loss.detach()).all()):
            self._nonfinite_loss = True

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """After DDP's all-reduce the gradients are the same on every rank; the loss flag is not, hence
        the reduction. Runs before Lightning's gradient clipping, which then finds no gradient."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        bad = self._nonfinite_loss or self._backwards < self._batches
        bad = bad or (bool(grads) and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))))
        bad = trainer.strategy.reduce_boolean_decision(bool(bad), all=False)
        keys = self._keys
        self._keys, self._nonfinite_loss, self._batches, self._backwards = [], False, 0, 0
        if not bad:
            self.skipped_in_a_row = 0
            return
        optimizer.zero_grad(set_to_none=True)  # AdamW leaves a parameter without a gradient untouched
        self.skipped_steps += 1
        self.skipped_in_a_row += 1
        shown = ", ".join(keys[:16]) + (f", ... ({len(keys) - 16} more)" if len(keys) > 16 else "")
        log.warning("Non-finite loss or gradient at step %d: optimiser step skipped (%d skipped in all, %d in a row); "
                    "batch sample keys: %s", trainer.global_step, self.skipped_steps, self.skipped_in_a_row,
                    shown or "?")
        limit = self.max_consecutive
        if limit is not None and self.skipped_in_a_row >= limit:
            raise RuntimeError(
                f"Training stopped: {self.skipped_in_a_row} optimiser steps in a row had a non-finite loss or "
                f"gradient ({self.limit_setting}={limit}); the last batch's sample keys: "
                f"{shown or '?'}. Lower model.lr, keep gradient clipping on (trainer.gradient_clip_val), check "
                "those samples, or resume from an earlier checkpoint."
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Handed to the loggers only on the steps they write (as Sam3LitModule's per-term losses): global_step
        # has already moved past this batch.
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0 or trainer.should_stop:
            pl_module.log("train/skipped_steps", float(self.skipped_steps), batch_size=1)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {"total": self.skipped_steps, "in_a_row": self.skipped_in_a_row}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        skipped = checkpoint.get(CHECKPOINT_KEY) or {}
        self.skipped_steps = int(skipped.get("total", 0))
        self.skipped_in_a_row = int(skipped.get("in_a_row", 0))
