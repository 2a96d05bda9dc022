"""HF-format SAM 3 checkpoint directories on local disk: their config, and named key checks.

A directory holds ``config.json`` and either ``model.safetensors`` or sharded
``model-0000x-of-0000y.safetensors`` files with ``model.safetensors.index.json``. The released
``facebook/sam3`` checkpoint is a video model: its config nests the detector under
``detector_config`` and its weights under ``detector_model.``; the tracker's weights are not the
detector's and are skipped. The weights themselves are read by transformers' loader
(``Sam3Detector.from_pretrained``); the messages naming missing, unexpected and misshapen keys are ours.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import Sam3Config


def check_directory(directory: str | Path) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"Checkpoint directory {directory} does not exist: pass a local folder holding config.json and "
            "*.safetensors (the facebook/sam3 layout); nothing is downloaded at run time."
        )
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} has no config.json: it is not an HF-format SAM 3 checkpoint directory.")
    if not any(directory.glob("*.safetensors")):
        raise FileNotFoundError(f"{directory} holds no *.safetensors weights.")
    return directory


def read_config(directory: Path) -> Sam3Config:
    raw = json.loads((directory / "config.json").read_text())
    if raw.get("detector_config"):  # the released video-model layout
        raw = raw["detector_config"]
    if raw.get("model_type") not in (None, "sam3"):
        raise ValueError(f"{directory}/config.json describes a {raw.get('model_type')!r} model, not SAM 3 ('sam3').")
    raw.pop("model_type", None)
    return Sam3Config(**raw)


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


def mismatch_message(source: object, problems: list[str]) -> str:
    """One message for a checkpoint whose keys do not fit the model (``problems``: :func:`state_mismatch`'s)."""
    return (f"Checkpoint {source} does not fit the model: " + "; ".join(problems)
            + ". Check that the checkpoint and the model preset/config describe the same architecture.")


def loading_problems(info: dict[str, Any]) -> list[str]:
    """:func:`state_mismatch`'s phrases from transformers' ``output_loading_info`` (missing, unexpected and
    ``mismatched_keys``: (name, checkpoint shape, model shape))."""
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing keys: {listing(sorted(info['missing_keys']))}")
    if info.get("unexpected_keys"):
        problems.append(f"unexpected keys: {listing(sorted(info['unexpected_keys']))}")
    if info.get("mismatched_keys"):
        misshapen = sorted(f"{k} (checkpoint {tuple(theirs)}, model {tuple(ours)})"
                           for k, theirs, ours in info["mismatched_keys"])
        problems.append(f"shape mismatches: {listing(misshapen)}")
    return problems
