"""Convert datasets into sam3-train shards (format: docs/data_format.md).

    python tools/make_shards.py coco   --annotations instances_val2017.json --images val2017/ --out DIR [--negatives 20]
    python tools/make_shards.py coco   --annotations train.json --images train/ --shots 10 --seed 0 --out DIR
    python tools/make_shards.py saco   --annotations saco_gold_fg.json --images images/ --out DIR
    python tools/make_shards.py saco   --annotations gold_a.json gold_b.json gold_c.json --images images/ --out DIR
    python tools/make_shards.py images --images photos/ [--vocabulary phrases.txt] --out DIR
    python tools/make_shards.py shapes [--root datasets/shapes] [--train 2000 --val 200 --test 200]

Common options: --max-count (samples per shard), --max-size (bytes per shard), --prefix.
Prints the brace pattern of the written shards (what the DataModule's ``*_shards`` options take).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sam3_train.data.convert_coco import convert_coco  # noqa: E402
from sam3_train.data.convert_images import convert_images  # noqa: E402
from sam3_train.data.convert_saco import convert_saco  # noqa: E402
from sam3_train.data.shapes import DEFAULT_SPLITS, ensure_shapes_shards  # noqa: E402
from sam3_train.data.shards import DEFAULT_MAX_COUNT, DEFAULT_MAX_SIZE  # noqa: E402


def _common(p: argparse.ArgumentParser, prefix: str) -> None:
    p.add_argument("--out", required=True, help="output folder of the shards")
    p.add_argument("--prefix", default=prefix, help="shard file prefix (no dots)")
    p.add_argument("--max-count", type=int, default=DEFAULT_MAX_COUNT, help="samples per shard")
    p.add_argument("--max-size", type=int, default=DEFAULT_MAX_SIZE, help="bytes per shard")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="source", required=True)
    coco = sub.add_parser("coco", help="COCO instances JSON + image folder")
    coco.add_argument("--annotations", required=True)
    coco.add_argument("--images", required=True)
    coco.add_argument("--negatives", type=int, default=None, help="absent categories per image (default: all)")
    coco.add_argument("--seed", type=int, default=0, help="seeds the negatives and the --shots subset")
    coco.add_argument("--shots", type=int, default=None,
                      help="write only a K-shot subset: K images per category (GLIP's ODinW protocol), absent "
                           "categories as negatives; its COCO JSON goes next to the shards")
    _common(coco, "coco")
    saco = sub.add_parser("saco", help="SA-Co style JSON ((image, phrase) pairs) + image folder")
    saco.add_argument("--annotations", required=True, nargs="+",
                      help="one SA-Co JSON, or SA-Co Gold's three annotators' files (a b c), scored best-of as Meta")
    saco.add_argument("--images", required=True)
    _common(saco, "saco")
    images = sub.add_parser("images", help="unlabelled image folder (data-engine pool)")
    images.add_argument("--images", required=True)
    images.add_argument("--vocabulary", default=None, help="phrase file, one per line")
    _common(images, "images")
    shapes = sub.add_parser("shapes", help="the built-in shapes dataset")
    shapes.add_argument("--root", default="datasets/shapes")
    for split, count in DEFAULT_SPLITS.items():
        shapes.add_argument(f"--{split}", type=int, default=count, help=f"{split} images")
    shapes.add_argument("--image-size", type=int, default=256)
    shapes.add_argument("--max-count", type=int, default=250, help="at most this many images per shard (8 shards per split at least)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.source == "shapes":
        splits = {s: getattr(args, s) for s in DEFAULT_SPLITS}
        patterns = ensure_shapes_shards(args.root, splits=splits, image_size=args.image_size,
                                        max_count=args.max_count, progress=True)
        for split, pattern in patterns.items():
            print(f"{split}: {pattern}")
        return 0
    shard_opts = dict(out=args.out, prefix=args.prefix, max_count=args.max_count, max_size=args.max_size,
                      progress=not args.quiet)
    if args.source == "coco":
        result = convert_coco(annotations=args.annotations, images=args.images, negatives=args.negatives,
                              seed=args.seed, shots=args.shots, **shard_opts)
    elif args.source == "saco":
        result = convert_saco(annotations=args.annotations, images=args.images, **shard_opts)
    else:
        result = convert_images(images=args.images, vocabulary=args.vocabulary, **shard_opts)
    print(f"wrote {result['written']} samples, skipped {result['skipped']}")
    if result.get("subset_json"):
        print(f"subset COCO JSON: {result['subset_json']}")
    print(result["pattern"] or "no shards written")
    return 0 if result["written"] else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except FileNotFoundError as exn:  # a wrong path: one line, no traceback
        sys.exit(f"make_shards: {exn}")
