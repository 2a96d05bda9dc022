"""``sam3-train fit-verifier``: train a learned verifier with the same CLI class as ``sam3-train fit``
(:class:`~sam3_train.cli.Sam3CLI`: atomic, safely loaded checkpoints, preemption handling, option
suggestions, a checked ``--ckpt_path``), over VerifierModule (module.py) and VerifierData (data.py).

    sam3-train fit-verifier --config configs/verifiers/base.yaml --config configs/verifiers/mv.yaml \\
        --data.examples=runs/examples/mv-examples.pt --save_to=mv.ckpt
    sam3-train fit-verifier --config configs/verifiers/base.yaml --config configs/verifiers/ev.yaml ...

``base.yaml`` holds what the two verifiers share, ``mv.yaml`` / ``ev.yaml`` what sets them apart (read
in order: a later file's values replace an earlier one's, lists whole). :func:`read_verifier_config`
reads such a pair with the same parser, for the engine's verifiers stage (stage.py).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml

from sam3_train.atomic import atomic_path
from sam3_train.cli import Sam3CLI
from sam3_train.engine.learned.data import VerifierData
from sam3_train.engine.learned.module import VerifierModule


class VerifierCLI(Sam3CLI):
    """Sam3CLI over VerifierModule / VerifierData, plus ``--save_to`` (the trained weights and
    hyper-parameters, written atomically at the end of the fit: what LearnedMaskVerifier /
    LearnedExhaustivityVerifier load)."""

    def add_arguments_to_parser(self, parser) -> None:
        # Not Sam3CLI's: it links the detector's data.image_size to model.image_size, which a verifier has not.
        parser.add_argument("--save_to", type=str | None, default=None,
                            help="write the trained verifier here (what LearnedMaskVerifier / "
                                 "LearnedExhaustivityVerifier load)")

    def after_fit(self) -> None:
        save_to = self.config[self.config.subcommand].get("save_to")
        if save_to:
            with atomic_path(save_to) as partial:
                self.trainer.save_checkpoint(partial, weights_only=True)


def _quiet(build):
    with warnings.catch_warnings():  # "args given while sys.argv holds some": they are sam3-train's own
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python")
        return build()


def fit_verifier(args: list[str]) -> int:
    """``sam3-train fit-verifier --config ... [--key=value ...]`` (what follows ``fit-verifier``); returns 0."""
    _quiet(lambda: VerifierCLI(VerifierModule, VerifierData, args=["fit", *args],
                               save_config_callback=None))
    return 0


class _ConfigReader(VerifierCLI):
    """The parser alone: nothing is built."""

    def instantiate_classes(self) -> None:
        pass


def read_verifier_config(configs: list[str | os.PathLike]) -> dict[str, Any]:
    """The ``fit-verifier`` config files ``configs``, read in order by fit-verifier's own parser (the same
    merge, schema and errors), as one complete config dict. A missing file or a bad key raises, naming it.

    Compromise: LightningCLI applies ``seed_everything`` as it parses, so this seeds the global RNGs as
    the fit that follows it does (the stage always runs one after reading)."""
    for path in configs:
        if not Path(path).is_file():
            raise FileNotFoundError(f"verifier config {path} does not exist (engine.verifier_training)")
    args = [a for path in configs for a in ("--config", str(path))]
    cli = _quiet(lambda: _ConfigReader(VerifierModule, VerifierData, args=args, run=False, save_config_callback=None,
                                       parser_kwargs={"exit_on_error": False}))
    return yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))


def main(argv: list[str] | None = None) -> int:
    return fit_verifier(sys.argv[1:] if argv is None else list(argv))
