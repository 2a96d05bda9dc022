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


def test_time_budget_plans_the_steps_the_budget_holds_and_stretches_the_schedule(monkeypatch, capsys):
    """A 60 s budget: two 5 s warm-up steps, then 0.5 s steps; a 6 s validation at step 50 every 50 steps."""
    import torch
    from torch.optim.lr_scheduler import LambdaLR

    from sam3_train.callbacks import TimeBudget
    from sam3_train.optim import LRSchedule, schedule_factor

    clock = Clock()
    monkeypatch.setattr(callbacks.time, "perf_counter", clock)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = LambdaLR(optimizer, LRSchedule(total_steps=1000, kind="cosine"))
    trainer = SimpleNamespace(global_step=0, max_steps=1000, is_global_zero=True, sanity_checking=False,
                              should_stop=False, val_check_batch=50, limit_val_batches=1.0,
                              lr_scheduler_configs=[SimpleNamespace(scheduler=scheduler)])
    budget = TimeBudget(minutes=1.0, skip=2, measure=6)
    budget.on_train_start(trainer, None)
    while not trainer.should_stop:
        budget.on_train_batch_start(trainer, None, None, 0)
        clock.now += 5.0 if trainer.global_step < 2 else 0.5
        optimizer.step()
        scheduler.step()
        trainer.global_step += 1
        budget.on_train_batch_end(trainer, None, None, None, 0)
        if trainer.global_step == 50:
            budget.on_validation_start(trainer, None)
            clock.now += 6.0
            budget.on_validation_end(trainer, None)
    # At step 6 (t = 12 s): 48 s left at 0.5 s a step -> step 6 + 96 = 102. After the validation at step 50
    # (t = 40 s): 20 s left, less the final 6 s validation, at 0.5 + 6 / 50 s a step -> 50 + int(14 / 0.62) = 72.
    out = capsys.readouterr().out
    assert "training stops at step 102" in out and "training stops at step 72" in out
    assert trainer.global_step == budget.planned_steps == 72
    assert scheduler.lr_lambdas[0].total_steps == 72
    assert optimizer.param_groups[0]["lr"] == pytest.approx(schedule_factor(72, total_steps=72, kind="cosine"))
    assert optimizer.param_groups[0]["lr"] < 1e-3  # the cosine ended with the budget
    state = budget.state_dict()
    assert state["planned_steps"] == 72 and state["spent"] == pytest.approx(clock.now - 100.0)

    # Resumed from a checkpoint: a fresh schedule of the config's length, the saved scheduler, optimizer
    # and budget states; the budget's plan puts the schedule back on the stretched curve.
    resumed_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    resumed_scheduler = LambdaLR(resumed_optimizer, LRSchedule(total_steps=1000, kind="cosine"))
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed_scheduler.load_state_dict(scheduler.state_dict())
    resumed = TimeBudget(minutes=1.0, skip=2, measure=6)
    resumed.load_state_dict(state)
    resumed.on_train_start(SimpleNamespace(global_step=72, lr_scheduler_configs=[SimpleNamespace(scheduler=resumed_scheduler)]),
                           None)
    assert resumed_scheduler.lr_lambdas[0].total_steps == 72
    for opt, sched in ((optimizer, scheduler), (resumed_optimizer, resumed_scheduler)):
        opt.step()
        sched.step()
    assert resumed_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert LRSchedule(total_steps=1000, kind="cosine")(73) > 0.9  # what the resumed run would have used unplanned
