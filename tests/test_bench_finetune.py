"""benchmarks/bench_finetune.py, the measured fine-tuning demonstration (docs/finetuning.md): its dry run
builds the data and one config per method x mixing that the real CLI parses into what the method means;
its aggregation; and (slow) a two-step fine-tune end to end through ``sam3-train fit``."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_finetune  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")]
# The smallest configuration: a 16-image base split, 8-image validation sets, a 1-shot cut of 30 scenes.
TINY = ["--base-splits", '{"train": 16}', "--val-images", "8", "--pool", "30", "--shots", "1", "--seeds", "0",
        "--steps", "2", "--val-every", "2"]


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    """A random tiny detector as an HF folder: the runner's ``--base`` (no 3,000-step base run here)."""
    from sam3_train.model import build_detector

    folder = tmp_path_factory.mktemp("base") / "hf"
    build_detector("tiny", num_queries=20, dropout=0.0).save_pretrained(folder)
    return folder


def test_dry_run_writes_one_config_per_method_and_mixing_that_the_cli_reads_as_meant(base_folder, tmp_path, capsys):
    from sam3_train.cli import Sam3CLI
    from sam3_train.data import Sam3DataModule
    from sam3_train.lit import Sam3LitModule

    out = tmp_path / "ft"
    assert bench_finetune.main(["--out", str(out), "--base", str(base_folder), *TINY, "--dry-run"]) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if " fit --config " in line]
    assert len(commands) == 6 and not (out / "runs" / "full-none-seed0" / "finetune_summary.json").exists()
    kshot = json.loads((out / "kshot" / "shifted-1shot-seed0" / "manifest.json").read_text())
    assert kshot["params"]["shots"] == 1 and kshot["kshot"]["protocol"].startswith("K images per category")
    lora = yaml.safe_load((REPO / "configs" / "sam3_lora.yaml").read_text())["model"]["lora"]
    trainable = {}
    for method in bench_finetune.METHODS:
        for mix in bench_finetune.MIXES:
            path = out / "runs" / f"{method}-{mix.replace(':', 'to')}-seed0" / "fit.yaml"
            cfg = yaml.safe_load(path.read_text())
            sources = cfg["data"]["train_sources"]
            assert [s["name"] for s in sources] == (["shifted", "base"] if mix == "1:1" else ["shifted"])
            assert all(s["weight"] == 1.0 for s in sources) and list(cfg["data"]["val_sets"]) == ["shifted", "base"]
            assert cfg["seed_everything"] == cfg["data"]["seed"] == 0 and cfg["model"]["pretrained"] == str(out / "base" / "hf")
            assert cfg["model"].get("lora") == (lora if method == "lora" else None)
            assert "denoising" not in cfg["model"] and "init" not in cfg["model"]  # SAM 3's fine-tuning recipe
            assert cfg["data"]["min_scale"] == 0.5  # SAM 3's scale jitter, which the main job turns off
            cli = Sam3CLI(Sam3LitModule, Sam3DataModule, run=False, save_config_callback=None,
                          args=["--config", str(path), "--trainer.logger=false"])
            detector = cli.model.detector
            trainable[method] = sum(p.numel() for p in detector.parameters() if p.requires_grad)
            vision = [p.requires_grad for p in detector.vision_encoder.parameters()]
            assert any(vision) == (method != "frozen_vision")  # LoRA: the ViT's adapters train
            monitored = [c.monitor for c in cli.trainer.checkpoint_callbacks]
            assert monitored == ["val/shifted/cgF1"] and cli.trainer.max_steps == 2
    # What each method trains: everything > all but the ViT > the adapters alone.
    assert trainable["full"] > trainable["frozen_vision"] > trainable["lora"] > 0


def test_aggregate_gives_mean_and_sample_spread_over_seeds():
    def run(seed: int, best: float, after: float) -> dict:
        return {"method": "lora", "mix": "1:1", "seed": seed, "steps": 300, "wall_s": 100.0 + seed,
                "shifted": {"zero_shot": 5.0, "best": best, "best_step": 200, "last": best - 1},
                "base": {"before": 40.0, "at_best": after + 1, "after": after}}

    rows = bench_finetune.aggregate([run(0, 20.0, 30.0), run(1, 24.0, 34.0), run(2, 31.0, 35.0)])
    assert len(rows) == 1 and rows[0]["seeds"] == [0, 1, 2]
    assert rows[0]["shifted_best"]["mean"] == pytest.approx(25.0)
    assert rows[0]["shifted_best"]["sd"] == pytest.approx(statistics.stdev([20.0, 24.0, 31.0]))
    assert rows[0]["base_after"]["mean"] == pytest.approx(33.0) and rows[0]["shifted_zero_shot"]["sd"] == 0.0
    assert "| lora | 1:1 | 5.00 ± 0.00 | 25.00 ± 5.57 |" in bench_finetune.table(rows)


@pytest.mark.slow
def test_smallest_benchmark_runs_end_to_end(base_folder, tmp_path, monkeypatch):
    """One method and mixing, two steps, through ``sam3-train fit``: zero-shot first, both sets judged."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out, results = tmp_path / "ft", tmp_path / "finetune.json"
    argv = ["--out", str(out), "--base", str(base_folder), *TINY, "--methods", "lora", "--mix", "1:1",
            "--results", str(results), "--", "--data.num_workers=0"]
    assert bench_finetune.main(argv) == 0
    report = json.loads(results.read_text())
    (run,) = report["runs"]
    summary = json.loads((out / "runs" / "lora-1to1-seed0" / "finetune_summary.json").read_text())
    assert run["shifted"]["zero_shot"] == summary["sets"]["shifted"]["zero_shot"] is not None
    assert run["base"]["before"] == summary["sets"]["base"]["zero_shot"] is not None
    assert run["steps"] == 2 and run["wall_s"] > 0 and report["rows"][0]["method"] == "lora"
    csv = (out / "runs" / "lora-1to1-seed0" / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/source_share/base" in csv  # the 1:1 mix trained on both sources
    # A rerun reuses the finished run (nothing is fitted again) and reports the same figures; --no-run
    # reports an interrupted benchmark: seed 1 is neither run nor reported.
    assert bench_finetune.main(argv) == 0 and json.loads(results.read_text())["runs"] == report["runs"]
    cut = argv.index("--")
    assert bench_finetune.main([*argv[:cut], "--seeds", "0", "1", "--no-run", *argv[cut:]]) == 0
    assert json.loads(results.read_text())["runs"] == report["runs"]
    assert not (out / "runs" / "lora-1to1-seed1").exists()


def test_the_base_run_writes_every_output_under_its_folder(tmp_path):
    """A ``--trainer.default_root_dir`` override would not reach shapes_tiny.yaml's ``${...}`` paths: the
    base run's config copy names them all under ``OUT/base``, and the recipe is otherwise the file's."""
    command = bench_finetune.base_command(tmp_path, steps=7, splits={"train": 16})
    cfg = yaml.safe_load(Path(command[command.index("--config") + 1]).read_text())
    recipe = yaml.safe_load((REPO / "configs" / "shapes_tiny.yaml").read_text())
    paths = [cfg["trainer"]["default_root_dir"]] + [c["init_args"].get("save_dir") for c in cfg["trainer"]["logger"]] + [
        c["init_args"].get("dirpath") for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    assert len(paths) == 4 and all(str(p).startswith(str(tmp_path / "base")) for p in paths)
    assert cfg["model"] == recipe["model"] and "--trainer.max_steps=7" in command
    assert f"--data.shapes_root={tmp_path / 'shapes'}" in command
