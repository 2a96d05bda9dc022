"""Same config, same losses: two runs of the real CLI on 2 threads, side by side (so their threads
contend), log bitwise-equal losses and metrics at every step, through checkpoint saves, validations
and a kill followed by ``--ckpt_path last``.

What made runs differ was the CPU backward of advanced indexing with repeated rows
(``index_put_(accumulate=True)`` adds with atomics from several threads): the detector and the losses
gather with ``index_select`` instead (``losses.terms.gather_matched``).
"""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest
from fault_cli import SAM3_TRAIN, callback, env, fit_config, output

pytestmark = pytest.mark.slow

# The main job's batch shape (224 px, 4 images x 6 phrases): gathers large enough for torch's CPU
# kernels to go multi-threaded, where the race was.
TRAINER = {"max_steps": 16, "val_check_interval": 8, "limit_val_batches": 1}
DATA = {"image_size": 224, "batch_size": 4, "max_phrases_per_image": 6, "steps_per_epoch": 16}
MODEL = {"model_overrides": {"dropout": 0.0}}


def _rows(root: Path) -> dict[int, dict[str, str]]:
    """step -> every logged value of that step (train terms and val metrics), all CSV versions merged."""
    rows: dict[int, dict[str, str]] = {}
    for path in sorted((root / "csv").glob("version_*/metrics.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                values = {k: v for k, v in row.items() if v and (k.startswith(("train/", "val/")))}
                values.pop("train/skipped_steps", None)
                rows.setdefault(int(row["step"]), {}).update(values)
    return rows


def _start(args: list[str], tmp_path: Path) -> subprocess.Popen:
    return subprocess.Popen([str(SAM3_TRAIN), *args], cwd=tmp_path, env=env(tmp_path, OMP_NUM_THREADS="2"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_runs_of_one_config_log_bitwise_equal_losses(shapes_root, tmp_path):
    configs = [fit_config(tmp_path / name, shapes_root, trainer=TRAINER, data=DATA, model=MODEL, every_n_train_steps=4)
               for name in ("a", "b")]
    # Run b is killed at the start of step 10 (last.ckpt from step 8), then resumed.
    procs = [_start(["fit", "--config", str(configs[0])], tmp_path),
             _start(["fit", "--config", str(configs[1]), callback("SignalAt", step=10, signal="SIGKILL")], tmp_path)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert procs[0].returncode == 0, outs[0][-4000:]
    assert procs[1].returncode == -9, outs[1][-4000:]
    resumed = subprocess.run([str(SAM3_TRAIN), "fit", "--config", str(configs[1]), "--ckpt_path", "last"], cwd=tmp_path,
                             env=env(tmp_path, OMP_NUM_THREADS="2"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, output(resumed)[-4000:]

    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert sorted(a) == sorted(b) and len(a) == 16
    assert sum(key.startswith("val/") for row in a.values() for key in row) > 10  # two validations logged
    for step in sorted(a):
        assert a[step] == b[step], f"step {step}: " + ", ".join(
            f"{k} {a[step].get(k)} != {b[step].get(k)}" for k in sorted(set(a[step]) | set(b[step]))
            if a[step].get(k) != b[step].get(k))
