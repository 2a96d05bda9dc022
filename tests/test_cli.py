"""The real ``sam3-train`` CLI end to end: every shipped config parses and smoke-runs; fit -> validate ->
predict from ``last.ckpt``; fit under DDP (gloo, 2 CPU processes).

Runs go through the console script in subprocesses (DDP inside pytest would re-launch pytest; see
PITFALLS.md), in temporary folders, with a copy of each config whose written paths all point there,
a tiny model at 112 px and the session's small shapes dataset.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import SHAPES_SPLITS
from omegaconf import OmegaConf
from PIL import Image
from pycocotools import mask as mask_utils

from sam3_train.dist import env_without_dist

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
# Overlays go on top of a base file (`--config base.yaml --config overlay.yaml`) and are tested so.
OVERLAYS = {"sam3_lora": "sam3_finetune"}
SAM3_TRAIN = Path(sys.executable).with_name("sam3-train")
# pycocotools under numpy 2 warns on every decode; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
IMAGE_SIZE = 112  # tiny preset: 112 / 14 = 8 tokens a side, one window

# A callback the DDP test adds by class path: every rank records the steps it ran.
STEP_RECORDER = '''
import json, pathlib
import lightning as L

class StepRecorder(L.Callback):
    def __init__(self, *, out_dir: str):
        self.out_dir, self.batches = pathlib.Path(out_dir), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1

    def on_train_end(self, trainer, pl_module):
        record = {"rank": trainer.global_rank, "world_size": trainer.world_size,
                  "global_step": trainer.global_step, "batches": self.batches}
        (self.out_dir / f"steps-rank{trainer.global_rank}.json").write_text(json.dumps(record))
'''


# ---------------------------------------------------------------------------------------- helpers
def _env(pythonpath: Path | None = None, wandb_mode: str = "disabled") -> dict[str, str]:
    env = env_without_dist()
    # W&B off in the child unless a test asks for its offline files (the configs' offline loggers are
    # switched to online-but-disabled below); one thread per process: the CI box has 2 cores and DDP
    # runs 2 processes.
    env.update(WANDB_MODE=wandb_mode, WANDB_SILENT="true", OMP_NUM_THREADS="1", COLUMNS="200")
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    return env


def _run(args: list[str], cwd: Path, *, pythonpath: Path | None = None, timeout: int = 600,
         wandb_mode: str = "disabled") -> str:
    proc = subprocess.run([str(SAM3_TRAIN), *args], cwd=cwd, env=_env(pythonpath, wandb_mode), capture_output=True,
                          check=False, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"sam3-train {' '.join(args[:3])} failed (rc {proc.returncode}):\n{output[-6000:]}"
    assert not (cwd / "runs").exists(), "a run wrote outside the paths the test set"
    return output


def _config_into(src: Path, out: Path) -> Path:
    """A copy of config ``src`` whose every written path lies under ``out``."""
    from sam3_train.cli import redirect_outputs

    cfg = redirect_outputs(yaml.safe_load(src.read_text()), out, logs_subdir="logs")
    for logger in cfg["trainer"].get("logger") or []:
        if isinstance(logger, dict) and logger["class_path"].endswith("WandbLogger"):
            logger["init_args"]["offline"] = False  # offline=True sets WANDB_MODE=dryrun, overriding "disabled"
    path = out / src.name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _small(shapes_root: str, pretrained: Path | None = None) -> list[str]:
    """Overrides that shrink any shipped config to a CPU smoke run on the session's shapes data."""
    args = [
        "--model.preset=tiny", f"--data.image_size={IMAGE_SIZE}",
        f"--data.shapes_root={shapes_root}", f"--data.shapes_splits={json.dumps(SHAPES_SPLITS)}",
        "--data.train_shards=null", "--data.val_shards=null", "--data.test_shards=null", "--data.predict_shards=null",
        "--data.num_workers=0", "--data.pin_memory=false", "--data.batch_size=2", "--data.eval_batch_size=2",
        "--data.max_phrases_per_image=3", "--data.eval_max_phrases=2",
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.num_nodes=1", "--trainer.strategy=auto",
        "--trainer.precision=32-true",
    ]
    if pretrained is not None:
        args.append(f"--model.pretrained={pretrained}")
    return args


def _assert_kept(printed, source, where: str) -> None:
    """Every value ``source`` sets is in ``printed`` (which adds the defaults)."""
    if isinstance(source, dict):
        assert isinstance(printed, dict), where
        for key, value in source.items():
            _assert_kept(printed.get(key), value, f"{where}.{key}")
    elif isinstance(source, list):
        assert isinstance(printed, list) and len(printed) == len(source), where
        for i, (p, s) in enumerate(zip(printed, source)):
            _assert_kept(p, s, f"{where}[{i}]")
    else:
        assert printed == source, f"{where}: printed {printed!r}, file {source!r}"


def _stack(config: Path) -> list[Path]:
    """The files a shipped config is used with, base first."""
    base = OVERLAYS.get(config.stem)
    return [config.with_name(f"{base}.yaml"), config] if base else [config]


def _config_args(paths: list[Path]) -> list[str]:
    return [arg for path in paths for arg in ("--config", str(path))]


def _resolved(paths: list[Path]) -> dict:
    """The files merged as the omegaconf+ parser mode does: a later file's values over an earlier
    one's, a list replacing the whole list, then every ${...} resolved on the merged config."""
    merged = OmegaConf.create()
    for path in paths:
        merged = OmegaConf.merge(merged, OmegaConf.load(path))
    return OmegaConf.to_container(merged, resolve=True)


def _loads_pretrained(paths: list[Path]) -> bool:
    return any((yaml.safe_load(path.read_text()).get("model") or {}).get("pretrained") for path in paths)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A local HF-format checkpoint of the tiny preset at the tests' image size."""
    from sam3_train.model import build_detector

    path = tmp_path_factory.mktemp("tiny_sam3")
    build_detector("tiny", image_size=IMAGE_SIZE).save_pretrained(path)
    return path


def _shard_json(shapes_root: str, split: str) -> dict[str, dict]:
    """{sample key: its json} of a split, read from the shards."""
    metas = {}
    for shard in sorted((Path(shapes_root) / "shards" / split).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    metas[member.name.split(".")[0]] = json.load(tar.extractfile(member))
    return metas


def _metrics_rows(log_dir: Path) -> list[dict[str, str]]:
    with log_dir.joinpath("metrics.csv").open() as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_parses_and_prints_its_values(config, capsys, monkeypatch):
    """--print_config (the CLI's own parser, in process: it exits before building anything) keeps every
    value the file sets (an overlay: over its base's, its lists replacing the base's whole lists) and
    resolves ${oc.env:...} interpolations; every path the run writes lies under its default_root_dir."""
    from sam3_train.cli import main

    stack = _stack(config)
    monkeypatch.setenv("SAM3_CHECKPOINT", "/checkpoints/sam3-test")
    monkeypatch.setattr(sys, "argv", ["sam3-train"])  # LightningCLI warns when pytest's argv is also there
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *_config_args(stack), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    source = _resolved(stack)  # as the omegaconf+ parser mode does
    _assert_kept(printed, source, config.stem)
    loggers = [entry["class_path"] for entry in printed["trainer"]["logger"]]
    assert "lightning.pytorch.loggers.WandbLogger" in loggers
    assert printed["model"]["preset"] in ("tiny", "small", "sam3")
    root = printed["trainer"]["default_root_dir"]
    written = [entry["init_args"]["save_dir"] for entry in printed["trainer"]["logger"]]
    written += [entry["init_args"]["dirpath"] for entry in printed["trainer"]["callbacks"]
                if entry["class_path"].endswith("ModelCheckpoint")]
    assert written and all(path == root or path.startswith(root + "/") for path in written), (root, written)


@pytest.mark.parametrize("config", ["shapes_tiny", "sam3_lora"])
def test_command_line_root_moves_every_written_path(config, capsys, monkeypatch, tmp_path):
    """``--trainer.default_root_dir`` given after the files moves the loggers' and checkpoints' folders
    derived from it in the files (interpolations resolve on the merged config), an overlay's included."""
    from sam3_train.cli import main

    stack = _stack(REPO / "configs" / f"{config}.yaml")
    monkeypatch.setenv("SAM3_CHECKPOINT", "/checkpoints/sam3-test")
    monkeypatch.setattr(sys, "argv", ["sam3-train"])
    root = str(tmp_path / "elsewhere")
    with pytest.raises(SystemExit):
        main(["fit", *_config_args(stack), f"--trainer.default_root_dir={root}", "--print_config"])
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    written = [entry["init_args"]["save_dir"] for entry in trainer["logger"]]
    written += [entry["init_args"]["dirpath"] for entry in trainer["callbacks"]
                if entry["class_path"].endswith("ModelCheckpoint")]
    assert trainer["default_root_dir"] == root
    assert len(written) >= 3 and all(path in (root, f"{root}/checkpoints") for path in written), written


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_is_its_base_plus_its_own_values(overlay):
    """An overlay names its base and the two-file command in its header; it sets only what differs
    from its base (values equal to the base's belong to the base alone)."""
    path, base = REPO / "configs" / f"{overlay}.yaml", REPO / "configs" / f"{OVERLAYS[overlay]}.yaml"
    text = path.read_text()
    assert f"an overlay on configs/{base.name}" in text
    assert f"--config configs/{base.name} --config configs/{path.name}" in text
    base_cfg, own = yaml.safe_load(base.read_text()), yaml.safe_load(path.read_text())

    def same(a, b, where):
        if isinstance(a, dict) and isinstance(b, dict):
            return [w for key in b if key in a for w in same(a[key], b[key], f"{where}.{key}")]
        return [where] if a == b and not isinstance(b, list) else []

    assert not same(base_cfg, own, overlay), "repeats its base"


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_shrunk_to_its_schema_trains_a_step(config, shapes_root, tiny_checkpoint, tmp_path):
    """Every config (an overlay over its base), shrunk to the tiny preset at 112 px on the session's shapes
    data (its schema, callbacks, loggers, optimiser and schedule settings kept), trains one step and
    validates."""
    stack = _stack(config)
    pretrained = tiny_checkpoint if _loads_pretrained(stack) else None
    out = _run(["fit", *_config_args([_config_into(path, tmp_path) for path in stack]), "--trainer.fast_dev_run=1",
                *_small(shapes_root, pretrained), *_named_data(stack, shapes_root)], tmp_path)
    assert "`Trainer.fit` stopped: `max_steps=1` reached" in out


def _named_data(stack: list[Path], shapes_root: str) -> list[str]:
    """A config's named training sources and validation sets (data.train_sources, data.val_sets), kept by
    name and weight but read from the session's shapes splits."""
    from sam3_train.data import ensure_shapes_shards
    from sam3_train.data.shapes import named_data_on_shapes

    data: dict = {}
    for path in stack:
        data.update(yaml.safe_load(path.read_text()).get("data") or {})
    patterns = ensure_shapes_shards(shapes_root, splits=SHAPES_SPLITS, max_count=8)  # the session's: cached
    return [f"--data.{key}={json.dumps(value)}" for key, value in named_data_on_shapes(data, patterns).items()]


# The configs whose own settings a 2-core CPU can run. coco_finetune and sam3_finetune are the 840 M model
# at 1008 px on a GPU (bf16): their own settings cannot run here; the schema run above covers them.
CPU_CONFIGS = [c for c in CONFIGS if c.stem in ("shapes_tiny", "shapes_small")]


@pytest.mark.slow
@pytest.mark.parametrize("config", CPU_CONFIGS, ids=lambda p: p.stem)
def test_config_at_its_own_settings_trains_and_validates(config, shapes_root, tmp_path):
    """A CPU config at its own preset, image size, batch, phrases, workers and precision: two steps and
    one validation batch (only the data source is the session's small shapes set)."""
    out = _run(["fit", "--config", str(_config_into(config, tmp_path)), "--trainer.max_steps=2",
                "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1",
                f"--data.shapes_root={shapes_root}", f"--data.shapes_splits={json.dumps(SHAPES_SPLITS)}"], tmp_path)
    assert "`Trainer.fit` stopped: `max_steps=2` reached" in out
    rows = _metrics_rows(next((tmp_path / "logs" / "csv").glob("version_*")))
    assert any(row.get("val/cgF1") for row in rows) and any(row.get("train/loss") for row in rows)


# ---------------------------------------------------------------------------------------- fit -> validate -> predict
@pytest.mark.slow
def test_fit_then_validate_and_predict_from_last_checkpoint(shapes_root, tmp_path):
    config = _config_into(REPO / "configs" / "shapes_tiny.yaml", tmp_path)
    # Keep every detection: an untrained model scores below the default 0.05. Set at fit time, as
    # validate/predict take the model's hyper-parameters from the checkpoint.
    small = [*_small(shapes_root), "--model.eval_score_threshold=0.0", "--model.max_detections=3"]
    out = _run(["fit", "--config", str(config), "--trainer.max_steps=4", "--data.steps_per_epoch=4",
                "--trainer.val_check_interval=4", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1",
                *small], tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert "sam3-train: fit finished" in out and last.is_file()
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4
    fit_rows = _metrics_rows(tmp_path / "logs" / "csv" / "version_0")
    assert {row["step"] for row in fit_rows if row.get("train/loss")} == {"0", "1", "2", "3"}

    out = _run(["validate", "--config", str(config), "--ckpt_path", str(last), "--trainer.limit_val_batches=2",
                *small], tmp_path)
    assert "val/cgF1" in out
    rows = _metrics_rows(tmp_path / "logs" / "csv" / "version_1")
    values = [float(row["val/cgF1"]) for row in rows if row.get("val/cgF1")]
    assert len(values) == 1 and 0.0 <= values[0] <= 100.0

    writer = {"class_path": "sam3_train.callbacks.PredictionWriter",
              "init_args": {"output_dir": str(tmp_path / "predictions"), "overlays": True, "coco_results": True}}
    _run(["predict", "--config", str(config), "--ckpt_path", str(last), "--trainer.limit_predict_batches=2",
          f"--trainer.callbacks+={json.dumps(writer)}", *small], tmp_path)
    lines = (tmp_path / "predictions" / "predictions-rank0.jsonl").read_text().splitlines()
    metas = _shard_json(shapes_root, "val")  # predict reads the val split when no predict shards are set
    sizes = {key: (meta["height"], meta["width"]) for key, meta in metas.items()}
    assert len(lines) == 4  # 2 batches x 2 images
    num_detections = 0
    for line in lines:
        record = json.loads(line)
        assert set(record) == {"key", "height", "width", "phrases"}
        assert (record["height"], record["width"]) == sizes[record["key"]]
        assert 1 <= len(record["phrases"]) <= 2
        for phrase in record["phrases"]:
            assert set(phrase) == {"phrase", "presence", "detections"}
            assert isinstance(phrase["phrase"], str) and phrase["phrase"]
            assert 0.0 <= phrase["presence"] <= 1.0
            assert len(phrase["detections"]) <= 3
            for det in phrase["detections"]:
                assert set(det) == {"score", "box", "rle"}
                assert 0.0 <= det["score"] <= 1.0
                x0, y0, x1, y1 = det["box"]
                assert -0.5 <= x0 <= x1 <= record["width"] + 0.5 and -0.5 <= y0 <= y1 <= record["height"] + 0.5
                rle = {"size": det["rle"]["size"], "counts": det["rle"]["counts"].encode("ascii")}
                mask = mask_utils.decode(rle)
                assert mask.shape == (record["height"], record["width"]) and mask.dtype == np.uint8
                num_detections += 1
    assert num_detections > 0
    # The COCO results file holds the same detections, xywh boxes, ids from the samples' json.
    coco = json.loads((tmp_path / "predictions" / "predictions.coco.json").read_text())
    categories = {c["name"]: c["id"] for c in json.loads((tmp_path / "predictions" / "categories.json").read_text())}
    assert len(coco) == num_detections
    expected = sorted((json.loads(line)["key"], p["phrase"], d["score"], tuple(d["box"])) for line in lines
                      for p in json.loads(line)["phrases"] for d in p["detections"])
    got = sorted((r["image_id"], r["phrase"], r["score"], (r["bbox"][0], r["bbox"][1], round(r["bbox"][0] + r["bbox"][2], 2),
                  round(r["bbox"][1] + r["bbox"][3], 2))) for r in coco)
    assert sorted((metas[k]["image_id"], *rest) for k, *rest in expected) == [tuple(g) for g in got]
    assert all(r["category_id"] == categories[r["phrase"]] for r in coco)
    assert sorted(categories.values()) == list(range(1, len(categories) + 1))
    assert not list((tmp_path / "predictions").glob("*rank*.coco.json"))  # merged, rank files removed
    overlays = sorted((tmp_path / "predictions" / "overlays").glob("*.png"))
    assert overlays, "overlays=True wrote no PNG"
    first = json.loads(lines[0])
    with Image.open(overlays[0]) as picture:
        assert picture.size == (first["width"], first["height"])  # overlays are drawn at the original size


@pytest.mark.slow
def test_wandb_offline_run_holds_config_metrics_and_mask_panels(shapes_root, tmp_path):
    """The shipped config's W&B logger, offline: the run files hold the resolved config, the metrics
    and the validation mask panels (ground truth and prediction as label maps)."""
    config = _config_into(REPO / "configs" / "shapes_tiny.yaml", tmp_path)
    _run(["fit", "--config", str(config), "--trainer.max_steps=2", "--data.steps_per_epoch=2",
          "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1", "--trainer.log_every_n_steps=1",
          *_small(shapes_root)], tmp_path, wandb_mode="offline")
    # Every logger got the resolved config: CSV as hparams.yaml, W&B in its run log.
    resolved = yaml.safe_load((tmp_path / "logs" / "csv" / "version_0" / "hparams.yaml").read_text())["config"]
    assert resolved["data"]["image_size"] == IMAGE_SIZE and resolved["trainer"]["max_steps"] == 2
    assert resolved["model"]["criterion"]["class_path"] == "sam3_train.losses.Sam3Criterion"
    (run,) = (tmp_path / "logs" / "wandb").glob("offline-run-*")
    (log,) = run.glob("run-*.wandb")  # W&B's binary record log: config, history and summary
    records = log.read_bytes()
    for needle in (b"steps_per_epoch", b"num_points", b"val/cgF1", b"val/IL_MCC", b"train/loss_align", b"lr/"):
        assert needle in records, f"{needle!r} not in the W&B run"
    # The mask panel: images with label maps (ground truth, prediction); W&B stores equal files once.
    media = run / "files" / "media" / "images"
    pictures, label_maps = list((media / "val").glob("examples_*.png")), list((media / "mask" / "val").glob("*.mask.png"))
    assert pictures and label_maps
    assert b"ground_truth" in records and b"prediction" in records
    with Image.open(label_maps[0]) as label_map:
        assert label_map.mode in ("L", "P", "I") and label_map.size == Image.open(pictures[0]).size


# ---------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_fit_under_ddp_runs_the_same_steps_on_both_ranks(shapes_root, tmp_path):
    (tmp_path / "steprecorder.py").write_text(STEP_RECORDER)
    recorder = {"class_path": "steprecorder.StepRecorder", "init_args": {"out_dir": str(tmp_path)}}
    config = _config_into(REPO / "configs" / "shapes_tiny.yaml", tmp_path)
    _run(["fit", "--config", str(config), *_small(shapes_root),
          # Unused parameters in every step (the exemplar encoder without exemplar boxes, the dropped FPN
          # level): plain "ddp" stops at the second step, as Meta's own trainer would without its flag.
          "--trainer.strategy=ddp_find_unused_parameters_true", "--trainer.devices=2", "--trainer.accelerator=cpu",
          "--trainer.max_steps=3", "--data.steps_per_epoch=3", "--trainer.val_check_interval=3",
          "--trainer.limit_val_batches=1", f"--trainer.callbacks+={json.dumps(recorder)}"],
         tmp_path, pythonpath=tmp_path)
    records = [json.loads((tmp_path / f"steps-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    assert [(r["global_step"], r["batches"]) for r in records] == [(3, 3), (3, 3)]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 3


@pytest.mark.slow
def test_time_budget_stops_the_main_job_with_a_validation_and_its_schedule_ended(shapes_root, tmp_path):
    """`--trainer.callbacks+=TimeBudget`: the run stops at the planned step long before max_steps, the last
    step is validated, and the cosine learning rate has reached ~0 there."""
    config = _config_into(REPO / "configs" / "shapes_tiny.yaml", tmp_path)
    out = _run(["fit", "--config", str(config), *_small(shapes_root), "--trainer.max_steps=100000",
                "--trainer.val_check_interval=20", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1",
                "--data.steps_per_epoch=20", "--model.warmup_steps=5",
                "--trainer.callbacks+=sam3_train.callbacks.TimeBudget", "--trainer.callbacks.minutes=0.4",
                "--trainer.callbacks.skip=3", "--trainer.callbacks.measure=8"], tmp_path)
    planned = [int(line.rsplit(" ", 1)[-1].replace(",", "")) for line in out.splitlines()
               if "training stops at step" in line]
    assert planned, out[-3000:]
    rows = _metrics_rows(next((tmp_path / "logs" / "csv").glob("version_*")))
    steps = [int(row["step"]) for row in rows if row.get("train/loss")]
    last = max(steps) + 1  # the CSV's step is the global step before the optimiser step
    assert last == planned[-1] < 100000
    assert any(row.get("val/cgF1") and int(row["step"]) >= last - 1 for row in rows)  # the last step was validated
    column = next(key for key in rows[0] if key.startswith("lr/"))
    lrs = [float(row[column]) for row in rows if row.get(column)]
    assert lrs[-1] < 0.05 * max(lrs)
