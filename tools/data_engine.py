"""The data engine's front: pseudo-labelling rounds, their status, and human review.

    python tools/data_engine.py run --config configs/engine_shapes.yaml
    python tools/data_engine.py run --config configs/engine_shapes.yaml --stop-after write   # then review
    python tools/data_engine.py status --config configs/engine_shapes.yaml
    python tools/data_engine.py export-review --config configs/engine_shapes.yaml --round 1 --out review/r1
    python tools/data_engine.py import-review --config configs/engine_shapes.yaml --round 1 --review review/r1/review.json

Overrides follow the options as ``key=value`` (OmegaConf dot-list; ``engine.<name>`` sets a
DataEngine setting): ``run --config c.yaml trainer.max_steps=100 engine.rounds=1``. Under DDP every
rank runs this same command (``trainer.devices=2`` launches the second process itself; torchrun and
SLURM start them). Killed at any point, the same command finishes the round (docs/data_engine.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    import sam3_train  # noqa: F401
except ImportError:  # a checkout without installing; appended, not first: datasets/ must not shadow HF datasets
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from sam3_train.engine import dist  # noqa: E402
from sam3_train.engine.config import load_config  # noqa: E402
from sam3_train.engine.rounds import METRICS, PROPOSED, STAGES, WRITTEN, Engine, round_dir_name  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", required=True, help="engine config (a sam3-train config with a DataEngine entry)")
        p.add_argument("overrides", nargs="*", help="key=value config overrides (engine.<name> for engine settings)")
        return p

    run = command("run", "run rounds until settings.rounds are finished")
    run.add_argument("--stop-after", choices=STAGES, help="stop after this stage of the first unfinished round")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    command("status", "print every round's stages and metrics")
    export = command("export-review", "export a round's flagged pairs as COCO JSON + overlays")
    export.add_argument("--round", type=int, required=True)
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--all", action="store_true", help="every pair, not only flagged ones")
    export.add_argument("--min-score", type=float, default=0.1, help="hide rejected instances below this score")
    imp = command("import-review", "import a corrected review JSON into a round's shards")
    imp.add_argument("--round", type=int, required=True)
    imp.add_argument("--review", required=True, help="the edited review.json")
    return parser


def _status(settings) -> None:
    work = Path(settings.work_dir)
    print(f"work dir {work}")
    for index in range(settings.rounds + 1):
        d = work / round_dir_name(index)
        stages = [name for name, marker in (("propose", PROPOSED), ("write", WRITTEN), ("fit", "model.ckpt"),
                                            ("eval", METRICS), ("done", "manifest.json")) if (d / marker).is_file()]
        line = f"  {d.name}: {' '.join(stages) or 'not started'}"
        if (d / METRICS).is_file():
            test = json.loads((d / METRICS).read_text())["test"]
            line += "  " + " ".join(f"{k}={v:.2f}" for k, v in test.items() if "cgF1" in k)
        print(line)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    cfg, settings = load_config(args.config, args.overrides)
    if args.command == "run":
        trainer = cfg.get("trainer", {})
        dist.launch(accelerator=trainer.get("accelerator", "auto"), devices=trainer.get("devices", "auto"),
                    num_nodes=trainer.get("num_nodes", 1))
        Engine(cfg=cfg, settings=settings, config_path=args.config, progress=not args.quiet).run(
            stop_after=args.stop_after)
    elif args.command == "status":
        _status(settings)
    elif args.command == "export-review":
        from sam3_train.engine.round_review import export_round

        counts = export_round(round_dir=Path(settings.work_dir) / round_dir_name(args.round), settings=settings,
                              out_dir=args.out, only_flagged=not args.all, min_score=args.min_score)
        print(f"review set: {counts['pairs']} pairs, {counts['annotations']} annotations, {counts['images']} "
              f"images in {args.out} (edit {args.out}/review.json, then import-review)")
    elif args.command == "import-review":
        from sam3_train.engine.round_review import import_round

        result = import_round(round_dir=Path(settings.work_dir) / round_dir_name(args.round), review=args.review,
                              max_count=settings.max_count)
        print(f"review imported: {len(result['changed'])} pairs changed"
              + (f", shards in {result['shards']}" if result["shards"] else " (nothing rewritten)"))


if __name__ == "__main__":
    main()
