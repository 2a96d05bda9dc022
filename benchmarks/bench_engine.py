"""The data engine's measured demonstration: how much of the gap to full supervision pseudo-labels close.

    python benchmarks/bench_engine.py                 # the demonstration at configs/shapes_tiny.yaml's budget
    python benchmarks/bench_engine.py --quick         # a handful of steps on a small shapes set: checks it runs
    python benchmarks/bench_engine.py trainer.devices=2 trainer.strategy=ddp_find_unused_parameters_true

    python benchmarks/bench_engine.py --iou           # the verifiers' and flip matching's mask IoU, timed
    python benchmarks/bench_engine.py --write-stage   # the write stage from real proposals: lazy vs eager
                                                      # decoding, proposals file bytes (needs --checkpoint)

The engine config is configs/shapes_tiny.yaml with the overlay configs/engine/shapes.yaml
(``--config`` repeated replaces both).

On the built-in shapes dataset: round 0 trains on 10% of the train split with its labels, the other
90% (labels stripped) is the unlabelled pool, two pseudo-labelling rounds follow; a fourth model
trains on 100% of the labels. Every model gets the same budget (the config's ``trainer.max_steps``,
each from the same initialisation: ``fit_from: base``) and is evaluated on the held-out test split.
Both runs go through the real front (``tools/data_engine.py run``, in subprocesses), so the benchmark
is resumable like the engine: run the same command again after an interruption.

Reports held-out cgF1 (and box cgF1, IL_MCC, pmF1) for round 0, 1, 2 and full supervision, the share
of the round-0 gap closed by the last round, per round what the verifiers kept and rejected (the
first thing to read when the gap does not close), and how good the written pseudo-labels are against
the pool's withheld labels (``sam3_train.engine.audit``: instance precision and recall, exhaustive and
negative pairs right). Printed and saved as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TOOL = REPO / "tools" / "data_engine.py"
METRICS = ("test/cgF1", "test/box_cgF1", "test/IL_MCC", "test/pmF1")
CONFIGS = ["configs/shapes_tiny.yaml", "configs/engine/shapes.yaml"]
# A CPU smoke scale: 40 / 8 / 8 images at 112 px, three steps per model.
QUICK = ["data.shapes_splits={train: 40, val: 8, test: 8}", "data.image_size=112", "trainer.max_steps=3",
         "data.steps_per_epoch=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
         "trainer.log_every_n_steps=1", "data.batch_size=2", "data.eval_batch_size=4", "data.num_workers=0",
         "data.max_phrases_per_image=3", "engine.split_shards=4", "engine.num_workers=0", "engine.max_detections=5"]


def run_engine(configs: list[str], work_dir: Path, overrides: list[str]) -> None:
    options = [a for c in configs for a in ("--config", c)]
    command = [sys.executable, str(TOOL), "run", *options, f"engine.work_dir={work_dir}", *overrides]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO)


def manifest(round_dir: Path) -> dict:
    path = round_dir / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the run did not finish")
    return json.loads(path.read_text())


def verifier_report(counts: dict) -> dict:
    """What the chain did to the round's candidates, and the verifier that rejected the most."""
    candidates = counts["proposed"]["candidates"]
    rejected = counts["rejected"]
    worst = max(rejected, key=rejected.get) if rejected else None
    return {"candidates": candidates, "instances_kept": counts["instances"], "rejected": rejected,
            "rejected_share": {k: round(v / max(candidates, 1), 4) for k, v in rejected.items()},
            "most_rejections": worst, "pairs": counts["pairs"], "exhaustive_pairs": counts["exhaustive_pairs"],
            "negatives_mined": counts["negatives_mined"], "review_pairs": counts.get("review_pairs", 0),
            "truncated_pairs": counts.get("truncated_pairs", 0), "unproposed": counts.get("unproposed", 0)}


def label_quality(engine_dir: Path, round_dir: Path, round_manifest: dict) -> dict:
    """The round's pseudo-labels scored against the pool's withheld labels (the split's source shards)."""
    from sam3_train.engine import shard_paths
    from sam3_train.engine.audit import pseudo_label_quality

    split = json.loads((engine_dir / "split" / "split.json").read_text())
    labelled = [u if Path(u).is_absolute() else str(REPO / u) for u in split["params"]["urls"]]
    return pseudo_label_quality(shard_paths(round_dir, round_manifest), labelled)


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
    parser.add_argument("--config", action="append", help="engine config files, in order (default: "
                        f"{' then '.join(CONFIGS)})")
    parser.add_argument("--quick", action="store_true", help="tiny scale (a handful of steps): checks the pipeline")
    parser.add_argument("--iou", action="store_true", help="only time the engine's mask IoU against its baselines")
    parser.add_argument("--write-stage", action="store_true", help="only time the write stage from real proposals "
                        "(lazy vs eager mask decoding) and measure the proposals file's bytes per image")
    parser.add_argument("--checkpoint", help="--write-stage: the proposing model (default: runs/shapes_tiny/"
                        "checkpoints/last.ckpt, from `sam3-train fit --config configs/shapes_tiny.yaml`)")
    parser.add_argument("--images", type=int, default=24, help="--write-stage: pool images (default 24)")
    parser.add_argument("--repeats", type=int, default=3, help="--write-stage: timed passes per mode (default 3)")
    parser.add_argument("--work-dir", help="default: runs/bench_engine (runs/bench_engine_quick with --quick)")
    parser.add_argument("--out", help="default: benchmarks/results/engine.json (engine_quick.json with --quick)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for both runs (as data_engine.py)")
    args = parser.parse_args()
    if args.iou:
        timings = iou_timings()
        print(f"mask IoU, one thread (fp32 matmul {timings['matmul_fp32_gflops']} GFLOP/s); ratio = baseline / ours")
        for row in timings["rows"]:
            print(f"  {row['masks']:>3} masks {row['size'][0]}x{row['size'][1]}: pairwise {row['pairwise_ms']} ms "
                  f"(float64 counts x{row['pairwise_float64_ratio']}), row-wise {row['rowwise_ms']} ms "
                  f"(int64 sums x{row['rowwise_int64_ratio']})")
        return
    if args.write_stage:
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
        return
    configs = args.config or CONFIGS
    suffix = "_quick" if args.quick else ""
    work = Path(args.work_dir or REPO / "runs" / f"bench_engine{suffix}").resolve()
    out = Path(args.out or REPO / "benchmarks" / "results" / f"engine{suffix}.json")
    overrides = ([*QUICK, f"data.shapes_root={work / 'shapes'}"] if args.quick else []) + args.overrides
    start = time.perf_counter()
    run_engine(configs, work / "engine", overrides)
    run_engine(configs, work / "full", [*overrides, "engine.labelled_fraction=1.0", "engine.rounds=0"])
    seconds = time.perf_counter() - start

    rounds = sorted((work / "engine").glob("round-[0-9][0-9][0-9]"))
    manifests = [manifest(d) for d in rounds]
    full = manifest(work / "full" / "round-000")
    rows = [(f"round {i}", m["metrics"]) for i, m in enumerate(manifests)] + [("100% labels", full["metrics"])]
    first, last, best = manifests[0]["metrics"]["test/cgF1"], manifests[-1]["metrics"]["test/cgF1"], full["metrics"]["test/cgF1"]
    gap = best - first
    recovered = (last - first) / gap if gap > 0 else None
    result = {
        "benchmark": "data_engine", "quick": args.quick, "config": configs, "overrides": overrides,
        "labelled_images": manifests[0]["outputs"]["fit"]["sources"]["labelled"]["samples"],
        "pool_images": manifests[1]["counts"]["proposed"]["images"] if len(manifests) > 1 else 0,
        "steps_per_model": full["outputs"]["fit"]["steps"],
        "metrics": {name: {k: m.get(k) for k in METRICS} for name, m in rows},
        "gap_recovered": recovered,
        "verifiers": {f"round {i}": verifier_report(m["counts"]) for i, m in enumerate(manifests) if i > 0},
        "pseudo_label_quality": {f"round {i}": label_quality(work / "engine", rounds[i], m)
                                 for i, m in enumerate(manifests) if i > 0},
        "thresholds": manifests[-1]["thresholds"], "wall_seconds": round(seconds, 1),
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
    }
    print(f"\nheld-out test split, {result['steps_per_model']} steps per model"
          f"{' (QUICK: a smoke run, not a measurement)' if args.quick else ''}")
    print(f"{'model':<14}" + "".join(f"{k.split('/')[1]:>10}" for k in METRICS))
    for name, metrics in rows:
        print(f"{name:<14}" + "".join(f"{metrics.get(k, float('nan')):>10.2f}" for k in METRICS))
    print("gap closed by the last round: " + ("n/a (round 0 is not below full supervision)" if recovered is None
                                             else f"{100 * recovered:.0f}%"))
    for name, report in result["verifiers"].items():
        print(f"{name}: {report['instances_kept']} of {report['candidates']} candidates kept; rejected "
              + ", ".join(f"{k} {v}" for k, v in report["rejected"].items())
              + f"; {report['exhaustive_pairs']}/{report['pairs']} pairs exhaustive, "
                f"{report['negatives_mined']} negatives mined")
    for name, q in result["pseudo_label_quality"].items():
        inst, exh, neg = q["instances"], q["exhaustive"], q["negatives"]
        print(f"{name} against the withheld labels: instance precision {inst['precision']}, recall {inst['recall']} "
              f"({inst['matched']} of {inst['kept']} kept match one of {inst['true']}); exhaustive pairs right "
              f"{exh['accuracy']} of {exh['pairs']}; negatives right {neg['accuracy']} of {neg['pairs']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
