"""Safe checkpoints: a SIGKILL in the middle of a save leaves the previous last.ckpt loadable; a
checkpoint carrying pickled code is refused without running it; truncated and foreign files fail
with a message naming the file and what was expected."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from fault_cli import callback, fit_config, output, run

from sam3_train.checkpointing import CheckpointError, SafeCheckpointIO, load_checkpoint_file, save_atomically

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class _RunsCode:
    """Unpickling it runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _lightning_like(**extra) -> dict:
    return {"state_dict": {"w": torch.arange(4096, dtype=torch.float32)}, "pytorch-lightning_version": "2.6.6",
            "global_step": 3, **extra}


@pytest.mark.slow
def test_kill_during_a_save_keeps_the_previous_last_checkpoint(shapes_root, tmp_path):
    root = tmp_path / "run"
    config = fit_config(root, shapes_root, trainer={"max_steps": 5}, data={"steps_per_epoch": 5}, every_n_train_steps=1)
    last = root / "checkpoints" / "last.ckpt"
    proc = run(["fit", "--config", str(config), callback("KillDuringSave", step=3)], tmp_path)
    assert proc.returncode == -9, output(proc)[-4000:]
    partials = sorted(p.name for p in last.parent.iterdir() if p.name != "last.ckpt")
    assert len(partials) == 1 and partials[0].startswith(".last.ckpt.partial-")  # the save that was cut short
    assert load_checkpoint_file(last)["global_step"] == 2  # the previous one, whole

    # It resumes; SIGTERM outside SLURM: save at the end of the step, no requeue, exit 128 + 15.
    proc = run(["fit", "--config", str(config), "--ckpt_path", "last", callback("SignalAt", step=3, signal="SIGTERM")],
               tmp_path)
    assert proc.returncode == 128 + 15, output(proc)[-4000:]
    assert "Restoring states from the checkpoint path at " + str(last) in output(proc)
    assert (f"sam3-train: SIGTERM received: saved {last} at step 4; resume with the same command plus --ckpt_path last."
            in output(proc))
    assert load_checkpoint_file(last)["global_step"] == 4
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # the stale partial is gone


def test_atomic_save_replaces_whole_files_only(tmp_path):
    path = tmp_path / "ckpts" / "last.ckpt"
    save_atomically(_lightning_like(), path)
    before = path.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_atomically(_lightning_like(bad=Unpicklable()), path)
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    SafeCheckpointIO().save_checkpoint(_lightning_like(global_step=7), path)
    assert SafeCheckpointIO().load_checkpoint(path)["global_step"] == 7


def test_pickled_code_is_refused_without_running_it(shapes_root, tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.ckpt"
    torch.save(_lightning_like(hook=_RunsCode(marker)), evil)
    for load in (load_checkpoint_file, SafeCheckpointIO().load_checkpoint):
        with pytest.raises(CheckpointError, match=r"carries pickled Python objects that are not plain data \(posix.system\)") as info:
            load(evil)
        assert str(evil) in str(info.value) and "--weights_only false" in str(info.value)
    proc = run(["fit", "--config", str(fit_config(tmp_path / "run", shapes_root)), "--ckpt_path", str(evil)], tmp_path)
    assert proc.returncode != 0
    assert f"sam3-train fit: --ckpt_path: Checkpoint {evil} carries pickled Python objects" in output(proc)
    assert not marker.exists()


def test_truncated_and_foreign_files_are_named(tmp_path):
    whole = tmp_path / "whole.ckpt"
    torch.save(_lightning_like(), whole)
    data = whole.read_bytes()
    cases = {
        "truncated.ckpt": (data[: len(data) // 2], r"is truncated or corrupted \(a zip archive that cannot be read to its end"),
        "empty.ckpt": (b"", r"is empty \(0 bytes\)"),
        "notes.ckpt": (b"step 3: loss 0.5\n", r"is not a PyTorch checkpoint"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=message) as info:
            load_checkpoint_file(tmp_path / name)
        assert f"Checkpoint {tmp_path / name} " in str(info.value)
        assert "expected a .ckpt file written by `sam3-train fit`" in str(info.value)
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pt")  # a bare state dict
    with pytest.raises(CheckpointError, match=r"weights.pt is a torch file but not a Lightning checkpoint \(it holds \['w'\]\)"):
        load_checkpoint_file(tmp_path / "weights.pt")
    with pytest.raises(FileNotFoundError, match=r"Checkpoint directory .*no_such_run/checkpoints does not exist"):
        load_checkpoint_file(tmp_path / "no_such_run" / "checkpoints" / "last.ckpt")
    with pytest.raises(FileNotFoundError, match=r"last.ckpt does not exist; that folder holds .*whole.ckpt.*--ckpt_path last"):
        load_checkpoint_file(tmp_path / "last.ckpt")
