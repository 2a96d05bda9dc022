"""A round's fit and held-out evaluation, through the ``sam3-train`` CLI's own classes.

The round's config (settings.round_fit_config) is written to ``round_dir/fit-config.yaml`` and
instantiated by ``Sam3CLI(run=False)``: the same schema, links and seeding as ``sam3-train fit``. The
fit logs the round's data sources and counts once to its loggers (hyper-parameter ``engine``).
The fit ends with a weights-only checkpoint written as ``model.ckpt.tmp`` and renamed by rank 0;
evaluation always reads that file (so a resumed evaluation sees exactly what an uninterrupted one
would), runs ``trainer.test`` on the held-out split and returns its ``test/*`` metrics.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L

from sam3_train.cli import Sam3CLI, finish_wandb
from sam3_train.dist import barrier
from sam3_train.engine.manifest import FIT_CONFIG, MODEL
from sam3_train.engine.settings import make_cli
from sam3_train.loading import load_module, load_weights

log = logging.getLogger(__name__)


def build_cli(config_path: Path):
    """(trainer, model, datamodule) of a ``sam3-train`` config file, not run."""
    cli = make_cli(Sam3CLI, ["--config", str(config_path)])
    return cli.trainer, cli.model, cli.datamodule


class _LogRoundInfo(L.Callback):
    """The round's sources and counts to every logger as the ``engine`` hyper-parameter, at fit start."""

    def __init__(self, round_info: dict[str, Any]):
        self.round_info = round_info

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger in trainer.loggers:
            logger.log_hyperparams({"engine": self.round_info})


def fit_round(*, round_dir: Path, round_info: dict[str, Any], init_from: str | os.PathLike | None = None) -> L.Trainer:
    """Fit the round's config and save its weights as ``round_dir/model.ckpt.tmp`` (the caller
    publishes it by renaming); returns the trainer, for evaluation.

    ``init_from``: a checkpoint whose weights start the fit (None: the config's initialisation).
    """
    trainer, model, datamodule = build_cli(round_dir / FIT_CONFIG)
    trainer.callbacks.append(_LogRoundInfo(round_info))
    if init_from is not None:
        load_weights(model, init_from)  # checked and strict; LoRA adapters only on their own base
    trainer.fit(model, datamodule=datamodule)
    trainer.save_checkpoint(round_dir / (MODEL + ".tmp"), weights_only=True)  # collective: rank 0 writes
    barrier()
    return trainer


def evaluate(*, round_dir: Path, checkpoint: Path, trainer: L.Trainer | None = None) -> tuple[dict[str, float], L.Trainer]:
    """``trainer.test`` of ``checkpoint`` on the round config's test split -> ({"test/cgF1": ..}, trainer).

    Without ``trainer`` (a resumed round) one is built from the round's config; its loggers start a new run.
    """
    datamodule = None
    if trainer is None:
        trainer, _, datamodule = build_cli(round_dir / FIT_CONFIG)
    else:
        datamodule = trainer.datamodule
    model = load_module(checkpoint)
    results = trainer.test(model, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in sorted((results[0] if results else {}).items())}
    return metrics, trainer


def _flatten(prefix: str, value: Any, out: dict[str, float]) -> dict[str, float]:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}/{k}", v, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix] = float(value)
    return out


def log_round(trainer: L.Trainer, *, round_index: int, counts: dict[str, Any], metrics: dict[str, float]) -> None:
    """The round's verifier counts and metrics to the trainer's loggers (W&B: one run per round),
    then close the W&B run so that the next round's logger starts its own."""
    values = _flatten("engine", {"round": round_index, **counts}, {})
    values.update({f"engine/{k}": v for k, v in metrics.items()})
    for logger in trainer.loggers:
        logger.log_metrics(values, step=trainer.global_step)
        logger.save()
    finish_wandb(trainer)
