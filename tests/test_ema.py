"""The weights' moving average (``sam3_train.ema.EMA``) in real CLI runs: every checkpoint holds the
average by the formula, validation scores the average, a killed run resumes to the same bits, and a LoRA
run's checkpoints stay adapters only and resume too."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from fault_cli import callback, fit_config, last_checkpoint, output, run
from test_lora import _ckpt, _lora_config, base_dir_112  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

DECAY = 0.5
EMA = {"class_path": "sam3_train.ema.EMA", "init_args": {"decay": DECAY}}
# Writes the sum of every parameter as validation sees them (after the EMA callback's swap).
PROBE = '''
import json, pathlib
import lightning as L


class ValidatedWeights(L.Callback):
    def __init__(self, *, out: str):
        self.out = pathlib.Path(out)

    def on_validation_epoch_start(self, trainer, pl_module):
        sums = {name: float(p.detach().double().sum()) for name, p in pl_module.named_parameters()}
        self.out.write_text(json.dumps({"step": trainer.global_step, "sums": sums}))
'''


def _config(root: Path, shapes_root: str, *, every_step: bool = False) -> Path:
    checkpoints = [last_checkpoint(root)]
    if every_step:  # step=N.ckpt for every step N
        checkpoints.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                            "init_args": {"dirpath": str(root / "steps"), "filename": "{step}", "save_top_k": -1,
                                          "every_n_train_steps": 1}})
    return fit_config(root, shapes_root, trainer={"callbacks": [EMA, *checkpoints], "limit_val_batches": 1},
                      data={"eval_max_phrases": 2})


def _val_metrics(root: Path, version: int) -> dict[str, str]:
    with (root / "csv" / f"version_{version}" / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/cgF1")]
    return {k: v for k, v in rows[-1].items() if k.startswith("val/") and v}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_hold_the_average_validation_scores_it_and_a_killed_run_resumes_bitwise(shapes_root, tmp_path):
    (tmp_path / "ema_probe.py").write_text(PROBE)
    probe = "--trainer.callbacks+=" + json.dumps({"class_path": "ema_probe.ValidatedWeights",
                                                 "init_args": {"out": str(tmp_path / "validated.json")}})
    reference_root = tmp_path / "reference"
    proc = run(["fit", "--config", str(_config(reference_root, shapes_root, every_step=True)), probe], tmp_path)
    assert proc.returncode == 0, output(proc)[-4000:]

    # The average by its formula, from the trained weights each step's checkpoint keeps beside it:
    # the first update copies the weights, then average = decay * average + (1 - decay) * weights.
    steps = [_ckpt(reference_root / "steps" / f"step={n}.ckpt") for n in (1, 2, 3, 4)]
    assert _equal(steps[0]["state_dict"], steps[0]["current_model_state"])
    for before, now in zip(steps, steps[1:]):
        for name, average in now["state_dict"].items():
            if average.is_floating_point():
                expected = DECAY * before["state_dict"][name] + (1 - DECAY) * now["current_model_state"][name]
                torch.testing.assert_close(average, expected, rtol=1e-6, atol=1e-7, msg=name)
    last = _ckpt(reference_root / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4 and not _equal(last["state_dict"], last["current_model_state"])

    # The fit's validation (at step 4) saw the average, not the trained weights ...
    validated = json.loads((tmp_path / "validated.json").read_text())
    assert validated["step"] == 4
    for name, value in validated["sums"].items():
        assert value == pytest.approx(float(last["state_dict"][name].double().sum()), rel=1e-9, abs=1e-9), name
    moved = [n for n in validated["sums"] if not torch.equal(last["state_dict"][n], last["current_model_state"][n])]
    assert moved and any(validated["sums"][n] != float(last["current_model_state"][n].double().sum()) for n in moved)
    # ... and `validate` of the checkpoint scores what the fit's validation scored.
    proc = run(["validate", "--config", str(_config(tmp_path / "validate", shapes_root)), "--ckpt_path",
                str(reference_root / "checkpoints" / "last.ckpt")], tmp_path)
    assert proc.returncode == 0, output(proc)[-4000:]
    assert _val_metrics(tmp_path / "validate", 0) == _val_metrics(reference_root, 0)

    # Killed at the start of step 4 (last.ckpt from step 2), resumed: the same average and weights, bitwise.
    root = tmp_path / "interrupted"
    config = _config(root, shapes_root)
    proc = run(["fit", "--config", str(config), callback("SignalAt", step=3, signal="SIGKILL")], tmp_path)
    assert proc.returncode == -9, output(proc)[-4000:]
    assert _ckpt(root / "checkpoints" / "last.ckpt")["global_step"] == 2
    proc = run(["fit", "--config", str(config), "--ckpt_path", "last"], tmp_path)
    assert proc.returncode == 0, output(proc)[-4000:]
    resumed = _ckpt(root / "checkpoints" / "last.ckpt")
    assert _equal(resumed["state_dict"], last["state_dict"])
    assert _equal(resumed["current_model_state"], last["current_model_state"])


def test_a_lora_run_keeps_adapter_checkpoints_and_resumes_bitwise(shapes_root, base_dir_112, tmp_path):  # noqa: F811
    def config(root: Path) -> Path:
        return _lora_config(root, shapes_root, base_dir_112, callbacks=[EMA, last_checkpoint(root)])

    proc = run(["fit", "--config", str(config(tmp_path / "reference"))], tmp_path)
    assert proc.returncode == 0, output(proc)[-4000:]
    root = tmp_path / "interrupted"
    proc = run(["fit", "--config", str(config(root)), callback("SignalAt", step=3, signal="SIGKILL")], tmp_path)
    assert proc.returncode == -9, output(proc)[-4000:]
    proc = run(["fit", "--config", str(config(root)), "--ckpt_path", "last"], tmp_path)
    assert proc.returncode == 0, output(proc)[-4000:]

    ours, theirs = (_ckpt(r / "checkpoints" / "last.ckpt") for r in (root, tmp_path / "reference"))
    for key in ("state_dict", "current_model_state"):  # adapters only, averaged and trained
        assert ours[key] and all(".lora_A." in k or ".lora_B." in k for k in ours[key]), key
        assert _equal(ours[key], theirs[key]), key
    assert not _equal(ours["state_dict"], ours["current_model_state"])
