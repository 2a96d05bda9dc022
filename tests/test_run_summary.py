"""RunSummary: the early step rate and ETA, measured over a window after warm-up, from a resumed step too."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sam3_train import callbacks
from sam3_train.callbacks import RunSummary, matmul_gflops


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("first_step", [0, 500])  # a fresh run, and one resumed at step 500
def test_eta_after_the_window_from_the_measured_step_time(monkeypatch, capsys, first_step):
    clock = Clock()
    monkeypatch.setattr(callbacks.time, "perf_counter", clock)
    summary = RunSummary(skip=2, window=4)
    trainer = SimpleNamespace(global_step=first_step, max_steps=1000, is_global_zero=True)
    summary.on_fit_start(trainer, SimpleNamespace(device=SimpleNamespace(type="cuda")))  # no matmul probe
    for step in range(first_step, first_step + 8):
        trainer.global_step = step
        summary.on_train_batch_start(trainer, None, None, 0)
        clock.now += 5.0 if step - first_step < 2 else 0.5  # slow warm-up steps, then 0.5 s a step
    assert summary.step_seconds() == pytest.approx(0.5)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1  # printed once, when the window closed (global_step = start + 6)
    left = 1000 - (first_step + 6)
    assert out[0] == (f"sam3-train: 0.500 s a step (steps 2-6); {left:,} steps left: about "
                      f"{left * 0.5 / 60:.0f} min of training, validation aside")


def test_matmul_rate_is_a_plausible_number():
    assert 0.1 < matmul_gflops(size=256, seconds=0.05) < 1e6
