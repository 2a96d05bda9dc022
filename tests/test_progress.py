"""StepProgressBar: the training bar reads the optimiser step out of the run's total, across epoch
boundaries and from a resumed step; Sam3CLI adds it unless bars are off or the config chose one."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from conftest import SHAPES_SPLITS
from torch.utils.data import DataLoader

from sam3_train.cli import Sam3CLI
from sam3_train.data import Sam3DataModule
from sam3_train.lit import Sam3LitModule
from sam3_train.progress import StepProgressBar

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")  # args= is how tests run it


class _Fit(L.LightningModule):
    """One weight, an epoch of 2 batches: a 3-step run crosses an epoch boundary."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        loss = ((self.w - batch) ** 2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(torch.ones(2, 1), batch_size=1)


def _trainer(tmp_path, max_steps: int) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                     enable_model_summary=False, default_root_dir=tmp_path, callbacks=[StepProgressBar()])


def test_bar_counts_steps_out_of_max_steps_across_epochs(tmp_path, capsys):
    trainer = _trainer(tmp_path, max_steps=3)
    trainer.fit(_Fit())
    bar = trainer.progress_bar_callback.train_progress_bar
    assert trainer.current_epoch >= 1 and (bar.n, bar.total) == (3, 3)  # not reset at the epoch boundary
    assert str(bar).startswith("step 3/3 100%|") and "train/loss=" in str(bar)
    out = capsys.readouterr().out
    assert "step 1/3" in out and "step 2/3" in out and "Epoch" not in out


def test_bar_starts_at_the_resumed_step(tmp_path):
    first = _trainer(tmp_path, max_steps=2)
    first.fit(_Fit())
    first.save_checkpoint(tmp_path / "two.ckpt")
    trainer = _trainer(tmp_path, max_steps=5)
    trainer.fit(_Fit(), ckpt_path=tmp_path / "two.ckpt")
    bar = trainer.progress_bar_callback.train_progress_bar
    assert (bar.initial, bar.n, bar.total) == (2, 5, 5)


def _cli(tmp_path, shapes_root, *args: str):
    return Sam3CLI(Sam3LitModule, Sam3DataModule, run=False, save_config_callback=None, args=[
        "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=3",
        "--model.preset=tiny", "--data.image_size=112", f"--data.shapes_root={shapes_root}",
        f"--data.shapes_splits={json.dumps(SHAPES_SPLITS)}", "--data.num_workers=0", *args])


@pytest.mark.parametrize("args, expected", [
    ((), StepProgressBar),
    (("--trainer.enable_progress_bar=false",), None),  # no bar, and no clash with Lightning's check
    (("--trainer.callbacks=lightning.pytorch.callbacks.TQDMProgressBar",), TQDMProgressBar),  # the config's own
])
def test_sam3_cli_adds_the_step_bar_unless_bars_are_off_or_chosen(tmp_path, shapes_root, monkeypatch, args,
                                                                  expected):
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # restored after: the CLI seeds the process
    bar = _cli(tmp_path, shapes_root, *args).trainer.progress_bar_callback
    assert (type(bar) if bar is not None else None) is expected
