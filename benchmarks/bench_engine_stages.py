"""The data engine's stages timed on their own, against the straightforward variants, in this run.

    python benchmarks/bench_engine_stages.py iou            # the verifiers' and flip matching's mask IoU
    python benchmarks/bench_engine_stages.py write-stage --checkpoint runs/shapes_tiny/checkpoints/last.ckpt
                                                            # the write stage from real proposals: lazy vs
                                                            # eager decoding, the proposals file's bytes

The demonstration of the rounds (do they close the gap?) is benchmarks/bench_engine.py; the pool at
100,000 images is benchmarks/bench_engine_pool.py. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench_engine import CONFIGS, REPO  # the demonstration's engine configs; puts the repository on sys.path


def iou_timings() -> dict:
    """Mask IoU as the engine computes it (``metrics.iou``) against the straightforward variants, timed in
    this run, one thread: pairwise counts in a float32 matmul vs float64 (flip matching, audit, cgF1;
    the same bits), row-wise pixel sums in int32 vs torch's default int64 (the verifiers)."""
    import torch

    from sam3_train.metrics.iou import mask_iou, rowwise_mask_iou

    def best_ms(fn, *args, repeat: int = 7) -> float:
        fn(*args)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - start)
        return 1e3 * min(times)

    def pairwise_float64(a, b):
        fa, fb = a.flatten(1).double(), b.flatten(1).double()
        inter = fa @ fb.T
        union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
        return torch.where(inter > 0, inter / union.clamp_min(1), torch.zeros_like(inter))

    def rowwise_int64(a, b):
        inter, union = (a & b).flatten(1).sum(1).float(), (a | b).flatten(1).sum(1).float()
        return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1024, 1024, generator=gen)
    gflops = 2 * 1024**3 / best_ms(torch.mm, x, x) / 1e6
    rows = []
    for n, height, width in [(16, 224, 224), (100, 224, 224), (20, 480, 640)]:
        a = torch.rand(n, height, width, generator=gen) > 0.5
        b = torch.rand(n, height, width, generator=gen) > 0.7
        assert torch.equal(mask_iou(a, b), pairwise_float64(a, b))
        pair32, pair64 = best_ms(mask_iou, a, b), best_ms(pairwise_float64, a, b)
        row32, row64 = best_ms(rowwise_mask_iou, a, b), best_ms(rowwise_int64, a, b)
        rows.append({"masks": n, "size": [height, width], "pairwise_ms": round(pair32, 2),
                     "pairwise_float64_ratio": round(pair64 / pair32, 2), "rowwise_ms": round(row32, 2),
                     "rowwise_int64_ratio": round(row64 / row32, 2)})
    torch.set_num_threads(threads)
    return {"matmul_fp32_gflops": round(gflops, 1), "rows": rows}


def write_stage_timings(*, checkpoint: Path, work: Path, images: int, repeats: int) -> dict:
    """The write stage (verify, mine, write) of one proposer, timed in this run on one thread: reading
    every mask stack of every candidate when its record is read (the stage as it was) against decoding
    on demand behind the score gate (pseudo_labels.score_gate), alternated ``repeats`` times on the
    same proposals; and the proposals' bytes per image, gzip'd members against the plain JSON lines
    the propose step wrote before (``json.dumps(record, sort_keys=True)`` per line: the same records).

    The proposals: ``checkpoint`` on the first ``images`` images of the shapes train split, each asked
    its own phrases, with configs/engine/shapes.yaml's propose settings and chain (as the demonstration)."""
    import shutil
    from contextlib import ExitStack
    from unittest import mock

    import lightning as L
    import torch

    from sam3_train.callbacks import matmul_gflops
    from sam3_train.data import ensure_shapes_shards
    from sam3_train.data.shards import ShardSink
    from sam3_train.engine import pseudo_labels
    from sam3_train.engine.candidates import record_candidates
    from sam3_train.engine.proposal_files import ProposalIndex
    from sam3_train.engine.proposals import ProposalWriter, ProposeData, ProposeModule
    from sam3_train.engine.settings import load_config
    from sam3_train.engine.sources import read_samples

    torch.set_num_threads(1)
    cfg, settings = load_config([REPO / c for c in CONFIGS])
    shapes = REPO / cfg["data"]["shapes_root"]
    ensure_shapes_shards(shapes)
    source = sorted(str(p) for p in (shapes / "shards" / "train").glob("*.tar"))
    proposed = work / "proposed"
    if not (proposed / "proposals-rank000" / "summary.json").is_file():  # proposing is the slow part: kept
        shutil.rmtree(work, ignore_errors=True)
        with ShardSink(out_dir=work / "pool", prefix="pool", max_count=10_000) as sink:
            for n, (key, data, ext, meta) in enumerate(read_samples(source, strict=False)):
                if n == images:
                    break
                sink.write(key, data, ext, meta)
        module = ProposeModule(checkpoint=str(checkpoint), flip_tta=settings.flip_tta, min_score=settings.min_score,
                               max_detections=settings.max_detections, stability_offset=settings.stability_offset)
        data = ProposeData(pool=sink.pattern, image_size=module.image_size, batch_size=settings.batch_size,
                           num_workers=0)
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_checkpointing=False, callbacks=[ProposalWriter(round_dir=proposed)])
        trainer.predict(module, datamodule=data, return_predictions=False)
    index = ProposalIndex(proposed / "proposals-rank000" / "proposals.jsonl.gz")
    records = [index.get(key) for key in index]
    plain = sum(len(json.dumps(r, sort_keys=True)) + 1 for r in records)
    scores = [s for r in records for pair in r["pairs"] for s in pair["scores"]]
    chain, miner = settings.chain(), settings.negatives

    def eager(record, **kwargs):
        pairs = record_candidates(record, **kwargs)
        for c, _ in pairs:
            c.decode()
        return pairs

    def write(mode: str) -> tuple[float, dict, dict]:
        round_dir = work / mode
        shutil.rmtree(round_dir, ignore_errors=True)
        shutil.copytree(proposed / "proposals-rank000", round_dir / "proposals-rank000")
        with ExitStack() as stack:
            if mode == "eager":
                stack.enter_context(mock.patch.object(pseudo_labels, "record_candidates", eager))
                stack.enter_context(mock.patch.object(pseudo_labels, "score_gate", lambda chain: None))
            start = time.perf_counter()
            summary = pseudo_labels.write_rank(round_dir=round_dir, proposer=0, chain=chain, miner=miner,
                                               progress=False)
            seconds = time.perf_counter() - start
        return seconds, summary, {p.name: p.read_bytes() for p in (round_dir / "shards-rank000").iterdir()}

    gflops = matmul_gflops()
    times: dict[str, list[float]] = {"eager": [], "lazy": []}
    outputs = {}
    for _ in range(repeats):
        for mode in times:
            seconds, summary, files = write(mode)
            times[mode].append(seconds / len(records))
            outputs.setdefault(mode, (summary, files))
    if outputs["eager"] != outputs["lazy"]:
        raise AssertionError("the lazy write stage wrote other shards than the eager one")
    best = {mode: min(t) for mode, t in times.items()}
    counts = outputs["lazy"][0]["counts"]
    return {
        "checkpoint": str(checkpoint), "images": len(records), "repeats": repeats,
        "matmul_fp32_gflops": round(gflops, 1),
        "candidates_per_image": round(len(scores) / len(records), 1),
        "score_rejected_share": round(counts["rejected"].get("score", 0) / max(len(scores), 1), 4),
        "write_ms_per_image": {mode: round(1e3 * t, 1) for mode, t in best.items()},
        "write_speedup": round(best["eager"] / best["lazy"], 2),
        "proposal_bytes_per_image": {"jsonl": round(plain / len(records)),
                                     "jsonl.gz": round(index.path.stat().st_size / len(records))},
        "proposal_bytes_ratio": round(plain / index.path.stat().st_size, 2),
        "identical_shards": True,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["iou", "write-stage"])
    parser.add_argument("--checkpoint", help="write-stage: the proposing model (default: runs/shapes_tiny/"
                        "checkpoints/last.ckpt, from `sam3-train fit --config configs/shapes_tiny.yaml`)")
    parser.add_argument("--images", type=int, default=24, help="write-stage: pool images (default 24)")
    parser.add_argument("--repeats", type=int, default=3, help="write-stage: timed passes per mode (default 3)")
    parser.add_argument("--work-dir", help="write-stage: default runs/bench_engine_write")
    parser.add_argument("--out", help="write-stage: default benchmarks/results/engine_write.json")
    args = parser.parse_args()
    if args.command == "iou":
        timings = iou_timings()
        print(f"mask IoU, one thread (fp32 matmul {timings['matmul_fp32_gflops']} GFLOP/s); ratio = baseline / ours")
        for row in timings["rows"]:
            print(f"  {row['masks']:>3} masks {row['size'][0]}x{row['size'][1]}: pairwise {row['pairwise_ms']} ms "
                  f"(float64 counts x{row['pairwise_float64_ratio']}), row-wise {row['rowwise_ms']} ms "
                  f"(int64 sums x{row['rowwise_int64_ratio']})")
        return
    if args.command == "write-stage":
        checkpoint = Path(args.checkpoint or REPO / "runs" / "shapes_tiny" / "checkpoints" / "last.ckpt")
        work = Path(args.work_dir or REPO / "runs" / "bench_engine_write")
        result = write_stage_timings(checkpoint=checkpoint, work=work, images=args.images, repeats=args.repeats)
        ms = result["write_ms_per_image"]
        rejected = 100 * result["score_rejected_share"]
        print(f"write stage, one thread (fp32 matmul {result['matmul_fp32_gflops']} GFLOP/s), {result['images']} "
              f"images, {result['candidates_per_image']} candidates per image, {rejected:.0f}% rejected by the "
              f"score check: {ms['eager']} ms per image decoding every mask on read, {ms['lazy']} ms decoding on "
              f"demand (x{result['write_speedup']}; identical shards)")
        size = result["proposal_bytes_per_image"]
        print(f"proposals: {size['jsonl']} bytes per image as JSON lines, {size['jsonl.gz']} as gzip members "
              f"(x{result['proposal_bytes_ratio']} smaller)")
        out = Path(args.out or REPO / "benchmarks" / "results" / "engine_write.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"saved {out}")


if __name__ == "__main__":
    main()
