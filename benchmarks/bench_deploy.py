"""ONNX export: its cost, onnxruntime's CPU latency against PyTorch eager, and parity.

    python benchmarks/bench_deploy.py                          # tiny + small, random weights
    python benchmarks/bench_deploy.py --presets sam3 --counts 1 --repeats 1 --precisions float32 --in-place   # 840 M, 1008 px
    python benchmarks/bench_deploy.py --presets --ckpt runs/shapes_tiny/checkpoints/last.ckpt \\
        --shards 'datasets/shapes/shards/test/shapes-{000000..000007}.tar'   # cgF1 of both paths

Per preset (random weights, seed 0) and graph precision (``--precisions``, float32 and float16):
export time and the process's peak memory after it; then, in the same process with the same thread
count for both (``--threads``), the median latency of one image with ``k`` phrases (``--counts``,
default 1, 2, 4, 8) for PyTorch eager (``Sam3Detector(batch)``, eval, no_grad) and for onnxruntime
(``OnnxDetector(batch)``: vision once, each phrase's text once, the detector per pair); "per extra
phrase" is the least-squares slope over k, "per image" the k = 1 time. The encode-once split shows
as the slope: an extra phrase costs one text encoding (cacheable) and one per-pair detector run,
never the vision encoder. Parity: the largest absolute output difference at the largest k. For
``sam3`` on a 16 GB machine export with ``--in-place --keep DIR`` (no copy of the 3.4 GB of weights)
and compare in a second process with ``--graphs DIR``: each fitted a 16 GiB memory limit
(docs/deploy.md); in one process the latency step after the export did not.

With ``--ckpt`` and ``--shards``: the checkpoint is exported and both paths predict every image of
the shards (every phrase), post-processed as validation does; cgF1 (masks) of each and how many
detections agree. Results print and go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_detector import timed  # noqa: E402  (one warm-up call, then the median; benchmarks/ is on sys.path)
from sam3_train.deploy.export import export_graphs, export_source
from sam3_train.deploy.runtime import OnnxDetector
from sam3_train.model import build_detector

PHRASES = ["red star", "blue circle", "small green square", "large yellow triangle",
           "purple heart", "orange cross", "star", "small star"]
COUNTS = (1, 2, 4, 8)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def slope(counts, seconds) -> float:
    return float(np.polyfit(np.asarray(counts, float), np.asarray(seconds, float), 1)[0])


def bench_preset(preset: str, *, threads: int, repeats: int, folder: Path, counts: tuple[int, ...] = COUNTS,
                 precisions: tuple[str, ...] = ("float32",), in_place: bool = False,
                 graphs: Path | None = None) -> dict:
    """``graphs``: a folder this function exported before for the same preset (same seed, so the same
    weights) with ``<preset>-<precision>`` inside: timed and compared without exporting again."""
    torch.manual_seed(0)
    detector = build_detector(preset).eval()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (detector.image_size, detector.image_size, 3), dtype=np.uint8)
    row: dict = {"preset": preset, "params_m": sum(p.numel() for p in detector.parameters()) / 1e6,
                 "image_size": detector.image_size, "torch_s": {}, "in_place": in_place}
    runtimes = {}
    for precision in precisions:
        if graphs is None:
            start = time.perf_counter()
            manifest = export_graphs(detector, folder / f"{preset}-{precision}", precision=precision, in_place=in_place)
            row[f"export_s_{precision}"] = time.perf_counter() - start
            row[f"export_graph_s_{precision}"] = manifest["export_seconds"]
            row[f"peak_rss_gib_after_export_{precision}"] = peak_rss_gib()
        runtimes[precision] = OnnxDetector((graphs or folder) / f"{preset}-{precision}", threads=threads)
        row[f"onnx_{precision}_s"] = {}
    runtime = runtimes[precisions[0]]
    for k in counts:
        batch = runtime.batch([image], [PHRASES[:k]])
        with torch.no_grad():
            row["torch_s"][k] = timed(lambda: detector(batch), repeats)
        for precision, session in runtimes.items():
            row[f"onnx_{precision}_s"][k] = timed(lambda: session(batch), repeats)
    with torch.no_grad():
        theirs = detector(batch)
    for precision, session in runtimes.items():
        ours = session(batch)
        row[f"max_abs_diff_{precision}"] = {key: float((ours[key] - theirs[key]).abs().max()) for key in ours}
    for side in ("torch", *(f"onnx_{p}" for p in precisions)):
        times = [row[f"{side}_s"][k] for k in counts]
        row[f"{side}_per_image_s"] = times[0]
        row[f"{side}_per_extra_phrase_s"] = slope(counts, times) if len(counts) > 1 else float("nan")
    row["peak_rss_gib"] = peak_rss_gib()
    return row


def detection_differences(a: dict, b: dict) -> tuple[float, float, bool]:
    """The largest score and box differences between two paths' detections of one pair (same count),
    each detection of ``a`` compared with its partner in ``b`` under a one-to-one assignment (scipy's
    Hungarian solver on box plus score distance), and whether that partner sits at another rank.
    Detections are sorted by score: two scores a few 1e-7 apart may swap ranks between the paths, and
    comparing by rank would then set one detection's box against its neighbour's."""
    from scipy.optimize import linear_sum_assignment

    cost = (a["boxes"][:, None] - b["boxes"][None]).abs().amax(-1) + (a["scores"][:, None] - b["scores"][None]).abs()
    rows, cols = linear_sum_assignment(cost.double().numpy())
    rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
    score_diff = float((a["scores"][rows] - b["scores"][cols]).abs().max())
    box_diff = float((a["boxes"][rows] - b["boxes"][cols]).abs().max())
    return score_diff, box_diff, bool((rows != cols).any())


def cgf1_parity(ckpt: str, shards: str, *, threads: int, folder: Path, batch_size: int = 8) -> dict:
    """Both paths over every image and phrase of ``shards``, scored as validation scores (Sam3LitModule._evaluate)."""
    from sam3_train.data import Sam3DataModule
    from sam3_train.lit import cgf1_targets, eval_targets
    from sam3_train.loading import load_detector
    from sam3_train.metrics import CGF1
    from sam3_train.model import postprocess

    export_source(ckpt, folder / "ckpt")
    runtime = OnnxDetector(folder / "ckpt", threads=threads)
    detector = load_detector(ckpt).eval()
    settings = {k: runtime.thresholds[k] for k in ("score_threshold", "max_detections")}
    data = Sam3DataModule(predict_shards=shards, image_size=runtime.image_size, eval_batch_size=batch_size,
                          num_workers=0, tokenizer_path=str(folder / "ckpt"))
    data.setup("predict")
    metrics = {"torch": CGF1(iou_types=("segm",)), "onnx": CGF1(iou_types=("segm",))}
    counts = {"pairs": 0, "torch_detections": 0, "onnx_detections": 0, "same_count_pairs": 0,
              "max_score_diff": 0.0, "max_box_diff_px": 0.0, "reordered_pairs": 0}
    for batch in data.predict_dataloader():
        with torch.no_grad():
            outputs = {"torch": detector(batch), "onnx": runtime(batch)}
        targets = cgf1_targets(batch, eval_targets(batch))
        preds = {}
        for side, out in outputs.items():
            preds[side] = postprocess(out, batch, keep_above=0.5, **settings)
            metrics[side].update(preds[side], targets)
        for a, b in zip(preds["torch"], preds["onnx"]):
            counts["pairs"] += 1
            counts["torch_detections"] += len(a["scores"])
            counts["onnx_detections"] += len(b["scores"])
            if len(a["scores"]) == len(b["scores"]):
                counts["same_count_pairs"] += 1
                if len(a["scores"]):
                    score_diff, box_diff, reordered = detection_differences(a, b)
                    counts["max_score_diff"] = max(counts["max_score_diff"], score_diff)
                    counts["max_box_diff_px"] = max(counts["max_box_diff_px"], box_diff)
                    counts["reordered_pairs"] += int(reordered)
    scores = {side: {k: float(v) for k, v in m.compute().items() if k in ("cgF1", "pmF1", "IL_MCC")}
              for side, m in metrics.items()}
    return {"ckpt": ckpt, "shards": shards, **counts, "metrics": scores}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="*", default=["tiny", "small"])
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--counts", type=int, nargs="+", default=list(COUNTS), help="phrases per image to time")
    parser.add_argument("--precisions", nargs="+", default=["float32", "float16"], choices=["float32", "float16"])
    parser.add_argument("--in-place", action="store_true",
                        help="export the benchmark's detector itself, not a copy (float32 only): one copy of the "
                             "weights less at the export's peak; PyTorch then runs with eager attention")
    parser.add_argument("--graphs", type=Path, default=None,
                        help="time and compare graphs exported before into this folder (<preset>-<precision> inside) "
                             "instead of exporting: export and parity in two processes, each with less at its peak")
    parser.add_argument("--keep", type=Path, default=None, help="export into this folder and keep it (default: a temporary one)")
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--shards", default=None)
    parser.add_argument("--out", default="benchmarks/results/deploy.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from sam3_train.callbacks import matmul_gflops

    results: dict = {"threads": args.threads, "matmul_gflops": matmul_gflops(), "torch": torch.__version__,
                     "presets": [], "parity": None}
    print(f"1024x1024 fp32 matmul: {results['matmul_gflops']:.0f} GFLOP/s; {args.threads} thread(s)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
        for preset in args.presets:
            row = bench_preset(preset, threads=args.threads, repeats=args.repeats, folder=args.keep or Path(tmp),
                               counts=tuple(args.counts), precisions=tuple(args.precisions), in_place=args.in_place,
                               graphs=args.graphs)
            results["presets"].append(row)
            print(json.dumps(row, indent=1), flush=True)
        if args.ckpt and args.shards:
            results["parity"] = cgf1_parity(args.ckpt, args.shards, threads=args.threads, folder=Path(tmp))
            print(json.dumps(results["parity"], indent=1), flush=True)
    print(f"\n{'preset':<7}{'path':>16}{'1 phrase':>10}{'8 phrases':>11}{'+phrase':>9}")
    for row in results["presets"]:
        for side in ("torch", *(f"onnx_{p}" for p in args.precisions)):
            times = row[f"{side}_s"]
            print(f"{row['preset']:<7}{side:>16}{times[min(times)] * 1e3:>8.1f}ms{times[max(times)] * 1e3:>9.1f}ms"
                  f"{row[f'{side}_per_extra_phrase_s'] * 1e3:>7.1f}ms")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
