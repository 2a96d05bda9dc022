"""A round's fit and held-out evaluation, through the ``sam3-train`` CLI's own classes.

The round's config (config.round_fit_config) is written to ``round_dir/fit-config.yaml`` and
instantiated by ``Sam3CLI(run=False)``: the same schema, links and seeding as ``sam3-train fit``.
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

from sam3_train.engine import dist
from sam3_train.engine.settings import DataEngine

log = logging.getLogger(__name__)
MODEL = "model.ckpt"
FIT_CONFIG = "fit-config.yaml"


def build_cli(config_path: Path):
    """(trainer, model, datamodule) of a ``sam3-train`` config file, not run."""
    from sam3_train.cli import Sam3CLI
    from sam3_train.data import Sam3DataModule
    from sam3_train.lit import Sam3LitModule

    cli = Sam3CLI(Sam3LitModule, Sam3DataModule, parser_kwargs={"parser_mode": "omegaconf"},
                  args=["--config", str(config_path)], run=False, save_config_callback=None)
    return cli.trainer, cli.model, cli.datamodule


def _engine_callback(trainer: L.Trainer) -> DataEngine | None:
    return next((c for c in trainer.callbacks if isinstance(c, DataEngine)), None)


def load_weights(model: L.LightningModule, checkpoint: str | os.PathLike) -> None:
    """Weights of a Lightning checkpoint into ``model`` (strict: a different architecture fails;
    loaded without running pickled code, errors naming the file: ``checkpointing.load_checkpoint_file``)."""
    from sam3_train.checkpointing import load_checkpoint_file

    model.load_state_dict(load_checkpoint_file(checkpoint)["state_dict"])


def fit_round(*, round_dir: Path, round_info: dict[str, Any], init_from: str | os.PathLike | None = None) -> L.Trainer:
    """Fit the round's config and save its weights as ``round_dir/model.ckpt.tmp`` (the caller
    publishes it by renaming); returns the trainer, for evaluation.

    ``init_from``: a checkpoint whose weights start the fit (None: the config's initialisation).
    """
    trainer, model, datamodule = build_cli(round_dir / FIT_CONFIG)
    callback = _engine_callback(trainer)
    if callback is not None:
        callback.round_info = round_info
    if init_from is not None:
        load_weights(model, init_from)
    trainer.fit(model, datamodule=datamodule)
    trainer.save_checkpoint(round_dir / (MODEL + ".tmp"), weights_only=True)  # collective: rank 0 writes
    dist.barrier()
    return trainer


def evaluate(*, round_dir: Path, checkpoint: Path, trainer: L.Trainer | None = None) -> tuple[dict[str, float], L.Trainer]:
    """``trainer.test`` of ``checkpoint`` on the round config's test split -> ({"test/cgF1": ..}, trainer).

    Without ``trainer`` (a resumed round) one is built from the round's config; its loggers start a new run.
    """
    from sam3_train.lit import Sam3LitModule

    datamodule = None
    if trainer is None:
        trainer, _, datamodule = build_cli(round_dir / FIT_CONFIG)
    else:
        datamodule = trainer.datamodule
    model = Sam3LitModule.load_from_checkpoint(checkpoint, map_location="cpu")
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
    if dist.is_main():
        from lightning.pytorch.loggers import WandbLogger

        if any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
            import wandb

            wandb.finish()
