"""One way to load what ``sam3-train fit`` trained: a detector, the whole module, or its weights into a module.

    detector = load_detector("runs/x/checkpoints/last.ckpt")   # or an HF folder; LoRA adapters merged
    module = load_module("round-000/model.ckpt")               # the Sam3LitModule (trainer.test, ...)
    load_weights(module, "round-000/model.ckpt")               # a checkpoint's weights into a built module
    checkpoint_thresholds("round-000/model.ckpt")              # its prediction thresholds (sam3-train predict's)

Every ``.ckpt`` is first checked by :func:`sam3_train.checkpointing.check_checkpoint_file` (a missing,
empty, truncated or foreign file, or one carrying pickled code, fails with one message naming it) and
then read with ``torch.load(weights_only=True)``. A LoRA checkpoint holds only the adapters and its
base's fingerprint: the base is rebuilt from the run's settings (``model.pretrained``) and refused if
its fingerprint differs (``sam3_train.model.lora.check_adapter_base``); ``load_detector`` then folds the
adapters in (``merge_lora``), so the detector it returns is a plain ``Sam3Detector`` either way.

Why this module sits beside ``lit.py`` and not in ``model/``: a ``.ckpt`` holds the run's settings
(preset or pretrained folder, image size, overrides, LoRA settings, the criterion that decides which
weights were trained), not a detector config, and turning those settings into a detector is
``Sam3LitModule``'s constructor; rebuilding them in ``model/`` would be a second copy of it. The
``model/`` package never imports Lightning; this module does, through ``lit``.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch

from sam3_train.checkpointing import SAFE_GLOBALS, check_checkpoint_file, load_checkpoint_file
from sam3_train.lit import Sam3LitModule
from sam3_train.model import Sam3Detector
from sam3_train.model.lora import merge_lora


def load_module(path: str | os.PathLike, *, weights_only: bool | None = None, **overrides: Any) -> Sam3LitModule:
    """The ``Sam3LitModule`` of a ``sam3-train fit`` checkpoint, on the CPU, its weights loaded strictly.

    ``overrides`` replace settings of the checkpoint's hyper-parameters (``pretrained="/moved/base"``
    when the base folder has moved). ``weights_only=False`` opts out of the safe load for a file you
    trust (as ``--weights_only false``). Raises FileNotFoundError or ``CheckpointError`` for the file,
    KeyError / ValueError (naming the file) for a checkpoint that does not fit the rebuilt model.
    """
    path = Path(path)
    check_checkpoint_file(path, weights_only=weights_only)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):  # the harmless types our hyper-parameters may hold
            return Sam3LitModule.load_from_checkpoint(path, map_location="cpu", weights_only=weights_only is not False,
                                                      **overrides)
    except (KeyError, ValueError) as exn:
        raise _named(exn, path) from None


def load_detector(source: str | os.PathLike, *, pretrained: str | os.PathLike | None = None) -> Sam3Detector:
    """A detector trained here, as a plain ``Sam3Detector`` on the CPU.

    ``source``: an HF-layout folder (``Sam3Detector.save_pretrained``, ``tools/merge_lora.py``'s output,
    a converted or the released ``facebook/sam3`` checkpoint: ``Sam3Detector.from_pretrained``) or a
    ``.ckpt`` written by ``sam3-train fit``, with or without LoRA adapters (merged into their base).
    ``pretrained``: the base folder of a ``.ckpt`` when it is no longer where the run read it.
    """
    source = Path(source)
    if source.is_dir():
        return Sam3Detector.from_pretrained(source)
    if not source.exists():
        raise FileNotFoundError(
            f"Detector {source} does not exist: pass an HF-layout folder (config.json + *.safetensors) or a .ckpt "
            "written by sam3-train fit."
        )
    module = load_module(source, **({"pretrained": str(pretrained)} if pretrained else {}))
    return merge_lora(module.detector) if module.lora is not None else module.detector


def checkpoint_thresholds(source: str | os.PathLike | None = None) -> dict[str, Any]:
    """Post-processing settings of ``sam3-train predict`` for this source (what ``sam3-train export``
    writes in deploy.json and the Label Studio backend uses): the run's hyper-parameters
    for a ``.ckpt``, ``Sam3LitModule``'s defaults otherwise (an HF folder, None)."""
    defaults = inspect.signature(Sam3LitModule.__init__).parameters
    values = {"eval_score_threshold": defaults["eval_score_threshold"].default,
              "max_detections": defaults["max_detections"].default}
    if source is not None and Path(source).is_file():
        hparams = load_checkpoint_file(source, mmap=True).get("hyper_parameters", {})  # mmap: no tensor read
        values.update({k: hparams[k] for k in values if k in hparams})
    return {"score_threshold": float(values["eval_score_threshold"]), "max_detections": int(values["max_detections"]),
            "mask_threshold": 0.0}


def load_weights(module: Sam3LitModule, path: str | os.PathLike) -> None:
    """The weights of checkpoint ``path`` into ``module`` (a warm start): checked as a ``--ckpt_path``
    resume is (``on_load_checkpoint``: a different architecture fails naming the differing settings; LoRA
    adapters are refused on another base), then loaded strictly."""
    checkpoint = load_checkpoint_file(path)
    try:
        module.on_load_checkpoint(checkpoint)
    except (KeyError, ValueError) as exn:
        raise _named(exn, path) from None
    module.load_state_dict(checkpoint["state_dict"])


def _named(exn: Exception, path: str | os.PathLike) -> Exception:
    """``exn`` with the file named: outside a Trainer the module's on_load_checkpoint knows no path, and
    its refusals begin "The checkpoint"."""
    message = exn.args[0] if exn.args and isinstance(exn.args[0], str) else str(exn)
    if message.startswith("The checkpoint"):
        return type(exn)(f"Checkpoint {path}" + message[len("The checkpoint"):])
    return exn
