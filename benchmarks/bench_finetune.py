"""Fine-tuning on a shifted domain, measured: zero-shot -> fine-tuned on it, and what the base domain keeps.

    python benchmarks/bench_finetune.py --out /work/ft-runs                  # docs/finetuning.md's table (~1 h at 1 thread, base aside)
    python benchmarks/bench_finetune.py --out runs/ft --methods lora --mix none --seeds 0 --steps 20   # a quick look
    python benchmarks/bench_finetune.py --out runs/ft --dry-run              # the data, configs and commands only

1. Base model: the main job's recipe (configs/shapes_tiny.yaml) on the base shapes data, trained by
   ``sam3-train fit`` into ``OUT/base`` for ``--base-steps`` steps unless its ``last.ckpt`` already holds
   them (or ``--base`` names a ``.ckpt`` or HF folder), then saved as an HF folder (``OUT/base/hf``) that
   every fine-tune reads as ``model.pretrained``.
2. Shifted domain (``sam3_train.data.shapes``, ``domain="shifted"``: new backgrounds, colours and kinds).
   Per seed S its K-shot training cut (``write_kshot_split``: K images per kind, GLIP's ODinW protocol,
   as data/kshot.py, drawn from the domain's 2,000-image training split with seed S; every query of a
   kept image, negatives included). Validation: the first ``--val-images`` images of each domain's
   val split, logged as ``val/shifted/cgF1`` and ``val/base/cgF1`` (``data.val_sets``); the shifted set
   selects the kept checkpoint.
3. Per seed x method x mixing, one ``sam3-train fit`` subprocess (as a user runs it) on a config derived
   from shapes_tiny.yaml (its criterion, batch and phrase settings), ``--steps`` steps: methods ``full``
   (every weight), ``lora`` (configs/sam3_lora.yaml's ``model.lora`` and its learning rates) and
   ``frozen_vision`` (``model.freeze_vision``); mixing ``none`` (the K-shot cut alone) or ``1:1`` (with
   the base training split, ``data.train_sources``). ``seed_everything``, ``data.seed`` (data order,
   augmentation, phrase sampling) and the K-shot cut all follow S. ``ZeroShotBaseline`` validates
   before the first step; its ``finetune_summary.json`` gives zero-shot, best and last per set.
4. ``--results`` (benchmarks/results/finetune.json): every run (shifted cgF1 zero-shot -> best -> last,
   base cgF1 before -> at the kept checkpoint -> after, steps, wall seconds) and per method x mixing
   the mean and sample standard deviation over seeds; the table is printed. Finished runs are reused.
   Arguments after ``--`` go to every fine-tune's ``sam3-train fit``; ``--no-run`` reports the finished
   runs of an interrupted benchmark without starting the others. Run with OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from sam3_train.callbacks import matmul_gflops  # noqa: E402
from sam3_train.cli import redirect_outputs  # noqa: E402
from sam3_train.data.shapes import ensure_shapes_shards, write_kshot_split  # noqa: E402
from sam3_train.finetune import SUMMARY_FILE  # noqa: E402

METHODS = ("full", "lora", "frozen_vision")
MIXES = ("none", "1:1")
MONITOR = "val/shifted/cgF1"
# Fine-tuning learning rates for full and frozen-vision runs: a third of the 3e-4 peak docs/finetuning.md's
# base was trained with (the recipe's peak is 5e-4 since), one rate for every part (the base was trained
# from scratch that way), cosine after a short warm-up.
FULL_LR = 1.0e-4
WARMUP_STEPS = 20
FINETUNE_MIN_SCALE = 0.5  # the DataModule's default, what every fine-tune here was measured with


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder of the base, the data and the runs")
    p.add_argument("--base", default=None, help="a base .ckpt or HF folder instead of training OUT/base")
    p.add_argument("--base-steps", type=int, default=3000, help="steps of the base run (the recipe's 3,000)")
    p.add_argument("--base-splits", default=None, help="JSON {split: images} of the base shapes data (default 2000/200/200)")
    p.add_argument("--steps", type=int, default=200, help="steps of each fine-tune")
    p.add_argument("--val-every", type=int, default=100, help="steps between validations")
    p.add_argument("--val-images", type=int, default=48, help="images of each validation set")
    p.add_argument("--shots", type=int, default=10, help="K images per kind")
    p.add_argument("--pool", type=int, default=2000, help="shifted training images the K-shot cut draws from")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--mix", nargs="+", choices=MIXES, default=list(MIXES))
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "finetune.json"))
    p.add_argument("--dry-run", action="store_true", help="build the data and configs, print the commands, run nothing")
    p.add_argument("--no-run", action="store_true", help="report the finished runs only (an interrupted benchmark)")
    return p


def base_command(out: Path, *, steps: int, splits: dict[str, int] | None) -> list[str]:
    """The main job's recipe, as is, into ``out/base`` on the shapes data under ``out/shapes``. A copy of
    shapes_tiny.yaml with every output path under ``out/base`` (``redirect_outputs``): a command-line
    ``--trainer.default_root_dir`` does not reach the file's ``${trainer.default_root_dir}`` paths."""
    cfg = redirect_outputs(yaml.safe_load((REPO / "configs" / "shapes_tiny.yaml").read_text()), out / "base")
    (out / "base").mkdir(parents=True, exist_ok=True)
    copy = out / "base" / "shapes_tiny.yaml"
    copy.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "sam3_train.console", "fit", "--config", str(copy),
           f"--data.shapes_root={out / 'shapes'}", f"--trainer.max_steps={steps}"]
    return cmd + ([f"--data.shapes_splits={json.dumps(splits)}"] if splits else [])


def checkpoint_step(path: Path) -> int | None:
    """The ``global_step`` a ``.ckpt`` was saved at, None when there is none."""
    if not path.is_file():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def ensure_base(args: argparse.Namespace, out: Path) -> Path:
    """The base as an HF folder (``OUT/base/hf``), training it first when needed (module docstring, 1)."""
    from sam3_train.loading import load_detector

    hf = out / "base" / "hf"
    source = Path(args.base) if args.base else out / "base" / "checkpoints" / "last.ckpt"
    if not args.base and checkpoint_step(source) != args.base_steps:
        splits = json.loads(args.base_splits) if args.base_splits else None
        cmd = base_command(out, steps=args.base_steps, splits=splits)
        print(" ".join(cmd[1:]), flush=True)
        if args.dry_run or args.no_run:
            return hf
        if subprocess.run(cmd, check=False).returncode != 0 or checkpoint_step(source) != args.base_steps:
            raise SystemExit(f"bench_finetune: the base run did not reach step {args.base_steps} ({out / 'base'})")
    record = out / "base" / "hf_source.json"
    stamp = {"source": str(source.resolve()), "mtime_ns": source.stat().st_mtime_ns} if source.exists() else None
    if stamp and not (record.is_file() and json.loads(record.read_text()) == stamp):
        load_detector(source).save_pretrained(hf)  # a weights-only start: no optimiser state, step 0
        record.write_text(json.dumps(stamp))
    return hf


def base_image_size(pretrained: Path | str) -> int | None:
    """The input side an HF folder's detector was built for, which its fine-tunes take (None while the
    folder is not built yet: a dry run)."""
    from transformers import Sam3Config

    if not (Path(pretrained) / "config.json").is_file():
        return None
    return Sam3Config.from_pretrained(pretrained).vision_config.backbone_config.image_size


def finetune_model(model: dict[str, Any], pretrained: Path | str) -> dict[str, Any]:
    """shapes_tiny.yaml's ``model`` section turned, in place, into the full fine-tune of ``pretrained``
    (also the data engine's transfer regime, benchmarks/bench_engine.py). Its data section must take the
    base's input side (``base_image_size``)."""
    # The sizes come with the pretrained folder; the from-scratch departures (the init and the denoising
    # queries) are not SAM 3's fine-tuning recipe, which the fine-tunes keep.
    for key in ("preset", "init", "model_overrides", "denoising"):
        model.pop(key, None)
    model.update(pretrained=str(pretrained), lr=FULL_LR, lr_vision=FULL_LR, lr_text=FULL_LR, layer_decay=1.0,
                 warmup_steps=WARMUP_STEPS)
    return model


def finetune_data(data: dict[str, Any]) -> dict[str, Any]:
    """shapes_tiny.yaml's ``data`` section given SAM 3's scale jitter back, in place: the main job trains
    from scratch without it (``min_scale: 1.0``, a measured departure: docs/training_shapes.md); the
    fine-tunes keep SAM 3's recipe, as they were measured (the side drawn from half to full)."""
    data["min_scale"] = FINETUNE_MIN_SCALE
    return data


def fit_config(run_dir: Path, *, method: str, mix: str, seed: int, pretrained: Path, kshot: str,
               base_train: str, val_sets: dict[str, str], steps: int, val_every: int) -> dict[str, Any]:
    """shapes_tiny.yaml turned into one fine-tune (module docstring, 3), its outputs under ``run_dir``."""
    cfg = yaml.safe_load((REPO / "configs" / "shapes_tiny.yaml").read_text())
    trainer, model, data = cfg["trainer"], cfg["model"], cfg["data"]
    trainer.update(max_steps=steps, val_check_interval=val_every, enable_progress_bar=False, num_sanity_val_steps=0)
    # CSV only (no W&B, no validation images): the run folder stays small and nothing but training is timed.
    trainer["logger"] = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"name": "csv"}}]
    trainer["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"monitor": MONITOR, "mode": "max", "save_top_k": 1, "filename": "best-{step}"}},
        {"class_path": "sam3_train.finetune.ZeroShotBaseline", "init_args": {"monitor": MONITOR, "tolerance": 1.0}},
        {"class_path": "sam3_train.callbacks.RunSummary"}]
    finetune_model(model, pretrained)
    if method == "lora":  # the shipped LoRA overlay's adapters and learning rates
        lora_model = yaml.safe_load((REPO / "configs" / "sam3_lora.yaml").read_text())["model"]
        model.update(lora_model)
    elif method == "frozen_vision":
        model["freeze_vision"] = True
    sources = [{"name": "shifted", "shards": kshot, "weight": 1.0}]
    if mix == "1:1":
        sources.append({"name": "base", "shards": base_train, "weight": 1.0})
    data.pop("shapes_root", None)
    finetune_data(data)
    data.update(train_sources=sources, val_sets=val_sets, steps_per_epoch=steps, seed=seed)
    data["image_size"] = base_image_size(pretrained) or data["image_size"]
    cfg["seed_everything"] = seed
    return redirect_outputs(cfg, run_dir)


def run_record(summary: dict[str, Any], *, method: str, mix: str, seed: int, wall_s: float | None) -> dict[str, Any]:
    """One run's figures from its ``finetune_summary.json``."""
    shifted, base = summary["sets"]["shifted"], summary["sets"]["base"]
    return {"method": method, "mix": mix, "seed": seed, "steps": shifted["last_step"], "wall_s": wall_s,
            "shifted": {k: shifted[k] for k in ("zero_shot", "best", "best_step", "last")},
            "base": {"before": base["zero_shot"], "at_best": base["at_selected"], "after": base["last"]},
            "beat_start": summary["beat_start"], "base_forgot": base["forgot"]}


FIELDS = {"shifted_zero_shot": ("shifted", "zero_shot"), "shifted_best": ("shifted", "best"),
          "shifted_last": ("shifted", "last"), "base_before": ("base", "before"), "base_at_best": ("base", "at_best"),
          "base_after": ("base", "after")}


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, mix): each field's mean and sample standard deviation (0 for one seed) over seeds."""
    rows = []
    for method in METHODS:
        for mix in MIXES:
            group = [r for r in runs if r["method"] == method and r["mix"] == mix]
            if not group:
                continue
            row: dict[str, Any] = {"method": method, "mix": mix, "seeds": [r["seed"] for r in group]}
            for name, (part, key) in {**FIELDS, "wall_s": (None, "wall_s")}.items():
                values = [r[key] if part is None else r[part][key] for r in group]
                values = [v for v in values if v is not None]
                if values:
                    row[name] = {"mean": statistics.fmean(values),
                                 "sd": statistics.stdev(values) if len(values) > 1 else 0.0}
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: cgF1 mean +- sd over seeds."""
    cell = lambda r, k: f"{r[k]['mean']:.2f} ± {r[k]['sd']:.2f}" if k in r else "-"  # noqa: E731
    lines = ["| method | mixing | shifted zero-shot | shifted best | shifted last | base before | base at best | "
             "base after | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        wall = f"{r['wall_s']['mean']:.0f}" if "wall_s" in r else "-"
        lines.append(f"| {r['method']} | {r['mix']} | " + " | ".join(cell(r, k) for k in FIELDS) + f" | {wall} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    out = Path(args.out)
    pretrained = ensure_base(args, out)
    splits = json.loads(args.base_splits) if args.base_splits else None
    base_train = ensure_shapes_shards(out / "shapes", splits={"train": (splits or {}).get("train", 2000)})["train"]
    val_sets = {"shifted": ensure_shapes_shards(out / "eval", splits={"val": args.val_images}, domain="shifted")["val"],
                "base": ensure_shapes_shards(out / "eval", splits={"val": args.val_images})["val"]}
    results = Path(args.results)
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:  # seed-major: an interrupted benchmark still has whole seeds
        kshot = write_kshot_split(out / "kshot" / f"shifted-{args.shots}shot-seed{seed}", domain="shifted",
                                  shots=args.shots, seed=seed, pool=args.pool)
        for method in args.methods:
            for mix in args.mix:
                run_dir = out / "runs" / f"{method}-{mix.replace(':', 'to')}-seed{seed}"
                summary, timing = run_dir / SUMMARY_FILE, run_dir / "wall_s.json"
                if not summary.is_file() and args.no_run:
                    print(f"{run_dir.name}: not run (--no-run)", flush=True)
                    continue
                if not summary.is_file():
                    run_dir.mkdir(parents=True, exist_ok=True)
                    cfg = fit_config(run_dir, method=method, mix=mix, seed=seed, pretrained=pretrained,
                                     kshot=kshot, base_train=base_train, val_sets=val_sets, steps=args.steps,
                                     val_every=args.val_every)
                    (run_dir / "fit.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
                    cmd = [sys.executable, "-m", "sam3_train.console", "fit", "--config", str(run_dir / "fit.yaml"), *extra]
                    print(" ".join(cmd[1:]), flush=True)
                    if args.dry_run:
                        continue
                    start = time.perf_counter()
                    with open(run_dir / "fit.log", "w") as log:
                        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
                    if code != 0 or not summary.is_file():
                        raise SystemExit(f"bench_finetune: {run_dir.name} failed (log: {run_dir / 'fit.log'})")
                    timing.write_text(json.dumps(time.perf_counter() - start))
                wall = json.loads(timing.read_text()) if timing.is_file() else None
                runs.append(run_record(json.loads(summary.read_text()), method=method, mix=mix, seed=seed, wall_s=wall))
                print(f"{run_dir.name}: " + json.dumps({k: runs[-1][k] for k in ("shifted", "base", "wall_s")}), flush=True)
    if args.dry_run:
        return 0
    rows = aggregate(runs)
    base_ckpt = Path(args.base) if args.base else out / "base" / "checkpoints" / "last.ckpt"
    report = {
        "benchmark": "finetune_shifted_shapes", "shots": args.shots, "kshot_protocol": "K images per kind (GLIP ODinW)",
        "pool": args.pool, "seeds": args.seeds, "steps": args.steps, "val_every": args.val_every,
        "val_images": args.val_images, "base_steps": checkpoint_step(base_ckpt) if base_ckpt.suffix == ".ckpt" else None,
        "full_lr": FULL_LR, "threads": torch.get_num_threads(), "extra_fit_args": extra,
        "matmul_gflops": matmul_gflops(), "torch": torch.__version__, "machine": platform.machine(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "rows": rows, "runs": runs,
    }
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(report, indent=1) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
