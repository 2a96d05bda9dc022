"""The first questions a user asks on a GPU, answered in one run of a few minutes: JSON and a table.

    python benchmarks/gpu_check.py                                  # one GPU, within --budget-minutes (8)
    python benchmarks/gpu_check.py --dry-run --out /tmp/dry.json    # the same sections at tiny sizes on the CPU
    python benchmarks/gpu_check.py --sections sam3_full cli_ddp     # some sections only

Sections, each run alone (an error is recorded in the JSON and the next section runs):
- ``tiny_anchor``: configs/shapes_tiny.yaml's model, objective and batch (its own fp32), the main job's
  step on this device: a throughput anchor against the CPU figures in docs/benchmarks.md.
- ``sam3_full``, ``sam3_lora_r16``, ``sam3_frozen_vision``: the ``sam3`` preset (840 M parameters,
  random initialisation, nothing downloaded) at 1008 px, bf16 autocast with activation checkpointing,
  1 image x 16 phrases (the shipped configs) and 2 images x 4 phrases: the step's median time,
  images a second and ``torch.cuda.max_memory_allocated`` against the estimate the README's memory
  table restates (``benchmarks/results/memory.json``, written by benchmarks/bench_memory.py on fake
  tensors: same settings, same shapes batches, same step).
- ``cli_ddp``: the real ``sam3-train fit`` in a subprocess under Lightning's DDP on one device (NCCL on
  a GPU, gloo on the CPU), configs/sam3_finetune.yaml shrunk to the tiny preset on the shapes data for
  a few steps, then ``sam3-train predict`` from its ``last.ckpt``: both exit 0, the process group's
  backend is the expected one, the predictions file holds the expected lines.

A step is what ``Sam3LitModule`` trains, as bench_memory.py runs it: ``zero_grad``, the detector's
training forward (DAC halves) and SAM 3's objective under autocast, backward, clipping at 0.1, fused
AdamW. Times: ``torch.cuda.synchronize`` around each timed step, the median of the timed steps after
the warm-up (the warm-up allocates AdamW's state). Memory: the peak over the timed steps (the
allocator's peak is reset after the warm-up). The estimate bounds the one-to-many matches from above
(``topk`` per target); the real matchers at random weights find fewer, so a measured peak a little
under the estimate is expected; one above it, or far under, is the finding.

``--budget-minutes`` (default 8) bounds the whole run: each section gets the time left minus what
the later sections need at least; a section that cannot start in time is recorded as skipped, a step
loop stops early past its share (``budget_stopped``), a subprocess is killed at it. The exit status
is 0 only when every section ran and passed. docs/gpu.md: what to look at.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

sys.path.append(str(Path(__file__).resolve().parents[1]))  # appended: datasets/ must not shadow HF datasets

import bench_memory  # noqa: E402  (this folder is on sys.path when the script runs)
import bench_step  # noqa: E402
import sam3_train  # noqa: E402
from sam3_train.cli import redirect_outputs  # noqa: E402
from sam3_train.data import ensure_shapes_shards  # noqa: E402
from sam3_train.data.shapes import named_data_on_shapes  # noqa: E402
from sam3_train.dist import env_without_dist  # noqa: E402
from sam3_train.optim import param_groups  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The README's memory table (and the 1 x 16 figures in the paragraph under it) restate these rows.
ESTIMATES = REPO / "benchmarks" / "results" / "memory.json"
GIB = 2**30
STEP_SECTIONS = {  # section -> bench_memory.SETTINGS name (the estimate's row)
    "sam3_full": "full_bf16_ckpt",
    "sam3_lora_r16": "lora16_bf16_ckpt",
    "sam3_frozen_vision": "frozen_vision_bf16_ckpt",
}
SECTIONS = ["tiny_anchor", *STEP_SECTIONS, "cli_ddp"]


class Sizes:
    """What a run measures: the GPU's sizes, or the dry run's tiny ones on the CPU."""

    def __init__(self, *, dry_run: bool, strategy: str = "ddp"):
        self.dry_run, self.strategy = dry_run, strategy  # strategy: cli_ddp's trainer.strategy
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.preset = "tiny" if dry_run else "sam3"
        self.image_size = 112 if dry_run else 1008  # tiny: 112 / 14 = 8 tokens a side, one window
        self.batches = ["1x16", "2x4"]  # bench_memory.BATCHES names: images x phrases per image
        self.warmup = 1 if dry_run else 2
        self.timed = 1 if dry_run else 5
        self.anchor_timed = 1 if dry_run else 10
        self.cli_steps = 2 if dry_run else 4
        # Seconds a section needs at least to be worth starting (GPU: model build, warm-up, the CLI's two
        # process starts); the dry run on a 2-core CPU needs about as long for other reasons.
        self.min_seconds = {"tiny_anchor": 15, "sam3_full": 45, "sam3_lora_r16": 45, "sam3_frozen_vision": 45,
                            "cli_ddp": 90}


# ---------------------------------------------------------------------------------------- steps
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(detector, criterion, optimizer, params, batch, *, bf16: bool, device: torch.device) -> None:
    """One optimiser step as Lightning runs ``Sam3LitModule`` (bench_memory.train_step on ``device``)."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
        outputs = detector(batch)
        loss = criterion.weighted_total(criterion(outputs, batch.targets), num_pairs=batch.num_pairs)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 0.1)
    optimizer.step()


def time_steps(detector, criterion, optimizer, batches: list, *, warmup: int, bf16: bool, device: torch.device,
               deadline: float) -> dict[str, Any]:
    """Median seconds a step over ``batches[warmup:]`` (each timed between synchronisations) and the
    allocator's peak over those steps (CUDA only). Stops after the warm-up and one timed step once
    ``deadline`` (``time.monotonic()``) has passed."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    batches = [b.to(device) for b in batches]
    for batch in batches[:warmup]:
        train_step(detector, criterion, optimizer, params, batch, bf16=bf16, device=device)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for batch in batches[warmup:]:
        start = time.perf_counter()
        train_step(detector, criterion, optimizer, params, batch, bf16=bf16, device=device)
        sync(device)
        times.append(time.perf_counter() - start)
        if time.monotonic() > deadline:
            break
    images, pairs = batches[warmup].num_images, batches[warmup].num_pairs
    median = statistics.median(times)
    row = {"images": images, "pairs": pairs, "step_s": median, "step_s_all": times,
           "images_per_s": images / median, "pairs_per_s": pairs / median,
           "budget_stopped": len(times) < len(batches) - warmup}
    if device.type == "cuda":
        row["max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        row["max_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    return row


def estimates() -> dict[tuple[str, str], float]:
    """{(bench_memory setting, batch): estimated peak GiB} at the sam3 preset and 1008 px."""
    record = json.loads(ESTIMATES.read_text())
    if (record["preset"], record["image_size"]) != ("sam3", 1008):
        raise ValueError(f"{ESTIMATES} holds the {record['preset']} preset at {record['image_size']} px, "
                         "not the README's sam3 at 1008 px")
    return {(row["setting"], row["batch"]): row["peak_gib"] for row in record["rows"]}


def step_section(setting_name: str, sizes: Sizes, root: Path, deadline: float) -> dict[str, Any]:
    """One bench_memory setting at both batch shapes; a failing batch shape is recorded in its row."""
    setting = next(s for s in bench_memory.SETTINGS if s.name == setting_name)
    torch.manual_seed(0)
    start = time.perf_counter()
    # Built on the CPU (bench_memory.build: the detector, objective and optimiser Sam3LitModule builds),
    # then moved: Module.to keeps every Parameter object, so the optimiser (no state yet) follows.
    detector, criterion, optimizer = bench_memory.build(setting, sizes.preset, sizes.image_size)
    detector.to(sizes.device)
    criterion.to(sizes.device)
    assert all(p.device.type == sizes.device.type for g in optimizer.param_groups for p in g["params"])
    section: dict[str, Any] = {
        "setting": setting.name, "description": setting.describe(), "preset": sizes.preset,
        "image_size": sizes.image_size, "build_s": time.perf_counter() - start,
        "parameters": sum(p.numel() for p in detector.parameters()),
        "trainable": sum(p.numel() for p in detector.parameters() if p.requires_grad), "rows": [],
    }
    reference = estimates()
    for name in sizes.batches:
        images, phrases = bench_memory.BATCHES[name]
        row: dict[str, Any] = {"batch": name, "estimate_gib": reference.get((setting.name, name))}
        try:
            batches = bench_memory.make_batches(root / "shapes", image_size=sizes.image_size, images=images,
                                                phrases=phrases, count=sizes.warmup + sizes.timed)
            row.update(time_steps(detector, criterion, optimizer, batches, warmup=sizes.warmup,
                                  bf16=setting.precision == "bf16-mixed", device=sizes.device, deadline=deadline))
            if "max_allocated_gib" in row and row["estimate_gib"] and not sizes.dry_run:
                row["diff_gib"] = row["max_allocated_gib"] - row["estimate_gib"]
                row["measured_over_estimate"] = row["max_allocated_gib"] / row["estimate_gib"]
        except Exception as exn:  # noqa: BLE001 - recorded; the other batch shape still runs
            row.update(error(exn))
            if sizes.device.type == "cuda":
                row["max_allocated_gib"] = torch.cuda.max_memory_allocated(sizes.device) / GIB
        section["rows"].append(row)
    bad = [r["batch"] for r in section["rows"] if "error" in r]
    if bad:
        section["error"] = f"failed at {', '.join(bad)}"
    return section


def anchor_section(sizes: Sizes, root: Path, deadline: float) -> dict[str, Any]:
    """configs/shapes_tiny.yaml's step on this device, at its own precision (fp32) and batch."""
    torch.manual_seed(0)
    module, batches = bench_step.build(bench_step.CONFIG, str(root / "shapes_tiny"), sizes.warmup + sizes.anchor_timed)
    detector, criterion, h = module.detector.train().to(sizes.device), module.criterion.to(sizes.device), module.hparams
    groups = param_groups(detector, lr=h.lr, lr_vision=h.lr_vision, lr_text=h.lr_text, layer_decay=h.layer_decay,
                          weight_decay=h.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=h.lr, fused=True)  # as Sam3LitModule
    row = time_steps(detector, criterion, optimizer, batches, warmup=sizes.warmup, bf16=False, device=sizes.device,
                     deadline=deadline)
    return {"config": "configs/shapes_tiny.yaml", "precision": "32-true", "image_size": module.detector.image_size,
            "rows": [{"batch": f"{row['images']} images", **row}]}


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """Best ``size`` x ``size`` matmul rate (TFLOP/s) of a few: the yardstick beside the step times."""
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


# ---------------------------------------------------------------------------------------- the real CLI
# A callback module the CLI runs load by class path (it lies on the child's PYTHONPATH): every rank
# records what it ran under, at the end of fit and of predict.
PROBE = '''
import json, pathlib
import lightning as L
import torch
import torch.distributed as dist


class Probe(L.Callback):
    def __init__(self, *, out_dir: str):
        self.out_dir = pathlib.Path(out_dir)

    def _write(self, trainer, pl_module, stage):
        import sam3_train
        record = {"stage": stage, "rank": trainer.global_rank, "world_size": trainer.world_size,
                  "backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
                  "strategy": type(trainer.strategy).__name__, "precision": str(trainer.precision),
                  "device": str(pl_module.device), "global_step": trainer.global_step,
                  "sam3_train": str(pathlib.Path(sam3_train.__file__).resolve().parent)}
        if torch.cuda.is_available():
            record["max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        (self.out_dir / f"probe-{stage}-rank{trainer.global_rank}.json").write_text(json.dumps(record))

    def on_train_end(self, trainer, pl_module):
        self._write(trainer, pl_module, "fit")

    def on_predict_end(self, trainer, pl_module):
        self._write(trainer, pl_module, "predict")
'''
CLI_SHAPES = {"train": 16, "val": 8, "test": 8}


def _command() -> list[str]:
    script = Path(sys.executable).with_name("sam3-train")
    return [str(script)] if script.exists() else [sys.executable, "-m", "sam3_train.console"]


def _cli(args: list[str], root: Path, timeout_s: float) -> dict[str, Any]:
    env = env_without_dist()  # the child starts its own process group
    env.update(WANDB_MODE="disabled", WANDB_SILENT="true")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    log = root / f"{args[0]}.log"  # the run's whole output, kept beside its checkpoints
    with log.open("w") as f:
        try:
            rc: int | None = subprocess.run([*_command(), *args], cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT,
                                            timeout=timeout_s, check=False).returncode
        except subprocess.TimeoutExpired:  # run() has killed it
            rc = None
    out = {"rc": rc, "seconds": time.perf_counter() - start, "log": str(log)}
    if rc != 0:
        out["output_tail"] = log.read_text(errors="replace")[-3000:]
    return out


def run_cli_ddp(sizes: Sizes, root: Path, timeout_s: float) -> dict[str, Any]:
    """``sam3-train fit`` (configs/sam3_finetune.yaml shrunk: tiny preset, shapes data, a few steps)
    under DDP on one device, then ``predict`` from its last.ckpt; both checked (module docstring)."""
    end, dry_run, steps = time.monotonic() + timeout_s, sizes.dry_run, sizes.cli_steps
    root.mkdir(parents=True, exist_ok=True)
    (root / "gpu_check_probe.py").write_text(PROBE)
    cfg = redirect_outputs(yaml.safe_load((REPO / "configs" / "sam3_finetune.yaml").read_text()), root,
                           logs_subdir="logs")
    for logger in cfg["trainer"].get("logger") or []:
        if isinstance(logger, dict) and logger["class_path"].endswith("WandbLogger"):
            logger["init_args"]["offline"] = False  # offline=True sets WANDB_MODE=dryrun over our "disabled"
    # Its named sources and validation sets (placeholders for the user's data) read the shapes splits.
    cfg["data"].update(named_data_on_shapes(cfg["data"], ensure_shapes_shards(root / "shapes", splits=CLI_SHAPES)))
    config = root / "sam3_finetune_shrunk.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    probe = json.dumps({"class_path": "gpu_check_probe.Probe", "init_args": {"out_dir": str(root)}})
    writer = json.dumps({"class_path": "sam3_train.callbacks.PredictionWriter",
                         "init_args": {"output_dir": str(root / "predictions")}})
    # Shrunk: model and data size, workers, device count. Kept: its precision (bf16-mixed), activation
    # checkpointing, DAC, schedule, loggers and callbacks.
    shrink = [
        "--model.preset=tiny", "--model.pretrained=null", f"--data.image_size={112 if dry_run else 224}",
        f"--data.shapes_root={root / 'shapes'}", f"--data.shapes_splits={json.dumps(CLI_SHAPES)}",
        "--data.train_shards=null", "--data.val_shards=null", "--data.test_shards=null", "--data.predict_shards=null",
        f"--data.num_workers={0 if dry_run else 2}", f"--data.pin_memory={str(not dry_run).lower()}",
        f"--trainer.accelerator={'cpu' if dry_run else 'gpu'}", "--trainer.devices=1", "--trainer.num_nodes=1",
        f"--trainer.strategy={sizes.strategy}",
    ]
    expected_backend = "gloo" if dry_run else "nccl"
    result: dict[str, Any] = {"config": "configs/sam3_finetune.yaml", "strategy": sizes.strategy,
                              "expected_backend": expected_backend, "steps": steps}
    fit = _cli(["fit", "--config", str(config), *shrink, f"--trainer.max_steps={steps}",
                f"--data.steps_per_epoch={steps}", f"--trainer.val_check_interval={steps}",
                "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1", f"--trainer.callbacks+={probe}"],
               root, timeout_s=max(1.0, 0.7 * (end - time.monotonic())))
    problems = []
    last = root / "checkpoints" / "last.ckpt"
    fit_probe = root / "probe-fit-rank0.json"
    fit.update(json.loads(fit_probe.read_text()) if fit_probe.is_file() else {})
    result["fit"] = fit
    if fit["rc"] != 0:
        problems.append(f"fit exited {fit['rc']}" + (" (timed out)" if fit.get("timed_out") else ""))
    if fit.get("backend") != expected_backend:
        problems.append(f"fit ran with backend {fit.get('backend')!r}, expected {expected_backend!r}")
    if fit.get("global_step") != steps:
        problems.append(f"fit ran {fit.get('global_step')} steps, expected {steps}")
    if fit.get("sam3_train") and Path(fit["sam3_train"]) != Path(sam3_train.__file__).resolve().parent:
        problems.append(f"the CLI imported sam3_train from {fit['sam3_train']}, not this checkout: pip install -e . "
                        "here, or put it on PYTHONPATH")
    if last.is_file():
        predict = _cli(["predict", "--config", str(config), "--ckpt_path", str(last), *shrink,
                        "--trainer.limit_predict_batches=1", f"--trainer.callbacks+={writer}",
                        f"--trainer.callbacks+={probe}"], root, timeout_s=max(1.0, end - time.monotonic()))
        predictions = root / "predictions" / "predictions-rank0.jsonl"
        predict_probe = root / "probe-predict-rank0.json"
        predict.update(json.loads(predict_probe.read_text()) if predict_probe.is_file() else {})
        # One batch of data.eval_batch_size (1 in the config) images, one line an image.
        expected_lines = int(cfg["data"].get("eval_batch_size") or 1)
        predict.update(file=str(predictions), expected_lines=expected_lines,
                       lines=len(predictions.read_text().splitlines()) if predictions.is_file() else None)
        result["predict"] = predict
        if predict["rc"] != 0:
            problems.append(f"predict exited {predict['rc']}" + (" (timed out)" if predict.get("timed_out") else ""))
        if predict["lines"] != expected_lines:
            problems.append(f"{predictions.name}: {predict['lines']} line(s), expected {expected_lines}")
        if predict.get("backend") != expected_backend:
            problems.append(f"predict ran with backend {predict.get('backend')!r}, expected {expected_backend!r}")
    else:
        problems.append(f"fit wrote no {last}: predict not run")
    if problems:
        result["error"] = "; ".join(problems)
    return result


# ---------------------------------------------------------------------------------------- run
def error(exn: BaseException) -> dict[str, str]:
    return {"error": f"{type(exn).__name__}: {exn}"[:2000], "traceback": traceback.format_exc()[-4000:]}


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_sections(names: list[str], sizes: Sizes, budget_s: float, root: Path,
                 save: Callable[[dict], None]) -> dict[str, dict]:
    """Every section in ``names`` (SECTIONS order), each alone, within ``budget_s`` seconds in all."""
    end = time.monotonic() + budget_s
    results: dict[str, dict] = {}
    for i, name in enumerate(names):
        later = sum(sizes.min_seconds[n] for n in names[i + 1:])
        deadline = end - later  # this section's share: what the later sections need at least is kept for them
        if deadline - time.monotonic() < sizes.min_seconds[name] / 3:
            left = max(0.0, end - time.monotonic())
            results[name] = {"status": "skipped", "reason": f"time budget: {left:.0f} s left"}
            save(results)
            continue
        print(f"[gpu_check] {name} ...", flush=True)
        start = time.perf_counter()
        try:
            if name == "tiny_anchor":
                result = anchor_section(sizes, root, deadline)
            elif name == "cli_ddp":
                result = run_cli_ddp(sizes, root / "cli", timeout_s=max(1.0, deadline - time.monotonic()))
            else:
                result = step_section(STEP_SECTIONS[name], sizes, root, deadline)
            result["status"] = "error" if "error" in result else "ok"
        except Exception as exn:  # noqa: BLE001 - recorded; the next section runs
            result = {"status": "error", **error(exn)}
        result["seconds"] = time.perf_counter() - start
        results[name] = result
        free(sizes.device)
        save(results)
    return results


def environment(device: torch.device) -> dict[str, Any]:
    import lightning
    import peft
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "lightning": lightning.__version__,
            "peft": peft.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "device": str(device)}
    try:  # the sections still run when a probe fails
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            nccl = torch.cuda.nccl.version()  # a tuple in recent torch, an int in older ones
            info.update(gpu=props.name, gpu_memory_gib=props.total_memory / GIB, cuda=torch.version.cuda,
                        nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl),
                        bf16_matmul_tflops=matmul_tflops(device, torch.bfloat16, 8192),
                        fp32_matmul_tflops=matmul_tflops(device, torch.float32, 8192))  # TF32 off: torch's default
        else:
            info["fp32_matmul_tflops"] = matmul_tflops(device, torch.float32, 1024)
    except Exception as exn:  # noqa: BLE001 - recorded
        info["error"] = f"{type(exn).__name__}: {exn}"
    return info


def table(record: dict) -> str:
    """The printed summary: one line a measured row, one a CLI run, one an error or skip."""
    lines = [f"{'section':<20}{'batch':<10}{'step s':>9}{'img/s':>9}{'pairs/s':>9}{'peak GiB':>10}"
             f"{'estimate':>10}{'diff GiB':>10}"]
    for name, section in record["sections"].items():
        if section["status"] == "skipped":
            lines.append(f"{name:<20}skipped: {section['reason']}")
            continue
        for row in section.get("rows", []):
            if "error" in row:
                lines.append(f"{name:<20}{row['batch']:<10}ERROR {row['error'][:100]}")
                continue
            def cell(key: str, fmt: str) -> str:
                return format(row[key], fmt) if row.get(key) is not None else "-"
            lines.append(f"{name:<20}{row['batch']:<10}{cell('step_s', '.3f'):>9}{cell('images_per_s', '.2f'):>9}"
                         f"{cell('pairs_per_s', '.1f'):>9}{cell('max_allocated_gib', '.2f'):>10}"
                         f"{cell('estimate_gib', '.2f'):>10}{cell('diff_gib', '+.2f'):>10}")
        if name == "cli_ddp" and "fit" in section:
            fit, predict = section["fit"], section.get("predict", {})
            lines.append(f"{name:<20}fit rc {fit.get('rc')} ({fit.get('backend')}, world {fit.get('world_size')}, "
                         f"{fit.get('global_step')} steps, {fit.get('seconds', 0):.0f} s); "
                         f"predict rc {predict.get('rc')}, "
                         f"{predict.get('lines')} line(s) in {predict.get('file')}")
        if "error" in section:
            lines.append(f"{name:<20}ERROR {section['error'][:160]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (gloo), 2 steps a section")
    parser.add_argument("--budget-minutes", type=float, default=8.0, help="the whole run's time limit")
    parser.add_argument("--sections", nargs="+", default=SECTIONS, choices=SECTIONS)
    parser.add_argument("--cli-strategy", default="ddp", help="cli_ddp's trainer.strategy")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON (default: benchmarks/results/gpu_check.json; with --dry-run a temporary file)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep the shapes data and the CLI runs' logs, checkpoints and predictions here "
                             "(default: a temporary folder, removed at the end)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or add --dry-run for the CPU rehearsal")
    sizes = Sizes(dry_run=args.dry_run, strategy=args.cli_strategy)
    out = args.out or (Path(tempfile.gettempdir()) / "gpu_check_dry_run.json" if args.dry_run
                       else REPO / "benchmarks" / "results" / "gpu_check.json")
    names = [n for n in SECTIONS if n in args.sections]
    started = time.perf_counter()
    record: dict[str, Any] = {"dry_run": args.dry_run, "budget_minutes": args.budget_minutes,
                              "environment": environment(sizes.device), "sections": {}}

    def save(sections: dict) -> None:
        record.update(sections=sections, seconds=time.perf_counter() - started)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1) + "\n")

    work_dir = nullcontext(str(args.work_dir)) if args.work_dir else tempfile.TemporaryDirectory(prefix="gpu_check_")
    with work_dir as work:
        Path(work).mkdir(parents=True, exist_ok=True)
        sections = run_sections(names, sizes, args.budget_minutes * 60 - (time.perf_counter() - started), Path(work),
                                save)
    record["ok"] = all(s["status"] == "ok" for s in sections.values())
    save(sections)
    env = record["environment"]
    print(f"\n{env.get('gpu', env['device'])}, torch {env['torch']}, transformers {env['transformers']}, "
          f"lightning {env['lightning']}; {'dry run, ' if args.dry_run else ''}{record['seconds']:.0f} s of "
          f"{args.budget_minutes:g} min")
    print(table(record))
    print(f"saved {out}")
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
