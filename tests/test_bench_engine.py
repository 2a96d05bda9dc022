"""benchmarks/bench_engine.py's transfer regime (docs/data_engine.md): the fine-tune config the real CLI
reads as a full fine-tune of the pretrained base on the shifted domain, the gap each round recovers
against its own 100%-label reference, and the results file keeping both regimes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_engine  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")]


def test_transfer_config_is_a_full_fine_tune_of_the_base_on_the_shifted_domain(tmp_path):
    from sam3_train.cli import Sam3CLI
    from sam3_train.data import Sam3DataModule
    from sam3_train.lit import Sam3LitModule

    base = bench_engine.quick_base(tmp_path)
    path = bench_engine.transfer_config(tmp_path, base, steps=7, splits={"train": 6, "val": 2, "test": 2}, quick=True)
    cfg = yaml.safe_load(Path(path).read_text())
    model, data = cfg["model"], cfg["data"]
    assert model["pretrained"] == str(base) and not {"init", "denoising", "preset"} & set(model)
    assert model["lr"] == model["lr_vision"] == model["lr_text"] == 1.0e-4  # bench_finetune's recipe
    assert "shapes_root" not in data and cfg["trainer"]["max_steps"] == data["steps_per_epoch"] == 7
    assert data["min_scale"] == 0.5  # SAM 3's scale jitter, which the main job turns off
    for split, count in {"train": 6, "val": 2, "test": 2}.items():
        folder = Path(data[f"{split}_shards"]).parent
        params = json.loads((folder / "manifest.json").read_text())["params"]
        assert params["domain"] == "shifted" and params["count"] == count
    cli = Sam3CLI(Sam3LitModule, Sam3DataModule, run=False, save_config_callback=None,
                  args=["--config", path, "--trainer.logger=false"])
    assert cli.trainer.max_steps == 7 and cli.model.detector.denoising is None
    assert cli.datamodule.patterns["train"] == data["train_shards"]


def fake_run(root: Path, cgf1s: list[float]) -> None:
    """An engine work folder with one finished round per figure (its manifest's test cgF1) and no proposals."""
    (root / "split").mkdir(parents=True)
    (root / "split" / "split.json").write_text(json.dumps({"params": {"urls": []}}))
    for i, value in enumerate(cgf1s):
        (root / f"round-{i:03d}").mkdir()
        (root / f"round-{i:03d}" / "manifest.json").write_text(json.dumps({"metrics": {"test/cgF1": value}}))


def test_transfer_gap_is_measured_per_round_against_its_own_reference_and_saved_beside_the_other_regimes(tmp_path):
    for seed, (rounds, full) in enumerate([([2.0, 3.0, 4.5], 7.0), ([1.0, 0.5, 2.0], 3.0)]):
        fake_run(tmp_path / f"seed-{seed}" / "transfer", rounds)
        fake_run(tmp_path / f"seed-{seed}" / "transfer-full", [full])
    (tmp_path / "seed-0" / "transfer" / "round-003").mkdir()  # an interrupted round: no figure yet
    control = tmp_path / "seed-0" / "transfer-labelled" / "round-001"  # seed 0's labelled-only control of round 1
    control.mkdir(parents=True)
    (control / "metrics.json").write_text(json.dumps({"test": {"test/cgF1": 2.5}}))
    seeds = [bench_engine.seed_result(seed=s, work=tmp_path, chains={}, regimes=["transfer"], audit_images=None)
             for s in (0, 1)]
    assert seeds[0]["regimes"]["transfer"]["gap_recovered_by_round"][:2] == pytest.approx([0.2, 0.5])
    assert seeds[0]["regimes"]["transfer"]["gap_recovered_by_round"][2] is None
    assert seeds[0]["regimes"]["transfer"]["gap_recovered"] == pytest.approx(0.5)  # the last finished round's
    assert seeds[1]["regimes"]["transfer"]["gap_recovered_by_round"] == pytest.approx([-0.25, 0.5])
    assert seeds[1]["regimes"]["transfer"]["worst_round_change"] == pytest.approx(-0.5)
    assert seeds[0]["full"] is None and seeds[0]["transfer-full"]["test/cgF1"] == 7.0
    summary = bench_engine.summary(seeds, ["transfer"])
    assert summary["transfer gap recovered by round 1"]["min"] == pytest.approx(-0.25)
    assert summary["transfer gap recovered by round 2"]["values"] == pytest.approx([0.5, 0.5])
    assert summary["transfer-full cgF1"]["mean"] == pytest.approx(5.0) and "full cgF1" not in summary
    assert seeds[0]["transfer-labelled"][0]["test/cgF1"] == 2.5 and seeds[1]["transfer-labelled"] is None
    assert summary["transfer-labelled control 1 cgF1"]["values"] == [2.5]
    assert summary["transfer round 1 minus its control"]["values"] == pytest.approx([0.5])  # 3.0 - 2.5

    assert bench_engine.MIN_GAP == 0.5  # a gap below it is noise: no "gap recovered"
    fake_run(tmp_path / "seed-2" / "transfer", [2.0, 2.5])
    fake_run(tmp_path / "seed-2" / "transfer-full", [2.3])
    small = bench_engine.seed_result(seed=2, work=tmp_path, chains={}, regimes=["transfer"], audit_images=None)
    assert small["regimes"]["transfer"]["gap_recovered"] is None
    assert small["regimes"]["transfer"]["worst_round_change"] == pytest.approx(0.5)

    out = tmp_path / "engine.json"
    out.write_text(json.dumps({"benchmark": "data_engine", "regimes": ["weak"]}))  # the format before the groups
    bench_engine.save_result(out, "transfer", {"regimes": ["transfer"]})
    assert json.loads(out.read_text()) == {"from_scratch": {"benchmark": "data_engine", "regimes": ["weak"]},
                                           "transfer": {"regimes": ["transfer"]}}
    out.unlink()
    bench_engine.save_result(out, "from_scratch", {"regimes": ["weak"]})
    bench_engine.save_result(out, bench_engine.result_group(["transfer"]), {"regimes": ["transfer"]})
    assert json.loads(out.read_text()) == {"from_scratch": {"regimes": ["weak"]}, "transfer": {"regimes": ["transfer"]}}


@pytest.mark.slow
def test_labelled_control_continues_round_0_on_its_labelled_images_one_fit_per_round(tmp_path, monkeypatch):
    """--control: control k starts from control k - 1 (control 1 from round 0's model) and refits round 0's
    config (its labelled images, steps and recipe) into its own folder; a finished control is not rerun,
    one recorded from other start weights is."""
    import torch

    from sam3_train.engine.manifest import file_sha256
    from sam3_train.engine.settings import round_fit_config, write_config
    from sam3_train.engine.training import fit_round

    monkeypatch.setenv("WANDB_MODE", "disabled")
    base = bench_engine.quick_base(tmp_path)
    cfg = yaml.safe_load(Path(bench_engine.transfer_config(
        tmp_path, base, steps=2, splits={"train": 6, "val": 2, "test": 2}, quick=True)).read_text())
    engine_dir, controls = tmp_path / "seed-0" / "transfer", tmp_path / "seed-0" / "transfer-labelled"
    round0 = engine_dir / "round-000"
    round0.mkdir(parents=True)
    write_config(round_fit_config(cfg, round_dir=round0, train_shards=None), round0 / "fit-config.yaml")
    fit_round(round_dir=round0, round_info={"round": 0, "sources": {}, "counts": {}})
    (round0 / "model.ckpt.tmp").rename(round0 / "model.ckpt")

    bench_engine.run_controls(engine_dir, controls, 2, threads=1, log=tmp_path / "control.log")
    weights = lambda path: torch.load(path, map_location="cpu", weights_only=True)["state_dict"]  # noqa: E731
    previous = round0 / "model.ckpt"
    for k in (1, 2):
        out = controls / f"round-{k:03d}"
        result = json.loads((out / "metrics.json").read_text())
        assert result["fit"] == {"init_from": str(previous), "init_sha256": file_sha256(previous), "steps": 2,
                                 "config": str(round0 / "fit-config.yaml"),
                                 "config_sha256": file_sha256(round0 / "fit-config.yaml")}
        assert "test/cgF1" in result["test"]
        fitted = yaml.safe_load((out / "fit-config.yaml").read_text())
        assert fitted["data"]["train_shards"] == cfg["data"]["train_shards"]  # the labelled images alone
        assert fitted["trainer"]["default_root_dir"] == str(out / "fit")
        before, after = weights(previous), weights(out / "model.ckpt")
        assert any(not torch.equal(before[name], after[name]) for name in after)  # two more steps were taken
        previous = out / "model.ckpt"
    stamps = [(controls / f"round-{k:03d}" / "metrics.json").stat().st_mtime_ns for k in (1, 2)]
    bench_engine.run_controls(engine_dir, controls, 2, threads=1, log=tmp_path / "control.log")  # finished: skipped
    assert [(controls / f"round-{k:03d}" / "metrics.json").stat().st_mtime_ns for k in (1, 2)] == stamps
    second = controls / "round-002" / "metrics.json"  # as if control 1 had been fitted again since
    second.write_text(json.dumps({**json.loads(second.read_text()), "fit": {"init_sha256": "other"}}))
    bench_engine.run_controls(engine_dir, controls, 2, threads=1, log=tmp_path / "control.log")
    assert (controls / "round-001" / "metrics.json").stat().st_mtime_ns == stamps[0]
    assert json.loads(second.read_text())["fit"]["init_sha256"] == file_sha256(controls / "round-001" / "model.ckpt")
