"""The LightningCLI of sam3-train (fit, validate, test, predict) and what other CLIs build on it.

``Sam3CLI`` is the one CLI class: the detector's runs, the data engine's round fits and the learned
verifiers' fits (``sam3-train fit-verifier``) all get its safe checkpoint I/O, preemption handling and
option suggestions. The ``sam3-train`` command itself is sam3_train/console.py, which routes each
subcommand to its owner; this module imports nothing above it (no engine, no video).


    sam3-train fit --config configs/shapes_tiny.yaml
    sam3-train fit --config configs/shapes_tiny.yaml --ckpt_path last      # resume exactly after a kill
    sam3-train validate --config configs/shapes_tiny.yaml --ckpt_path runs/shapes_tiny/checkpoints/last.ckpt
    sam3-train fit --config configs/shapes_tiny.yaml --print_config

Configs are OmegaConf YAML. ``${...}`` interpolations resolve on the merged config, after every
``--config`` file and command-line option (jsonargparse's ``omegaconf+`` mode): a later file or
``--trainer.default_root_dir=DIR`` moves every path written as ``${trainer.default_root_dir}/...``.
Derived values are linked, not repeated: the model's input size follows ``data.image_size``.

Fault tolerance comes with every run (docs/launching.md, "Resuming and preemption"): checkpoints
are written atomically and loaded without running pickled code (``SafeCheckpointIO``), SIGTERM /
SIGUSR1 save a checkpoint at the next step boundary (``Preemption``), unless the config names its
own CheckpointIO plugin or Preemption callback. A ``--ckpt_path`` file is checked before anything
is built, and an unknown option gets the nearest valid one suggested. The training bar counts steps
out of ``max_steps`` (``StepProgressBar``) unless the config has its own progress bar or turns bars
off. ``data.seed: null`` (the default) becomes the run's ``seed_everything`` when that is a number,
so that seeds vary the data stream too; an explicit ``data.seed`` wins.
"""

from __future__ import annotations

import copy
import difflib
import re
import sys
from pathlib import Path
from typing import Any

import jsonargparse
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import CheckpointIO

from sam3_train.checkpointing import CheckpointError, SafeCheckpointIO, check_checkpoint_file
from sam3_train.data import Sam3DataModule
from sam3_train.lit import Sam3LitModule
from sam3_train.preemption import Preemption
from sam3_train.progress import StepProgressBar

_UNKNOWN = (re.compile(r"does not accept option '([^']+)'"), re.compile(r"unrecognized arguments: --?([^\s=]+)"))
_SPECIAL_CKPT_PATHS = ("last", "hpc", "best")


def _option_names(parser: Any) -> list[str]:
    return [name for name in parser.get_defaults().keys() if name not in ("config", "print_config")]


class Sam3ArgumentParser(LightningArgumentParser):
    """LightningCLI's parser; an unknown option's error names the closest valid option.

    ``subcommand_parsers``: the parsers of fit, validate, ... (filled by ``Sam3CLI``), searched when the
    root parser reports the error.
    """

    subcommand_parsers: list[LightningArgumentParser]

    def error(self, message: str, ex: Exception | None = None):  # type: ignore[override]
        for pattern in _UNKNOWN:
            found = pattern.search(message)
            if found:
                parser = getattr(ex, "subcommand_parser", None) or self  # jsonargparse's own error() reads it too
                names = _option_names(parser)
                for sub in getattr(parser, "subcommand_parsers", []):
                    names += _option_names(sub)
                close = difflib.get_close_matches(found.group(1), names, n=1, cutoff=0.6)
                message += (f". Did you mean '{close[0]}'?" if close else ". Remove it;") + " `--help` lists every option."
                break
        super().error(message, ex)


class LoggedConfig(SaveConfigCallback):
    """Lightning's ``config.yaml`` in the log folder, and the same resolved config handed to every
    logger as hyper-parameters (the run config in W&B, ``hparams.yaml`` for CSV and TensorBoard)."""

    def save_config(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": config})


def as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def redirect_outputs(cfg: dict[str, Any], out_dir: str | Path, *, logs_subdir: str | None = None) -> dict[str, Any]:
    """A copy of config ``cfg`` (a dict) whose written paths all lie under ``out_dir``: the trainer's
    ``default_root_dir``, every logger's ``save_dir`` (``out_dir/logs_subdir`` when given),
    ``ModelCheckpoint``'s ``dirpath`` (``out_dir/checkpoints``) and any callback's ``output_dir``
    (``out_dir/predictions``). The data engine's round fits and the CLI tests use it."""
    out = copy.deepcopy(cfg)
    root = Path(out_dir)
    trainer = out.setdefault("trainer", {})
    trainer["default_root_dir"] = str(root)
    for logger in as_list(trainer.get("logger")):
        if isinstance(logger, dict):
            logger.setdefault("init_args", {})["save_dir"] = str(root / logs_subdir if logs_subdir else root)
    for callback in as_list(trainer.get("callbacks")):
        if isinstance(callback, dict):
            init = callback.setdefault("init_args", {})
            if callback.get("class_path", "").endswith("ModelCheckpoint"):
                init["dirpath"] = str(root / "checkpoints")
            if "output_dir" in init:
                init["output_dir"] = str(root / "predictions")
    return out


def _resolve_data_seed(config: Any) -> None:
    """``data.seed: null`` -> the run's ``seed_everything`` when that is a number (seeds vary the data
    stream too; the saved config records the value), else 0: a drawn seed (``true``) changes at every
    launch, and ``--ckpt_path`` must resume the stream it interrupted. Read before LightningCLI seeds,
    which replaces ``true`` by the drawn number. Seed 0 keeps the stream the fixed default 0 gave."""
    data = config.get("data")
    if data is not None and "seed" in data and data.seed is None:
        seed = config.get("seed_everything")
        data.seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else 0


PARSER_MODE = "omegaconf+"


class Sam3CLI(LightningCLI):
    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("parser_class", Sam3ArgumentParser)
        kwargs["parser_kwargs"] = {"parser_mode": PARSER_MODE, **(kwargs.get("parser_kwargs") or {})}
        # omegaconf+ resolves on the whole config, where a subcommand's keys sit under "fit." etc.:
        # jsonargparse's own setting turns a file's absolute ${trainer.x} into the path relative to
        # where it is written, so configs keep the plain form. Process-wide, and idempotent.
        jsonargparse.set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        parser.subcommand_parsers = []
        if not hasattr(self, "_root_parser"):  # LightningCLI builds the root parser first, then one per subcommand
            self._root_parser = parser
        else:
            self._root_parser.subcommand_parsers.append(parser)
        return parser

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.image_size", "model.image_size")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI reads --ckpt_path's hyper-parameters next, with torch's bare errors: check it first.
        subcommand = self.config.get("subcommand")
        options = self.config.get(subcommand) if subcommand else None
        _resolve_data_seed(options if options is not None else self.config)
        ckpt_path = options.get("ckpt_path") if options is not None else None
        if ckpt_path and str(ckpt_path) not in _SPECIAL_CKPT_PATHS and "://" not in str(ckpt_path):
            try:
                check_checkpoint_file(ckpt_path, weights_only=options.get("weights_only"))
            except (FileNotFoundError, CheckpointError) as exn:
                sys.exit(f"sam3-train {subcommand}: --ckpt_path: {exn}")
            self._model_before_ckpt = options.get("model").clone()

    def before_instantiate_classes(self) -> None:
        # LightningCLI has replaced the model's settings by the checkpoint's hyper-parameters: say which.
        before = getattr(self, "_model_before_ckpt", None)
        if before is None:
            return
        after = self.config[self.config.subcommand].get("model")
        changed = [f"model.{key}: {before.get(key)!r} -> {after.get(key)!r}" for key in sorted(after.keys())
                   if key in before and before.get(key) != after.get(key) and not key.startswith("_")]
        if changed:
            print(f"sam3-train: --ckpt_path: the checkpoint's model settings replace the given ones ({'; '.join(changed)})",
                  file=sys.stderr, flush=True)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self._get(self.config_init, "trainer", default={})
        plugins = as_list(kwargs.pop("plugins", config.get("plugins")))
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(SafeCheckpointIO())
        callbacks = as_list(kwargs.pop("callbacks", config.get("callbacks")))
        if not any(isinstance(c, Preemption) for c in callbacks):
            callbacks.append(Preemption())
        # The step out of max_steps, not "Epoch 3/-2" (runs are step-bounded): unless bars are off or chosen.
        bars_on = kwargs.get("enable_progress_bar", config.get("enable_progress_bar")) is not False
        if bars_on and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(StepProgressBar())
        return super().instantiate_trainer(plugins=plugins, callbacks=callbacks, **kwargs)


def finish_wandb(trainer: Trainer | None) -> None:
    """Close the W&B run of ``trainer``'s ``WandbLogger`` now (rank 0), so that its last records (the
    final validation's metrics and mask panels) are flushed while the process is whole, not left to
    W&B's exit hook: a CI run under load once lost a fit's final ``val/cgF1`` there. Without a W&B
    logger, or once the run is closed, nothing happens."""
    from lightning.pytorch.loggers import WandbLogger

    if trainer is None or not trainer.is_global_zero:
        return
    if any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish()


def main(args: list[str] | None = None) -> None:
    """fit / validate / test / predict of ``Sam3LitModule`` on ``Sam3DataModule`` (``sam3-train`` routes
    its other subcommands elsewhere: sam3_train/console.py)."""
    cli = Sam3CLI(
        Sam3LitModule,
        Sam3DataModule,
        save_config_callback=LoggedConfig,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
    finish_wandb(cli.trainer)


if __name__ == "__main__":
    main()
