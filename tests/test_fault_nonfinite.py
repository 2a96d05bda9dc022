"""Non-finite losses and gradients: the optimiser step is skipped (weights and AdamW state untouched),
counted in ``train/skipped_steps`` and named with the batch's sample keys; N in a row stop the run."""

from __future__ import annotations

import csv
import logging

import lightning as L
import pytest
import torch
from conftest import SHAPES_SPLITS
from lightning.pytorch.loggers import CSVLogger

from sam3_train.data import Sam3DataModule
from sam3_train.lit import Sam3LitModule
from sam3_train.nonfinite import SkipNonFinite

pytestmark = pytest.mark.usefixtures("one_thread")


class Inject(L.Callback):
    """NaN images in the batches of ``nan_steps``; an infinite gradient (finite loss) in ``inf_grad_steps``.
    Records, per optimiser step, the weights before and after and the batch keys."""

    def __init__(self, *, nan_steps=(), inf_grad_steps=()):
        self.nan_steps, self.inf_grad_steps = set(nan_steps), set(inf_grad_steps)
        self.before, self.after, self.keys, self.adam_steps = {}, {}, {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        self.before[step] = [p.detach().clone() for p in pl_module.parameters()]
        self.keys[step] = list(batch.keys)
        if step in self.nan_steps:
            batch.images.fill_(float("nan"))

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step in self.inf_grad_steps:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1  # the step this batch was for
        self.after[step] = [p.detach().clone() for p in pl_module.parameters()]
        state = trainer.optimizers[0].state
        self.adam_steps[step] = sorted({float(s["step"]) for s in state.values()}) if state else []


def _fit(shapes_root, tmp_path, inject: Inject, *, max_steps: int, limit: int | None, callbacks=()):
    dm = Sam3DataModule(shapes_root=shapes_root, shapes_splits=SHAPES_SPLITS, image_size=112, batch_size=2,
                        num_workers=0, max_phrases_per_image=2, steps_per_epoch=max_steps)
    module = Sam3LitModule(preset="tiny", image_size=112, lr=1e-3, lr_vision=1e-3, lr_text=1e-3, warmup_steps=0,
                           max_consecutive_skipped_steps=limit)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=CSVLogger(tmp_path, name="csv"),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, log_every_n_steps=1, gradient_clip_val=0.1, callbacks=[inject, *callbacks])
    torch.manual_seed(0)
    trainer.fit(module, datamodule=dm)
    return module, trainer


def test_non_finite_steps_are_skipped_counted_and_named(shapes_root, tmp_path, caplog):
    inject = Inject(nan_steps=[1], inf_grad_steps=[2])
    with caplog.at_level(logging.WARNING, logger="sam3_train.nonfinite"):
        module, trainer = _fit(shapes_root, tmp_path, inject, max_steps=4, limit=3)
    skip = next(c for c in trainer.callbacks if isinstance(c, SkipNonFinite))  # the one the module added
    assert trainer.global_step == 4 and skip.skipped_steps == 2 and skip.skipped_in_a_row == 0
    for step in (1, 2):  # skipped: not one weight moved, AdamW's step counters did not advance
        assert all(torch.equal(a, b) for a, b in zip(inject.before[step], inject.after[step])), step
        assert inject.adam_steps[step] == inject.adam_steps[0] == [1.0]
    for step in (0, 3):  # real steps
        assert not all(torch.equal(a, b) for a, b in zip(inject.before[step], inject.after[step])), step
    assert inject.adam_steps[3] == [2.0]
    assert all(torch.isfinite(p).all() for p in module.parameters())
    warnings = [r.getMessage() for r in caplog.records if "optimiser step skipped" in r.getMessage()]
    assert len(warnings) == 2
    assert "at step 1" in warnings[0] and ", ".join(inject.keys[1]) in warnings[0]
    assert "at step 2" in warnings[1] and ", ".join(inject.keys[2]) in warnings[1]
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        logged = {int(r["step"]): float(r["train/skipped_steps"]) for r in csv.DictReader(f) if r.get("train/skipped_steps")}
    assert logged == {0: 0.0, 1: 1.0, 2: 2.0, 3: 2.0}


def test_too_many_in_a_row_stop_the_run_with_the_keys(shapes_root, tmp_path):
    inject = Inject(nan_steps=[1, 2, 3])
    with pytest.raises(RuntimeError, match=r"Training stopped: 2 optimiser steps in a row had a non-finite loss") as info:
        _fit(shapes_root, tmp_path, inject, max_steps=5, limit=2)
    assert ", ".join(inject.keys[2]) in str(info.value) and "model.max_consecutive_skipped_steps=2" in str(info.value)
    assert inject.after.keys() == {0, 1}  # stopped inside step 2, before its (skipped) update
    assert all(torch.equal(a, b) for a, b in zip(inject.after[0], inject.before[2]))  # the weights of step 0 remain


def test_a_trainer_s_own_callback_replaces_the_module_s(shapes_root, tmp_path):
    own = SkipNonFinite(max_consecutive=None)  # as a config's trainer.callbacks would name it
    inject = Inject(nan_steps=[0, 1])
    _, trainer = _fit(shapes_root, tmp_path, inject, max_steps=3, limit=1, callbacks=[own])  # limit 1: would stop
    assert [c for c in trainer.callbacks if isinstance(c, SkipNonFinite)] == [own]
    assert trainer.global_step == 3 and own.skipped_steps == 2 and own.skipped_in_a_row == 0
