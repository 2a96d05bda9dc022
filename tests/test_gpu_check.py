"""benchmarks/gpu_check.py before a GPU runs it: its CPU dry run end to end (every section, the real CLI
under DDP with gloo, the predictions file), its time budget, and a failing section or batch shape that
leaves the others running."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))  # the script imports its neighbours (bench_memory, bench_step)

import gpu_check  # noqa: E402

ESTIMATES = {(r["setting"], r["batch"]): r["peak_gib"]
             for r in json.loads((REPO / "benchmarks" / "results" / "memory.json").read_text())["rows"]}


@pytest.mark.slow
def test_dry_run_measures_every_section_and_the_cli_writes_predictions(tmp_path):
    out, work = tmp_path / "check.json", tmp_path / "work"
    env = {**gpu_check.env_without_dist(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--work-dir", str(work)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    record = json.loads(out.read_text())
    assert record["dry_run"] is True and record["ok"] is True
    assert list(record["sections"]) == gpu_check.SECTIONS
    assert all(s["status"] == "ok" and "error" not in s for s in record["sections"].values()), record["sections"]
    assert 0 < record["seconds"] < 60 * record["budget_minutes"]
    assert record["environment"]["device"] == "cpu" and record["environment"]["fp32_matmul_tflops"] > 0

    anchor = record["sections"]["tiny_anchor"]["rows"][0]
    assert anchor["images"] == 4 and anchor["step_s"] > 0  # shapes_tiny.yaml's batch_size
    assert anchor["images_per_s"] == pytest.approx(anchor["images"] / anchor["step_s"])

    trainable = {}
    for name, setting in gpu_check.STEP_SECTIONS.items():
        section = record["sections"][name]
        assert section["setting"] == setting and section["preset"] == "tiny" and section["image_size"] == 112
        trainable[name] = section["trainable"]
        assert 0 < section["trainable"] <= section["parameters"]
        assert [row["batch"] for row in section["rows"]] == ["1x16", "2x4"]
        for row in section["rows"]:
            images, phrases = {"1x16": (1, 16), "2x4": (2, 4)}[row["batch"]]
            assert row["images"] == images and 0 < row["pairs"] <= images * phrases
            assert row["step_s"] > 0 and row["step_s_all"] and all(t > 0 for t in row["step_s_all"])
            assert row["images_per_s"] == pytest.approx(images / row["step_s"])
            assert row["estimate_gib"] == ESTIMATES[(setting, row["batch"])]  # the README's figure, read back
            assert "max_allocated_gib" not in row and "diff_gib" not in row  # no CUDA memory on the CPU
    assert trainable["sam3_lora_r16"] < trainable["sam3_frozen_vision"] < trainable["sam3_full"]

    cli = record["sections"]["cli_ddp"]
    for stage in ("fit", "predict"):
        assert cli[stage]["rc"] == 0 and cli[stage]["backend"] == "gloo" and cli[stage]["world_size"] == 1
        assert cli[stage]["strategy"] == "DDPStrategy" and cli[stage]["precision"] == "bf16-mixed"
    assert cli["fit"]["global_step"] == cli["steps"] == 2
    assert (work / "cli" / "checkpoints" / "last.ckpt").is_file()
    lines = Path(cli["predict"]["file"]).read_text().splitlines()
    assert len(lines) == cli["predict"]["lines"] == cli["predict"]["expected_lines"] == 1
    assert set(json.loads(lines[0])) == {"key", "height", "width", "phrases"}
    for name in gpu_check.SECTIONS:
        assert name in proc.stdout  # the printed table


def test_a_spent_budget_skips_every_section_and_fails_the_run(tmp_path):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--dry-run", "--budget-minutes", "0.001", "--out", str(out), "--work-dir",
                           str(tmp_path / "work")]) == 1
    record = json.loads(out.read_text())
    assert record["ok"] is False and list(record["sections"]) == gpu_check.SECTIONS
    assert all(s["status"] == "skipped" and "time budget" in s["reason"] for s in record["sections"].values())


def test_a_failing_section_or_batch_shape_leaves_the_others_running(tmp_path, monkeypatch, one_thread):
    def broken_anchor(*args, **kwargs):
        raise RuntimeError("anchor broke")

    make_batches = gpu_check.bench_memory.make_batches

    def no_sixteen_phrases(root, *, image_size, images, phrases, count=2):
        if phrases == 16:
            raise MemoryError("1x16 does not fit")
        return make_batches(root, image_size=image_size, images=images, phrases=phrases, count=count)

    monkeypatch.setattr(gpu_check, "anchor_section", broken_anchor)
    monkeypatch.setattr(gpu_check.bench_memory, "make_batches", no_sixteen_phrases)
    saved = []
    results = gpu_check.run_sections(["tiny_anchor", "sam3_lora_r16"], gpu_check.Sizes(dry_run=True), 600.0,
                                     tmp_path, lambda sections: saved.append(list(sections)))
    anchor, lora = results["tiny_anchor"], results["sam3_lora_r16"]
    assert anchor["status"] == "error" and anchor["error"] == "RuntimeError: anchor broke"
    assert "broken_anchor" in anchor["traceback"]
    assert lora["status"] == "error" and lora["error"] == "failed at 1x16"
    sixteen, four = lora["rows"]
    assert sixteen["error"] == "MemoryError: 1x16 does not fit" and "step_s" not in sixteen
    assert "error" not in four and four["step_s"] > 0 and four["images"] == 2
    assert saved == [["tiny_anchor"], ["tiny_anchor", "sam3_lora_r16"]]  # the JSON is written after each section


# ---------------------------------------------------------------------------------------- what the dry run found
@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_gradients_are_clipped_under_bf16_mixed_with_the_fused_optimizer(precision, one_thread):
    """Lightning's mixed-precision plugin refused to clip for the fused AdamW (every shipped GPU config:
    bf16-mixed, gradient_clip_val 0.1); Sam3LitModule clips as under fp32."""
    import lightning as L
    import torch

    from sam3_train.lit import Sam3LitModule

    module = Sam3LitModule(preset="tiny", image_size=112)
    module.trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, logger=False,
                               enable_checkpointing=False, enable_progress_bar=False)
    optimizer = module.configure_optimizers()["optimizer"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.manual_seed(0)
    for p in params:
        p.grad = torch.randn_like(p)
    before = torch.nn.utils.get_total_norm([p.grad for p in params])
    module.configure_gradient_clipping(optimizer, 0.1, "norm")
    after = torch.nn.utils.get_total_norm([p.grad for p in params])
    assert before > 1.0 and after == pytest.approx(0.1, rel=1e-4)
