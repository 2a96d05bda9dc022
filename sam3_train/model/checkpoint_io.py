"""Reading HF-format SAM 3 checkpoint directories from local disk, with strict, named key checks.

A directory holds ``config.json`` and either ``model.safetensors`` or sharded
``model-0000x-of-0000y.safetensors`` files with ``model.safetensors.index.json``. The released
``facebook/sam3`` checkpoint is a video model: its config nests the detector under
``detector_config`` and its weights under ``detector_model.``; the tracker's weights are not the
detector's and are skipped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import Sam3Config

log = logging.getLogger(__name__)

_DETECTOR_PREFIX = "detector_model."
_TRACKER_PREFIXES = ("tracker_model.", "tracker_neck.")


def check_directory(directory: str | Path) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"Checkpoint directory {directory} does not exist: pass a local folder holding config.json and "
            "*.safetensors (the facebook/sam3 layout); nothing is downloaded at run time."
        )
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} has no config.json: it is not an HF-format SAM 3 checkpoint directory.")
    return directory


def read_config(directory: Path) -> Sam3Config:
    raw = json.loads((directory / "config.json").read_text())
    if raw.get("detector_config"):  # the released video-model layout
        raw = raw["detector_config"]
    if raw.get("model_type") not in (None, "sam3"):
        raise ValueError(f"{directory}/config.json describes a {raw.get('model_type')!r} model, not SAM 3 ('sam3').")
    raw.pop("model_type", None)
    return Sam3Config(**raw)


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / name for name in shards]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} holds no *.safetensors weights.")
    return files


def read_detector_state(directory: Path) -> dict[str, torch.Tensor]:
    """The detector's tensors, keyed as in ``Sam3Model.state_dict()``."""
    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(directory):
        state.update(load_file(str(path)))
    if any(k.startswith(_DETECTOR_PREFIX) for k in state):
        skipped = [k for k in state if k.startswith(_TRACKER_PREFIXES)]
        if skipped:
            log.info("Skipping %d tracker tensors of %s (not part of the detector).", len(skipped), directory)
        state = {k[len(_DETECTOR_PREFIX):]: v for k, v in state.items() if k.startswith(_DETECTOR_PREFIX)}
    return state


def listing(keys: list[str], limit: int = 12) -> str:
    """Up to ``limit`` names, comma-separated, and how many more there are."""
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def state_mismatch(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[str]:
    """Missing, unexpected and misshapen keys of ``state`` against ``expected``, one phrase per kind."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = sorted(
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {listing(unexpected)}")
    if misshapen:
        problems.append(f"shape mismatches: {listing(misshapen)}")
    return problems


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], *, source: object) -> None:
    """``load_state_dict(strict=True)`` with one message naming missing, unexpected and misshapen keys."""
    problems = state_mismatch(model.state_dict(), state)
    if problems:
        raise KeyError(
            f"Checkpoint {source} does not fit the model: " + "; ".join(problems)
            + ". Check that the checkpoint and the model preset/config describe the same architecture."
        )
    model.load_state_dict(state, strict=True)
