"""Checkpoint files: written atomically, read without running pickled code, named when they are wrong.

``SafeCheckpointIO`` is the Trainer's checkpoint plugin (``sam3-train`` installs it unless a config
names another CheckpointIO):

- **Atomic saves** (``sam3_train.atomic``). ``torch.save`` writes ``.{name}.partial-{pid}`` next to
  the target, which is fsync'ed and then renamed over it (``os.replace``: atomic on POSIX). A kill
  during a save leaves the previous ``last.ckpt`` as it was, plus a partial file that the next save
  removes. Lightning's own ``_atomic_save`` buffers the whole checkpoint in memory and then writes it
  in place.
- **Safe loads.** ``torch.load(weights_only=True)``: tensors, numbers, strings and containers only,
  plus the few harmless types in ``SAFE_GLOBALS``. A checkpoint carrying pickled code (any other
  global, e.g. ``os.system``) is refused before anything in it runs. ``--weights_only false`` on
  the command line opts out for a file you trust.
- **Named errors.** A missing file or folder, a truncated file, a foreign file (not a torch zip
  archive, or a torch file without Lightning's keys) each fail with one message naming the path
  and what was expected.

    trainer = Trainer(plugins=[SafeCheckpointIO()])
    checkpoint = load_checkpoint_file("runs/x/checkpoints/last.ckpt")       # or check it cheaply:
    check_checkpoint_file("runs/x/checkpoints/last.ckpt")                   # mmap: no tensor is read
"""

from __future__ import annotations

import datetime
import logging
import os
import pathlib
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

from sam3_train.atomic import atomic_path

log = logging.getLogger(__name__)

# Types a Lightning checkpoint of ours may carry besides plain data (in hyper-parameters): harmless to build.
SAFE_GLOBALS: list[Any] = [pathlib.PosixPath, pathlib.PurePosixPath, datetime.timedelta]
LIGHTNING_KEYS = ("state_dict", "pytorch-lightning_version")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format is a zip archive
_EXPECTED = "a .ckpt file written by `sam3-train fit` (a torch.save zip archive holding state_dict, optimizer_states, loops)"


class CheckpointError(ValueError):
    """A checkpoint file that cannot or must not be loaded; the message names it and the reason."""


def _partial_name(path: Path, pid: int) -> Path:
    # Hidden and without the .ckpt suffix: ModelCheckpoint's search for last*.ckpt never picks it up.
    return path.with_name(f".{path.name}.partial-{pid}")


def _remove_stale_partials(path: Path) -> None:
    for stale in path.parent.glob(f".{path.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_atomically(checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`sam3_train.atomic.atomic_path` (partial file in the same folder,
    fsync, rename over ``path``, fsync the folder), with a partial name per process: two processes
    saving the same path never write into one partial, and the partials of dead processes are removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(path)
    # Through a file object, not the partial's path: torch would name the zip's records after the
    # partial file; a stream gets the fixed name "archive", as every save before this one.
    with atomic_path(path, partial=_partial_name(path, os.getpid())) as partial, open(partial, "wb") as f:
        torch.save(checkpoint, f)


def _missing(path: Path) -> CheckpointError | FileNotFoundError:
    hint = ("pass --ckpt_path last (the newest last*.ckpt in the run's checkpoint folder; a fresh start if "
            "there is none) or the path of an existing .ckpt file")
    if not path.parent.is_dir():
        return FileNotFoundError(f"Checkpoint directory {path.parent} does not exist (checkpoint {path}): {hint}.")
    present = sorted(p.name for p in path.parent.glob("*.ckpt"))
    listing = f"; that folder holds {', '.join(present[:8])}" if present else "; that folder holds no .ckpt file"
    return FileNotFoundError(f"Checkpoint {path} does not exist{listing}: {hint}.")


def load_checkpoint_file(
    path: str | os.PathLike,
    *,
    map_location: Any = "cpu",
    weights_only: bool | None = None,
    mmap: bool = False,
) -> dict[str, Any]:
    """Load a Lightning checkpoint, refusing pickled code unless ``weights_only`` is False.

    ``mmap=True`` maps the tensors instead of reading them (a cheap check of a large file).
    Raises FileNotFoundError (missing file or folder) or :class:`CheckpointError` (anything else).
    """
    path = Path(path)
    if not path.is_file():
        raise _missing(path)
    safe = weights_only is not False
    if not safe:
        log.warning("Loading %s with weights_only=False: any code pickled into it runs. Only do this for files you trust.", path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"Checkpoint {path} is empty (0 bytes); expected {_EXPECTED}.")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location=map_location, weights_only=safe, mmap=mmap)
    except pickle.UnpicklingError as exn:
        text = str(exn)
        found = re.findall(r"GLOBAL ([\w.]+)", text)
        if safe and found:
            raise CheckpointError(
                f"Checkpoint {path} carries pickled Python objects that are not plain data ({', '.join(found)}): "
                "refused without running them (torch.load with weights_only=True). Checkpoints written by "
                "sam3-train hold only tensors, numbers and strings. If you made this file yourself and trust it, "
                "pass --weights_only false."
            ) from None
        raise CheckpointError(f"Checkpoint {path} is not a PyTorch checkpoint ({text.splitlines()[0]}); expected {_EXPECTED}.") from None
    except Exception as exn:  # garbage input raises anything (KeyError, IndexError, OSError, ...)
        first = (str(exn).splitlines() or [type(exn).__name__])[0].split(". ")[0]
        with open(path, "rb") as f:
            is_zip = f.read(4) == _ZIP_MAGIC
        if is_zip:  # begins as torch.save's zip archive but cannot be read to its end
            reason = "is truncated or corrupted (a zip archive that cannot be read to its end: cut short while being written?)"
        else:
            reason = "is not a PyTorch checkpoint"
        raise CheckpointError(
            f"Checkpoint {path} {reason} ({type(exn).__name__}: {first[:160]}); expected {_EXPECTED}. "
            "Resume from an earlier checkpoint of the run instead."
        ) from None
    if not isinstance(checkpoint, dict) or not all(k in checkpoint for k in LIGHTNING_KEYS):
        keys = sorted(map(str, checkpoint))[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(
            f"{path} is a torch file but not a Lightning checkpoint (it holds {keys}); expected {_EXPECTED}. "
            "To start from weights only, use model.pretrained with an HF-format SAM 3 folder."
        )
    return checkpoint


def check_checkpoint_file(path: str | os.PathLike, *, weights_only: bool | None = None) -> None:
    """Fail with the message of :func:`load_checkpoint_file` if ``path`` cannot be loaded; reads no tensor."""
    load_checkpoint_file(path, weights_only=weights_only, mmap=True)


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO with atomic saves and safe, explained loads (see the module docstring).
    Remote paths (``s3://``, ...) keep Lightning's behaviour."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_atomically(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        if not _is_local_file_protocol(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        location = map_location if map_location is not None else (lambda storage, loc: storage)
        return load_checkpoint_file(path, map_location=location, weights_only=weights_only)
