"""The data engine's front: pseudo-labelling rounds, their status, and human review.

    C="--config configs/shapes_tiny.yaml --config configs/engine/shapes.yaml"
    python tools/data_engine.py run $C
    python tools/data_engine.py run $C --stop-after write          # then review
    python tools/data_engine.py status $C
    python tools/data_engine.py export-review $C --round 1 --out review/r1
    python tools/data_engine.py import-review $C --round 1 --review review/r1/review.json
    python tools/data_engine.py export-label-studio $C --round 1 --out review/r1   # review in Label Studio
    python tools/data_engine.py import-label-studio $C --round 1 --review review/r1  # (docs/label_studio.md)

An engine config is a sam3-train config plus an ``engine:`` section (the DataEngine settings),
usually the base config and an overlay holding that section; the files are read in order by the
sam3-train CLI's parser (a later file replaces an earlier one's values, lists whole). Overrides
follow the options as ``key=value`` (``engine.<name>`` for a DataEngine setting, values parsed by
type): ``run $C trainer.max_steps=100 engine.rounds=1``. Under DDP every rank runs this same command
(``trainer.devices=2`` launches the second process itself; torchrun and SLURM start them). Killed at
any point, the same command finishes the round (docs/data_engine.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

try:
    import sam3_train  # noqa: F401
except ImportError:  # a checkout without installing; appended, not first: datasets/ must not shadow HF datasets
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from sam3_train.dist import launch  # noqa: E402
from sam3_train.engine.manifest import (  # noqa: E402
    MANIFEST,
    METRICS,
    MODEL,
    PROPOSED,
    VERIFIED,
    WRITTEN,
    round_dir_name,
)
from sam3_train.engine.rounds import STAGES, Engine  # noqa: E402
from sam3_train.engine.settings import load_config  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_: str, parents: list[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, parents=list(parents))
        p.add_argument("--config", required=True, action="append",
                       help="a sam3-train config; repeat it: later files override earlier ones, and one of them "
                            "holds the engine: section (configs/shapes_tiny.yaml, then configs/engine/shapes.yaml)")
        p.add_argument("overrides", nargs="*", help="key=value config overrides (engine.<name> for engine settings)")
        return p

    run = command("run", "run rounds until engine.rounds are finished")
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
    server = argparse.ArgumentParser(add_help=False)  # the Label Studio server both commands talk to
    server.add_argument("--round", type=int, required=True)
    server.add_argument("--url", default=os.environ.get("LABEL_STUDIO_URL", "http://localhost:8080"),
                        help="the Label Studio server (default: $LABEL_STUDIO_URL or http://localhost:8080)")
    server.add_argument("--api-key", default=os.environ.get("LABEL_STUDIO_API_KEY"),
                        help="a user's access token (default: $LABEL_STUDIO_API_KEY)")
    ls_export = command("export-label-studio", "export-review, then a Label Studio project with one task per pair",
                        parents=[server])
    ls_export.add_argument("--out", required=True, help="the review folder (below the server's document root)")
    ls_export.add_argument("--document-root", default=os.environ.get("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"),
                           help="the server's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (default: that variable)")
    ls_export.add_argument("--title", help="the project's title (default: sam3-train review <out folder>)")
    ls_export.add_argument("--all", action="store_true", help="every pair, not only flagged ones")
    ls_export.add_argument("--min-score", type=float, default=0.1, help="hide rejected instances below this score")
    ls_import = command("import-label-studio", "import the reviewers' decisions of a Label Studio project",
                        parents=[server])
    ls_import.add_argument("--review", required=True, help="the review folder export-label-studio wrote")
    return parser


def _status(settings) -> None:
    work = Path(settings.work_dir)
    print(f"work dir {work}")
    for index in range(settings.rounds + 1):
        d = work / round_dir_name(index)
        stages = [name for name, marker in (("propose", PROPOSED), ("verifiers", VERIFIED), ("write", WRITTEN),
                                            ("fit", MODEL),
                                            ("eval", METRICS), ("done", MANIFEST)) if (d / marker).is_file()]
        line = f"  {d.name}: {' '.join(stages) or 'not started'}"
        if (d / METRICS).is_file():
            test = json.loads((d / METRICS).read_text())["test"]
            line += "  " + " ".join(f"{k}={v:.2f}" for k, v in test.items() if "cgF1" in k)
        print(line)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        cfg, settings = load_config(args.config, args.overrides)
    except (argparse.ArgumentError, FileNotFoundError, ValueError) as exn:
        sys.exit(f"data_engine.py {args.command}: {exn}")
    if args.command == "run":
        trainer = cfg["trainer"]
        launch(accelerator=trainer["accelerator"], devices=trainer["devices"], num_nodes=trainer["num_nodes"])
        Engine(cfg=cfg, settings=settings, configs=args.config, progress=not args.quiet).run(stop_after=args.stop_after)
    elif args.command == "status":
        _status(settings)
    elif args.command == "export-review":
        from sam3_train.engine.review import export_round

        counts = export_round(round_dir=Path(settings.work_dir) / round_dir_name(args.round), settings=settings,
                              out_dir=args.out, only_flagged=not args.all, min_score=args.min_score)
        print(f"review set: {counts['pairs']} pairs, {counts['annotations']} annotations, {counts['images']} "
              f"images in {args.out} (edit {args.out}/review.json, then import-review)")
    elif args.command == "import-review":
        from sam3_train.engine.review import import_round

        result = import_round(round_dir=Path(settings.work_dir) / round_dir_name(args.round), review=args.review,
                              max_count=settings.max_count)
        _imported(result)
    elif args.command in ("export-label-studio", "import-label-studio"):
        _label_studio(args, settings)


def _imported(result: dict) -> None:
    print(f"review imported: {len(result['changed'])} pairs changed"
          + (f", shards in {result['shards']}" if result["shards"] else " (nothing rewritten)"))


def _label_studio(args: argparse.Namespace, settings) -> None:
    """export-label-studio / import-label-studio (sam3_train/engine/label_studio/client.py)."""
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    from sam3_train.engine.label_studio.client import connect, export_project, import_project
    from sam3_train.engine.review import export_round, import_round

    round_dir = Path(settings.work_dir) / round_dir_name(args.round)
    try:
        client = connect(url=args.url, api_key=args.api_key)
        if args.command == "export-label-studio":
            if not args.document_root:
                raise ValueError("pass --document-root (or set LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT): the folder "
                                 "the server serves local files from, above --out")
            counts = export_round(round_dir=round_dir, settings=settings, out_dir=args.out,
                                  only_flagged=not args.all, min_score=args.min_score)
            record = export_project(client=client, review_dir=args.out, document_root=args.document_root,
                                    title=args.title)
            print(f"review set: {counts['pairs']} pairs, {counts['annotations']} annotations in {args.out}; "
                  f"Label Studio project {record['project']}: {args.url.rstrip('/')}/projects/{record['project']}/data "
                  "(review there, then import-label-studio)")
        else:
            path, counts = import_project(client=client, review_dir=args.review)
            print(f"Label Studio: {counts['reviewed']} of {counts['tasks']} tasks reviewed, {counts['labels']} labels "
                  f"({counts['added']} added, {counts['edited']} redrawn), {counts['rejected']} rejected -> {path}")
            _imported(import_round(round_dir=round_dir, review=path, max_count=settings.max_count))
    except (FileNotFoundError, ValueError, RuntimeError) as exn:
        sys.exit(f"data_engine.py {args.command}: {exn}")
    except httpx.TransportError as exn:
        sys.exit(f"data_engine.py {args.command}: cannot reach Label Studio at {args.url} ({exn}); start it "
                 "(docs/label_studio.md) or pass --url")
    except ApiError as exn:
        sys.exit(f"data_engine.py {args.command}: Label Studio at {args.url} answered {exn.status_code}: {exn.body}")


if __name__ == "__main__":
    main()
