"""``sam3-train predict-onnx``: ``sam3-train predict``'s files from the exported graphs, without torch's model.

    sam3-train predict-onnx --model exported/x --shards 'datasets/shapes/shards/test/shapes-{000000..000007}.tar' \\
        --output_dir runs/x/predictions-onnx --coco_results --overlays

Why a sibling command and not ``predict --backend onnx``: ``predict`` is LightningCLI's subcommand,
whose options are the Trainer's, the LightningModule's and the DataModule's; an onnxruntime run has
no module to build, no trainer, no checkpoint to restore, and one backend switch would have to bypass
all three. So this command reads shards with the same ``Sam3DataModule`` (its predict loader: the
eval transform, every phrase of an image, the export's tokenizer files), runs
:class:`~sam3_train.deploy.runtime.OnnxDetector`, post-processes with ``sam3-train predict``'s
``postprocess`` and writes through the same ``PredictionWriter`` (JSON lines, COCO results,
overlays), in one process.
"""

from __future__ import annotations

import argparse
import time

from sam3_train.callbacks import PredictionWriter
from sam3_train.data.datamodule import Sam3DataModule
from sam3_train.deploy.runtime import OnnxDetector


def predict_shards(model: str, shards: str, writer: PredictionWriter, *, batch_size: int = 8,
                   max_phrases: int | None = None, square_resize: bool = True, num_workers: int = 0,
                   limit_batches: int | None = None, threads: int | None = None,
                   **thresholds: float | int) -> int:
    """Predict every image of ``shards`` (a brace pattern) with the export in ``model``; returns the
    number of images. ``thresholds`` override deploy.json's (``score_threshold``, ``max_detections``)."""
    detector = OnnxDetector(model, threads=threads)
    data = Sam3DataModule(predict_shards=shards, image_size=detector.image_size, eval_batch_size=batch_size,
                          eval_max_phrases=max_phrases, square_resize=square_resize, num_workers=num_workers,
                          tokenizer_path=model)
    data.setup("predict")
    images = 0
    writer.open()
    try:
        for index, batch in enumerate(data.predict_dataloader()):
            if limit_batches is not None and index >= limit_batches:
                break
            writer.write(batch, detector.postprocess(detector(batch), batch, **thresholds), batch_idx=index)
            images += batch.num_images
    finally:
        writer.close()
    return images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sam3-train predict-onnx", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a folder written by sam3-train export")
    parser.add_argument("--shards", required=True, help="brace pattern of shards (several joined with '::')")
    parser.add_argument("--output_dir", default="predictions")
    parser.add_argument("--overlays", action="store_true", help="a PNG per (image, phrase)")
    parser.add_argument("--max_overlays", type=int, default=200)
    parser.add_argument("--coco_results", action="store_true", help="also predictions.coco.json")
    parser.add_argument("--categories", default=None, help="a COCO annotations JSON naming the category ids")
    parser.add_argument("--batch_size", type=int, default=8, help="images per batch")
    parser.add_argument("--max_phrases", type=int, default=None,
                        help="phrases per image (as data.eval_max_phrases; default: all)")
    parser.add_argument("--keep_aspect", action="store_true",
                        help="resize the longest side (data.square_resize: false) instead of SAM 3's square resize")
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--limit_batches", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--score_threshold", type=float, default=None, help="default: deploy.json's")
    parser.add_argument("--max_detections", type=int, default=None, help="default: deploy.json's")
    args = parser.parse_args(argv)
    writer = PredictionWriter(output_dir=args.output_dir, overlays=args.overlays, max_overlays=args.max_overlays,
                              coco_results=args.coco_results, categories=args.categories)
    overrides = {k: v for k in ("score_threshold", "max_detections") if (v := getattr(args, k)) is not None}
    start = time.perf_counter()
    images = predict_shards(args.model, args.shards, writer, batch_size=args.batch_size, max_phrases=args.max_phrases,
                            square_resize=not args.keep_aspect, num_workers=args.num_workers,
                            limit_batches=args.limit_batches, threads=args.threads, **overrides)
    print(f"predict-onnx: {images} images in {time.perf_counter() - start:.1f} s")
    return 0
