"""Exact resumption: a run killed with SIGKILL, then preempted by SLURM's SIGUSR1, then resumed with
``--ckpt_path last`` logs bitwise the same losses and ends with bitwise the same weights as a run
that was never interrupted; and the stream's resumed pass yields exactly the batches not yet used,
decoding only those."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from conftest import SHAPES_SPLITS
from fault_cli import callback, fit_config, logged, output, run

from sam3_train.data import Sam3DataModule, pipeline
from sam3_train.data.loader import StreamLoader

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# 12 batches: 6 per epoch, 2 per optimiser step (accumulation), 6 steps; 2 worker processes; a
# validation every 4 batches; a checkpoint every 2 steps.
TRAINER = {"max_steps": 6, "accumulate_grad_batches": 2, "limit_val_batches": 1, "val_check_interval": 4}
DATA = {"steps_per_epoch": 6, "num_workers": 2}
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "sam3-test", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
         "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_killed_then_preempted_run_resumes_bitwise(shapes_root, tmp_path):
    reference = fit_config(tmp_path / "reference", shapes_root, trainer=TRAINER, data=DATA)
    interrupted_root = tmp_path / "interrupted"
    interrupted = fit_config(interrupted_root, shapes_root, trainer=TRAINER, data=DATA)
    last = interrupted_root / "checkpoints" / "last.ckpt"

    proc = run(["fit", "--config", str(reference)], tmp_path)
    assert proc.returncode == 0, output(proc)[-4000:]

    # 1. SIGKILL at the start of step 4 (the first batch of epoch 1): last.ckpt is from step 2, mid-epoch 0.
    proc = run(["fit", "--config", str(interrupted), callback("SignalAt", step=3, signal="SIGKILL")], tmp_path)
    assert proc.returncode == -9, output(proc)[-4000:]
    ckpt = _ckpt(last)
    progress = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    assert (ckpt["global_step"], ckpt["epoch"], progress["processed"]) == (2, 0, 4)

    # 2. Resume; under (a stand-in for) SLURM, SIGUSR1 arrives during step 5's first batch: the checkpoint
    #    waits for the end of the accumulation window, scontrol requeues the job, the exit is 128 + 10.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.calls\n')
    (fake_bin / "scontrol").chmod(0o755)
    proc = run(["fit", "--config", str(interrupted), "--ckpt_path", "last", callback("SignalAt", step=4, signal="SIGUSR1")],
               tmp_path, PATH=f"{fake_bin}:{__import__('os').environ['PATH']}", **SLURM)
    assert proc.returncode == 128 + 10, output(proc)[-4000:]
    assert f"SIGUSR1 received: saved {last} at step 5; requeueing the SLURM job." in output(proc)
    assert (tmp_path / "scontrol.calls").read_text() == "requeue 4242\n"
    assert _ckpt(last)["global_step"] == 5

    # 3. Resume again, to the end.
    proc = run(["fit", "--config", str(interrupted), "--ckpt_path", "last"], tmp_path)
    assert proc.returncode == 0, output(proc)[-4000:]

    expected = logged(tmp_path / "reference", 0)
    assert [step for step, _ in expected] == [0, 1, 2, 3, 4, 5]
    first, second, third = (logged(interrupted_root, v) for v in (0, 1, 2))
    assert first == expected[:3]  # the killed run, up to its kill
    assert second == expected[2:5] and third == expected[5:]  # resumed: the same losses, to the last bit
    ours, theirs = _ckpt(last)["state_dict"], _ckpt(tmp_path / "reference" / "checkpoints" / "last.ckpt")["state_dict"]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


# ------------------------------------------------------------------------------------------ in process
def _datamodule(shapes_root: str, **kw) -> Sam3DataModule:
    dm = Sam3DataModule(shapes_root=shapes_root, shapes_splits=SHAPES_SPLITS, image_size=112, batch_size=2,
                        num_workers=0, max_phrases_per_image=2, steps_per_epoch=6, shuffle_buffer=8, **kw)
    dm.setup("fit")
    return dm


def _summary(batch) -> tuple:
    return tuple(batch.keys), tuple(batch.phrases), float(batch.images.sum())


def test_resumed_loader_yields_the_rest_and_decodes_only_that(shapes_root, monkeypatch, one_thread):
    decoded = []
    real_decode = pipeline.decode_sample
    monkeypatch.setattr(pipeline, "decode_sample", lambda sample, **kw: decoded.append(sample["__key__"]) or
                        real_decode(sample, **kw))
    epoch = types.SimpleNamespace(value=1)
    full = [_summary(b) for b in StreamLoader(_datamodule(shapes_root)._stream("train", train=True),
                                              epoch_fn=lambda: epoch.value)]
    assert len(full) == 6

    first = StreamLoader(_datamodule(shapes_root)._stream("train", train=True), epoch_fn=lambda: epoch.value)
    it = iter(first)
    head = [_summary(next(it)) for _ in range(4)]
    state = first.state_dict()
    assert state["ranks"][0]["batches"] == 4 and state["ranks"][0]["epoch"] == 1

    decoded.clear()
    second = StreamLoader(_datamodule(shapes_root)._stream("train", train=True), epoch_fn=lambda: epoch.value)
    second.load_state_dict(state)
    tail = [_summary(b) for b in second]
    assert head + tail == full
    assert decoded == [k for keys, _, _ in tail for k in keys]  # the 8 skipped samples were read, not decoded

    epoch.value = 2  # a state for epoch 1 does not apply to epoch 2: a full, different pass
    third = StreamLoader(_datamodule(shapes_root)._stream("train", train=True), epoch_fn=lambda: epoch.value)
    third.load_state_dict(state)
    other = [_summary(b) for b in third]
    assert len(other) == 6 and other != full


def test_resumed_workers_continue_in_turn(shapes_root, monkeypatch, one_thread):
    """Worker slot i of the resumed pass plays original worker (next_worker + i) % W, so the DataLoader's
    round robin hands out the batches in the uninterrupted order."""
    stream = _datamodule(shapes_root)._stream("train", train=True)
    stream.set_epoch(0)

    def worker_batches(num_workers: int) -> list[list[tuple]]:
        out = []
        for slot in range(num_workers):
            info = types.SimpleNamespace(id=slot, num_workers=num_workers)
            monkeypatch.setattr(pipeline, "get_worker_info", lambda info=info: info)
            out.append([(_summary(b), p) for b, p in stream.iter_with_positions()])
        return out

    original = worker_batches(2)
    assert [len(w) for w in original] == [3, 3]
    # after 3 batches in turn (worker 0, 1, 0), worker 1's second batch is next
    positions = [original[0][1][1], original[1][0][1]]
    stream.resume(epoch=0, num_workers=2, next_worker=1, positions=[(p.consumed, p.batches) for p in positions])
    resumed = worker_batches(2)
    assert [s for s, _ in resumed[0]] == [s for s, _ in original[1][1:]]  # slot 0 continues worker 1
    assert [s for s, _ in resumed[1]] == [s for s, _ in original[0][2:]]  # slot 1 continues worker 0
    assert [p.worker for _, p in resumed[0]] == [1, 1]
