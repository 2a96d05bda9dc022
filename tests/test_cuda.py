"""The CUDA lane: the shipped GPU configs at their own precision on a GPU, through the real CLI.

    pytest -m cuda                      # on a machine with a CUDA GPU (docs/gpu.md); skipped without one

``configs/sam3_finetune.yaml`` and, over it, ``configs/sam3_lora.yaml`` (run as an overlay:
``--config sam3_finetune.yaml --config sam3_lora.yaml``) train the ``sam3`` preset (840 M parameters,
random initialisation: nothing is downloaded) at their own 1008 px, bf16-mixed, activation
checkpointing, DAC, DDP strategy, schedule, loggers and callbacks. Shrunk only in what a test must
shrink: a few steps, one validation batch, the session's shapes dataset instead of SA-Co shards (at the
config's image size), one GPU, and 2 loader workers (the shapes splits have 8 shards each).
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SHAPES_SPLITS

from sam3_train.cli import redirect_outputs
from sam3_train.data import ensure_shapes_shards
from sam3_train.data.shapes import named_data_on_shapes
from sam3_train.dist import env_without_dist

pytestmark = [pytest.mark.cuda, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA lane needs a CUDA GPU")]
REPO = Path(__file__).resolve().parents[1]
SAM3_TRAIN = Path(sys.executable).with_name("sam3-train")
STEPS = 3

# Every rank records what it trained under (a callback module on the child's PYTHONPATH).
PROBE = '''
import json, pathlib
import lightning as L
import torch
import torch.distributed as dist


class Probe(L.Callback):
    def __init__(self, *, out_dir: str):
        self.out_dir = pathlib.Path(out_dir)

    def on_train_end(self, trainer, pl_module):
        record = {"precision": str(trainer.precision), "device": str(pl_module.device),
                  "backend": dist.get_backend() if dist.is_initialized() else None,
                  "global_step": trainer.global_step, "max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                  "activation_checkpointing": bool(pl_module.hparams.activation_checkpointing),
                  "parameters": sum(p.numel() for p in pl_module.parameters()),
                  "trainable": sum(p.numel() for p in pl_module.parameters() if p.requires_grad)}
        (self.out_dir / f"probe-rank{trainer.global_rank}.json").write_text(json.dumps(record))
'''


def _config_into(src: Path, out: Path) -> Path:
    """A copy of config ``src`` whose every written path lies under ``out``, W&B off."""
    cfg = redirect_outputs(yaml.safe_load(src.read_text()), out, logs_subdir="logs")
    for logger in (cfg.get("trainer") or {}).get("logger") or []:
        if isinstance(logger, dict) and logger["class_path"].endswith("WandbLogger"):
            logger["init_args"]["offline"] = False  # offline=True sets WANDB_MODE=dryrun over "disabled"
    path = out / f"{src.stem}.cuda.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _fit(configs: list[str], shapes_root: str, tmp_path: Path) -> tuple[dict, list[dict]]:
    """``sam3-train fit`` over the redirected ``configs`` (in order), shrunk as the module docstring says;
    returns the rank-0 probe and the CSV rows."""
    (tmp_path / "cuda_probe.py").write_text(PROBE)
    probe = {"class_path": "cuda_probe.Probe", "init_args": {"out_dir": str(tmp_path)}}
    args = ["fit"]
    data: dict = {}
    for name in configs:
        args += ["--config", str(_config_into(REPO / "configs" / name, tmp_path))]
        data.update(yaml.safe_load((REPO / "configs" / name).read_text()).get("data") or {})
    # The config's named sources and validation sets (placeholders for the user's data) on the shapes splits.
    patterns = ensure_shapes_shards(shapes_root, splits=SHAPES_SPLITS, max_count=8)  # the session's: cached
    args += [f"--data.{key}={json.dumps(value)}" for key, value in named_data_on_shapes(data, patterns).items()]
    args += [
        "--model.pretrained=null", "--model.preset=sam3",  # random init at the released sizes
        f"--data.shapes_root={shapes_root}", f"--data.shapes_splits={json.dumps(SHAPES_SPLITS)}",
        "--data.train_shards=null", "--data.val_shards=null", "--data.test_shards=null", "--data.predict_shards=null",
        "--data.num_workers=2", "--trainer.devices=1", "--trainer.num_nodes=1",
        f"--trainer.max_steps={STEPS}", f"--data.steps_per_epoch={STEPS}", f"--trainer.val_check_interval={STEPS}",
        "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1", f"--trainer.callbacks+={json.dumps(probe)}",
    ]
    env = env_without_dist()
    env.update(WANDB_MODE="disabled", WANDB_SILENT="true")
    env["PYTHONPATH"] = ":".join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    proc = subprocess.run([str(SAM3_TRAIN), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"sam3-train fit failed (rc {proc.returncode}):\n{output[-6000:]}"
    assert f"`Trainer.fit` stopped: `max_steps={STEPS}` reached" in output
    assert not (tmp_path / "runs").exists(), "a run wrote outside the paths the test set"
    with next((tmp_path / "logs" / "csv").glob("version_*")).joinpath("metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    return json.loads((tmp_path / "probe-rank0.json").read_text()), rows


def _check_run(probe: dict, rows: list[dict]) -> None:
    assert probe["precision"] == "bf16-mixed" and probe["device"].startswith("cuda")
    assert probe["backend"] == "nccl" and probe["global_step"] == STEPS and probe["activation_checkpointing"]
    assert probe["parameters"] > 800e6  # the sam3 preset
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)
    assert any(r.get("val/cgF1") for r in rows)


def test_sam3_finetune_trains_at_its_own_precision(shapes_root, tmp_path):
    probe, rows = _fit(["sam3_finetune.yaml"], shapes_root, tmp_path)
    _check_run(probe, rows)
    assert probe["trainable"] > 0.9 * probe["parameters"]
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == STEPS


def test_sam3_lora_over_finetune_trains_only_adapters(shapes_root, tmp_path):
    probe, rows = _fit(["sam3_finetune.yaml", "sam3_lora.yaml"], shapes_root, tmp_path)
    _check_run(probe, rows)
    assert 0 < probe["trainable"] < 0.05 * probe["parameters"]  # rank-16 adapters only
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)
    assert any(v.abs().max() > 0 for k, v in state.items() if ".lora_B." in k)  # the adapters took steps
