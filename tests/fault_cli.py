"""Helpers of the fault-tolerance tests: a small fit config, the real CLI in a subprocess, and a
callback module (put on the child's PYTHONPATH) that injects faults at a given step."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from conftest import SHAPES_SPLITS

from sam3_train.dist import env_without_dist

SAM3_TRAIN = Path(sys.executable).with_name("sam3-train")
IMAGE_SIZE = 112

FAULTS = '''
import os, pathlib, signal, time
import lightning as L


class SignalAt(L.Callback):
    """Sends `signal` to this process at the start of the first batch that runs with global_step == `step`."""

    def __init__(self, *, step: int, signal: str = "SIGKILL"):
        self.step, self.signal, self.sent = step, signal, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.sent and trainer.global_step == self.step:
            self.sent = True
            os.kill(os.getpid(), getattr(signal, self.signal))


class Bomb:
    """Pickling it kills the process: a SIGKILL in the middle of torch.save."""

    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)


class KillDuringSave(L.Callback):
    """The checkpoint saved at global_step == `step` carries a Bomb."""

    def __init__(self, *, step: int):
        self.step = step

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if trainer.global_step == self.step:
            checkpoint["zz_bomb"] = Bomb()


class RankRecorder(L.Callback):
    """Every rank writes its pid at train start and its step count at train end under `out_dir`."""

    def __init__(self, *, out_dir: str):
        self.out_dir, self.batches = pathlib.Path(out_dir), 0

    def on_train_start(self, trainer, pl_module):
        (self.out_dir / f"pid-rank{trainer.global_rank}").write_text(str(os.getpid()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1
        (self.out_dir / f"batches-rank{trainer.global_rank}").write_text(str(self.batches))

    def on_train_end(self, trainer, pl_module):
        (self.out_dir / f"done-rank{trainer.global_rank}").write_text(f"{trainer.global_step} {self.batches}")
'''


def env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The child's environment: no inherited DDP variables, W&B off, one thread, the fault callbacks importable."""
    (tmp_path / "faults.py").write_text(FAULTS)
    out = {k: v for k, v in env_without_dist().items() if not k.startswith("SLURM_")}
    out.update(WANDB_MODE="disabled", WANDB_SILENT="true", OMP_NUM_THREADS="1", COLUMNS="200")
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), out.get("PYTHONPATH")]))
    out.update(extra)
    return out


def last_checkpoint(root: Path, every_n_train_steps: int = 2) -> dict[str, Any]:
    """The ModelCheckpoint that keeps ``root/checkpoints/last.ckpt``, written every ``every_n_train_steps``."""
    return {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(root / "checkpoints"), "save_last": True, "save_top_k": 0,
                          "every_n_train_steps": every_n_train_steps}}


def fit_config(root: Path, shapes_root: str, *, trainer: dict[str, Any] | None = None, model: dict[str, Any] | None = None,
               data: dict[str, Any] | None = None, every_n_train_steps: int = 2) -> Path:
    """A tiny-preset fit config writing everything under ``root``; sections merge over the defaults."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": 4, "log_every_n_steps": 1,
            "num_sanity_val_steps": 0, "limit_val_batches": 0, "enable_progress_bar": False,
            "enable_model_summary": False, "gradient_clip_val": 0.1, "default_root_dir": str(root),
            "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                        "init_args": {"save_dir": str(root), "name": "csv"}}],
            "callbacks": [last_checkpoint(root, every_n_train_steps)],
            **(trainer or {}),
        },
        "model": {"preset": "tiny", "warmup_steps": 2, **(model or {})},
        "data": {"shapes_root": shapes_root, "shapes_splits": SHAPES_SPLITS, "image_size": IMAGE_SIZE,
                 "batch_size": 2, "eval_batch_size": 2, "max_phrases_per_image": 3, "eval_max_phrases": 2,
                 "num_workers": 0, "steps_per_epoch": 4, "shuffle_buffer": 8, **(data or {})},
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "fit.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def callback(class_name: str, **init_args: Any) -> str:
    """A ``--trainer.callbacks+=`` value adding ``faults.<class_name>``."""
    return "--trainer.callbacks+=" + yaml.safe_dump(
        {"class_path": f"faults.{class_name}", "init_args": init_args}, default_flow_style=True).strip()


def run(args: list[str], tmp_path: Path, *, timeout: int = 300, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SAM3_TRAIN), *args], cwd=tmp_path, env=env(tmp_path, **extra_env), capture_output=True,
                          text=True, timeout=timeout, check=False)


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def logged(root: Path, version: int, key: str = "train/loss") -> list[tuple[int, str]]:
    """(step, value as written) of every row of a CSVLogger version that has ``key``."""
    path = root / "csv" / f"version_{version}" / "metrics.csv"
    with path.open() as f:
        return [(int(r["step"]), r[key]) for r in csv.DictReader(f) if r.get(key)]
