"""K-shot fine-tuning over several seeds: zero-shot and fine-tuned figures as mean and spread.

The harness for SAM 3's 10-shot tables (ODinW13, RF100-VL: COCO-format releases, one folder per
dataset with train / valid splits). Nothing is downloaded: the datasets and model.pretrained are local.

    SAM3_CHECKPOINT=checkpoints/sam3 python tools/kshot.py \\
        --train-annotations odinw/aquarium/train/_annotations.coco.json --train-images odinw/aquarium/train \\
        --val-annotations odinw/aquarium/valid/_annotations.coco.json --val-images odinw/aquarium/valid \\
        --shots 10 --seeds 0 1 2 --out runs/kshot/aquarium --config configs/sam3_finetune.yaml \\
        [--general 'datasets/saco/shards/train/saco-train-{000000..000099}.tar'] [-- --trainer.max_steps=2000]

Per seed S: the K-shot subset of the training split (``make_shards.py coco --shots K --seed S``: K
images per category, GLIP's ODinW protocol; absent categories as negatives) under
``OUT/shards/train-seedS``; then ``sam3-train fit`` with copies of the ``--config`` files whose outputs
go to ``OUT/seedS`` (``redirect_outputs``), training on that subset (mixed 1:1 with ``--general`` when
given) and validating on the whole validation split as the set ``domain`` (and ``--general-val`` as
``general``), with ``data.seed`` and ``seed_everything`` set to S. The configs must carry the
``ZeroShotBaseline`` callback (configs/sam3_finetune.yaml does): its ``finetune_summary.json`` gives
the zero-shot value, the value of the weights kept as best (selected on the domain set; the start's
if nothing beat it) and the last value, printed as mean +- sample standard deviation over the seeds
and written to ``OUT/kshot_summary.json``. The figures are on the validation split that also selects
the checkpoint: for a held-out figure, run ``sam3-train test`` on each kept checkpoint. Shards and finished seeds are reused on a rerun.
Arguments after ``--`` go to every ``sam3-train fit``; ``--dry-run`` prints the commands only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sam3_train.cli import redirect_outputs  # noqa: E402
from sam3_train.data.convert_coco import convert_coco  # noqa: E402
from sam3_train.finetune import SUMMARY_FILE  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-annotations", required=True, help="COCO JSON of the training split")
    p.add_argument("--train-images", required=True)
    p.add_argument("--val-annotations", required=True, help="COCO JSON of the validation split (used whole)")
    p.add_argument("--val-images", required=True)
    p.add_argument("--shots", type=int, default=10, help="K images per category")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--config", action="append", required=True, help="fit config(s), base first (repeatable)")
    p.add_argument("--out", required=True, help="folder of the shards, the runs and kshot_summary.json")
    p.add_argument("--general", default=None, help="general-data shards mixed 1:1 into training (a brace pattern)")
    p.add_argument("--general-weight", type=float, default=1.0, help="its weight against the subset's 1")
    p.add_argument("--general-val", default=None, help="general validation shards, logged as val/general/...")
    p.add_argument("--metric", default="cgF1", help="the figure reported (the summary's judged metric)")
    p.add_argument("--dry-run", action="store_true", help="print the fit commands, run nothing")
    return p


def shards(annotations: str, images: str, out: Path, *, prefix: str, shots: int | None = None, seed: int = 0,
           dry_run: bool = False) -> str:
    """Convert once; the pattern is kept in ``out/pattern.txt`` so a rerun reuses the shards."""
    marker = out / "pattern.txt"
    if marker.is_file():
        return marker.read_text().strip()
    if dry_run:
        return f"{out}/{prefix}-{{...}}.tar"
    result = convert_coco(annotations=annotations, images=images, out=out, prefix=prefix, shots=shots, seed=seed,
                          progress=False)
    if not result["written"]:
        raise SystemExit(f"kshot: no sample written from {annotations}")
    marker.write_text(result["pattern"])
    return result["pattern"]


def fit_command(configs: list[str], run_dir: Path, *, train: str, val: str, seed: int, general: str | None,
                general_weight: float, general_val: str | None, extra: list[str]) -> list[str]:
    """``sam3-train fit`` of one seed, with copies of ``configs`` writing under ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "sam3_train.console", "fit"]
    for i, path in enumerate(configs):
        cfg = redirect_outputs(yaml.safe_load(Path(path).read_text()), run_dir)
        copy = run_dir / f"config{i}-{Path(path).name}"
        copy.write_text(yaml.safe_dump(cfg, sort_keys=False))
        args += ["--config", str(copy)]
    sources = [{"name": "domain", "shards": train, "weight": 1.0}]
    if general:
        sources.append({"name": "general", "shards": general, "weight": general_weight})
    val_sets = {"domain": val, **({"general": general_val} if general_val else {})}
    return args + ["--data.train_shards=null", "--data.val_shards=null",
                   f"--data.train_sources={json.dumps(sources)}", f"--data.val_sets={json.dumps(val_sets)}",
                   f"--data.seed={seed}", f"--seed_everything={seed}", *extra]


def mean_spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(summaries: dict[int, dict[str, Any]], *, metric: str = "cgF1") -> dict[str, Any]:
    """Per validation set: the zero-shot value, the value at the weights kept as best (``at_selected``:
    chosen by the monitored set; the start's when no validation beat it), the set's own best and its
    last value, each over the seeds as {values, mean, sd}."""
    out: dict[str, Any] = {}
    sets = sorted({name for s in summaries.values() for name in s["sets"]})
    for name in sets:
        row: dict[str, Any] = {"metric": metric}
        for field in ("zero_shot", "at_selected", "best", "last"):
            values = [s["sets"][name][field] for s in summaries.values()
                      if name in s["sets"] and s["sets"][name].get(field) is not None]
            if values:
                mean, sd = mean_spread(values)
                row[field] = {"values": values, "mean": mean, "sd": sd}
        out[name] = row
    return out


def table(result: dict[str, Any], *, shots: int, seeds: list[int]) -> str:
    lines = [f"{shots}-shot, seeds {seeds}: mean +- sd over seeds",
             f"{'set':<16} {'zero-shot':>16} {'fine-tuned (kept)':>18} {'last':>16}"]
    cell = lambda r: f"{r['mean']:.2f} +- {r['sd']:.2f}" if r else "-"  # noqa: E731
    for name, row in result.items():
        lines.append(f"{name + '/' + row['metric']:<16} {cell(row.get('zero_shot')):>16} {cell(row.get('at_selected')):>18} "
                     f"{cell(row.get('last')):>16}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    out = Path(args.out)
    val = shards(args.val_annotations, args.val_images, out / "shards" / "val", prefix="val", dry_run=args.dry_run)
    summaries: dict[int, dict[str, Any]] = {}
    for seed in args.seeds:
        train = shards(args.train_annotations, args.train_images, out / "shards" / f"train-seed{seed}",
                       prefix="train", shots=args.shots, seed=seed, dry_run=args.dry_run)
        run_dir = out / f"seed{seed}"
        summary = run_dir / SUMMARY_FILE
        if not summary.is_file():
            command = fit_command(args.config, run_dir, train=train, val=val, seed=seed, general=args.general,
                                  general_weight=args.general_weight, general_val=args.general_val, extra=extra)
            print(" ".join(command[1:]), flush=True)
            if args.dry_run:
                continue
            if subprocess.run(command, check=False).returncode != 0:
                raise SystemExit(f"kshot: the fit of seed {seed} failed (its output is above; logs in {run_dir})")
            if not summary.is_file():
                raise SystemExit(f"kshot: {summary} was not written: the configs need the callback "
                                 "sam3_train.finetune.ZeroShotBaseline (configs/sam3_finetune.yaml has it)")
        summaries[seed] = json.loads(summary.read_text())
    if args.dry_run:
        return 0
    result = aggregate(summaries, metric=args.metric)
    (out / "kshot_summary.json").write_text(json.dumps({"shots": args.shots, "seeds": args.seeds, "sets": result},
                                                       indent=1))
    print(table(result, shots=args.shots, seeds=args.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
