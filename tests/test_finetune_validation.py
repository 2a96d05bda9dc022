"""Named validation sets, the zero-shot validation before the first step, and the verdict (zero-shot ->
best -> last, forgetting, best checkpoint with the start included): the verdict's rules on recorded
values, and real CLI runs on the shapes data with two weighted sources and two validation sets."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from fault_cli import callback, fit_config, logged, output, run

from sam3_train.finetune import SUMMARY_FILE, ZeroShotBaseline, set_name

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
MONITOR = "val/domain/cgF1"


def _baseline(zero: dict[str, float], history: dict[str, list[tuple[int, float]]], **kw) -> ZeroShotBaseline:
    cb = ZeroShotBaseline(monitor=MONITOR, **kw)
    cb.load_state_dict({"zero_shot": zero, "history": history})
    return cb


def _trainer(best_path: str = "") -> SimpleNamespace:
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(monitor=MONITOR, mode="max")
    ckpt.best_model_path = best_path
    return SimpleNamespace(checkpoint_callbacks=[ckpt])


def test_set_names_from_metric_keys():
    assert [set_name(k, "cgF1") for k in ("val/cgF1", "val/domain/cgF1", "val/domain/cgF1@50", "train/cgF1")] == [
        "val", "domain", None, None]


def test_verdict_flags_forgetting_and_a_fine_tune_that_beat_the_start():
    cb = _baseline({MONITOR: 20.0, "val/general/cgF1": 50.0},
                   {MONITOR: [(10, 30.0), (20, 40.0), (30, 35.0)], "val/general/cgF1": [(10, 49.5), (20, 47.0), (30, 48.5)]})
    report = cb.report(_trainer("runs/x/best-step=20.ckpt"), SimpleNamespace(hparams={"pretrained": "ckpts/sam3"}))
    assert report["sets"]["domain"] == {"metric": MONITOR, "zero_shot": 20.0, "best": 40.0, "best_step": 20,
                                        "last": 35.0, "last_step": 30, "forgot": False, "at_selected": 40.0}
    assert report["sets"]["general"]["forgot"] is True  # 50 -> 48.5: more than 1 point below zero-shot
    assert report["sets"]["general"]["at_selected"] == 47.0  # at the domain's best step (20)
    assert report["beat_start"] is True and report["best_checkpoint"] == "runs/x/best-step=20.ckpt"
    lines = "\n".join(cb.summary_lines(_trainer("runs/x/best-step=20.ckpt")))
    assert "20.00 -> 40.00 (step 20) -> 35.00" in lines and "forgetting" in lines and "NEVER" not in lines
    assert _baseline({MONITOR: 20.0, "val/general/cgF1": 50.0},
                     {"val/general/cgF1": [(10, 49.5)]}, tolerance=0.2).report(_trainer())["sets"]["general"]["forgot"]


def test_verdict_points_at_the_start_when_never_beaten():
    cb = _baseline({MONITOR: 20.0}, {MONITOR: [(10, 12.0), (20, 20.0)]})  # equal is not better
    report = cb.report(_trainer("runs/x/best-step=20.ckpt"), SimpleNamespace(hparams={"pretrained": "ckpts/sam3"}))
    assert report["beat_start"] is False and report["best_checkpoint"] == "ckpts/sam3"
    assert report["best_fine_tuned_checkpoint"] == "runs/x/best-step=20.ckpt"
    assert report["sets"]["domain"]["at_selected"] == 20.0  # the start's value: the start is kept
    lines = "\n".join(cb.summary_lines(_trainer(), SimpleNamespace(hparams={"pretrained": "ckpts/sam3"})))
    assert "NEVER BEAT ZERO-SHOT on val/domain/cgF1: the best weights are the starting ones, ckpts/sam3" in lines
    low = _baseline({MONITOR: 20.0}, {MONITOR: [(10, 25.0)]}, mode="min")  # mode min: 25 is worse
    assert low.report(_trainer())["beat_start"] is False


# ------------------------------------------------------------------------------------------ the real CLI
def _config(root: Path, shapes_root: str, *, model=None, zero_shot: bool = True) -> Path:
    shards = [f"{shapes_root}/shards/train/shapes-{i:06d}.tar" for i in range(8)]
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(root / "checkpoints"), "monitor": MONITOR, "mode": "max", "save_top_k": 1,
                       "filename": "best-{step}"}},
        {"class_path": "sam3_train.finetune.ZeroShotBaseline",
         "init_args": {"monitor": MONITOR, "validate_at_start": zero_shot}},
        {"class_path": "sam3_train.callbacks.RunSummary"},
        {"class_path": "sam3_train.callbacks.ValidationImages", "init_args": {"num_images": 1, "max_phrases": 1}},
    ]
    return fit_config(
        root, shapes_root,
        trainer={"max_steps": 4, "limit_val_batches": 2, "val_check_interval": 2, "callbacks": callbacks},
        model=model,
        data={"train_sources": [{"name": "domain", "shards": shards[:2], "weight": 1},
                                {"name": "general", "shards": shards[2:], "weight": 1}],
              "val_sets": {"domain": f"{shapes_root}/shards/val/shapes-{{000000..000001}}.tar",
                           "general": f"{shapes_root}/shards/test/shapes-{{000000..000001}}.tar"}},
    )


def _rows(root: Path) -> list[dict[str, str]]:
    with (root / "csv" / "version_0" / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_fit_validates_zero_shot_first_logs_named_sets_and_keeps_training_bitwise(shapes_root, tmp_path):
    root = tmp_path / "run"
    proc = run(["fit", "--config", str(_config(root, shapes_root))], tmp_path)
    assert proc.returncode == 0, output(proc)[-4000:]
    rows = _rows(root)
    for name in ("domain", "general"):
        steps = [int(r["step"]) for r in rows if r.get(f"val/{name}/cgF1")]
        assert steps == [0, 1, 3], steps  # zero-shot at step 0, then after steps 2 and 4 (logged at step - 1)
        assert any(r.get(f"val/{name}/mAP") for r in rows)
    assert not any(r.get("val/cgF1") for r in rows)  # named sets only
    shares = [float(r["train/source_share/domain"]) for r in rows if r.get("train/source_share/domain")]
    assert shares and all(0.0 <= s <= 1.0 for s in shares)
    summary = json.loads((root / SUMMARY_FILE).read_text())
    zero = {r["step"]: float(r[MONITOR]) for r in rows if r.get(MONITOR)}
    domain = summary["sets"]["domain"]
    assert domain["zero_shot"] == pytest.approx(zero["0"]) and domain["last"] == pytest.approx(zero["3"])
    assert domain["best"] == pytest.approx(max(zero["1"], zero["3"]))
    assert summary["beat_start"] == (domain["best"] > domain["zero_shot"])
    text = output(proc)
    assert "zero-shot -> best -> last" in text and "sam3-train: zero-shot val/domain/cgF1" in text
    assert sorted(p.name for p in (root / "checkpoints").glob("best-*.ckpt")) != []
    for step in ("step000000", "step000004"):  # the zero-shot pictures too, one folder per set
        assert all(list((root / "overlays" / step / name).glob("*.png")) for name in ("domain", "general"))

    # The zero-shot validation does not move the training's random stream or its data: same losses.
    plain = tmp_path / "plain"
    proc = run(["fit", "--config", str(_config(plain, shapes_root, zero_shot=False))], tmp_path)
    assert proc.returncode == 0, output(proc)[-4000:]
    assert logged(plain, 0) == logged(root, 0)
    assert json.loads((plain / SUMMARY_FILE).read_text())["sets"]["domain"]["zero_shot"] is None


@pytest.mark.slow
def test_fine_tune_that_cannot_beat_zero_shot_points_at_the_start(shapes_root, tmp_path):
    root = tmp_path / "frozen"  # learning rates 0: every validation equals the zero-shot one
    proc = run(["fit", "--config", str(_config(root, shapes_root, model={"lr": 0.0, "lr_vision": 0.0, "lr_text": 0.0}))],
               tmp_path)
    assert proc.returncode == 0, output(proc)[-4000:]
    summary = json.loads((root / SUMMARY_FILE).read_text())
    assert summary["beat_start"] is False
    assert summary["sets"]["domain"]["best"] == summary["sets"]["domain"]["zero_shot"]
    assert "NEVER BEAT ZERO-SHOT on val/domain/cgF1" in output(proc)


@pytest.mark.slow
def test_recipe_under_ddp_runs_equal_steps_and_logs_shares_over_both_ranks(shapes_root, tmp_path):
    """Two CPU ranks (gloo): two weighted sources, two validation sets and the zero-shot validation; both
    ranks run the same steps, and the logged shares are reduced over both ranks' images."""
    root = tmp_path / "ddp"
    ddp = ["--trainer.devices=2", "--trainer.strategy=lightning.pytorch.strategies.DDPStrategy",
           "--trainer.strategy.find_unused_parameters=true"]
    proc = run(["fit", "--config", str(_config(root, shapes_root)), *ddp, callback("RankRecorder", out_dir=str(tmp_path))],
               tmp_path)
    assert proc.returncode == 0, output(proc)[-4000:]
    assert [(tmp_path / f"done-rank{r}").read_text() for r in (0, 1)] == ["4 4", "4 4"]  # global_step, batches
    rows = _rows(root)
    shares = [float(r["train/source_share/domain"]) for r in rows if r.get("train/source_share/domain")]
    # Expected: the images both ranks drew this epoch (the stream is a function of seed, epoch and rank).
    from fault_cli import IMAGE_SIZE
    from conftest import SHAPES_SPLITS
    from sam3_train.data import Sam3DataModule
    from sam3_train.data.loader import StreamLoader

    data = yaml.safe_load((root / "fit.yaml").read_text())["data"]
    drawn = []
    for rank in (0, 1):
        dm = Sam3DataModule(**{**data, "shapes_splits": SHAPES_SPLITS, "image_size": IMAGE_SIZE})
        dm.setup("fit")
        stream = dm._stream("train", train=True)
        stream.rank, stream.world_size = rank, 2
        drawn += [s for b in StreamLoader(stream, epoch_fn=lambda: 0) for s in b.sources]
    assert len(drawn) == 16 and shares == [pytest.approx(drawn.count("domain") / 16)]
    assert [int(r["step"]) for r in rows if r.get("val/general/cgF1")] == [0, 1, 3]
    assert json.loads((root / SUMMARY_FILE).read_text())["sets"]["general"]["zero_shot"] is not None
