"""The data engine's propose, verify and write stages over a large pool, on two ranks (DDP, gloo).

    python benchmarks/bench_engine_pool.py --images 10000 100000 --kill 10000 --phrases 2     # docs/benchmarks.md (~60 min on 2 cores at ~100 GFLOP/s fp32 matmul)
    python benchmarks/bench_engine_pool.py --images 400 --kill 400 --proposer-steps 300      # a quick look (~3 min)

Per pool size N: a pool of N shapes images at ``--image-size`` px (the built-in generator, cached under
``--work-dir``), each asked the first ``--phrases`` shape kinds (a vocabulary, as a user labels a pool for a list of
concepts), proposed on by a tiny proposer at that size (``--proposer-steps`` steps of
configs/shapes_tiny.yaml on 200 shapes images, trained once through the engine's round 0) and verified
and written with configs/engine/shapes.yaml's heuristic chain and miner, each image asked its own
phrases. The stages run as a user runs them: ``tools/data_engine.py run --stop-after propose``, then
``--stop-after write``, with ``trainer.devices=2`` (the engine launches the second rank). Per stage:
wall seconds and images per second (both ranks together; process start-up included), and the peak
resident memory of the largest process and of all of them together (sampled every 0.2 s over the
process tree with psutil), and every 5 s each process's unique memory (USS: RSS counts the pages a
fork shares in every process that maps them): per process its peak, its USS a minute after it
started and at its end (``memory``), and the processes' USS together (``peak_uss_total_mib``; larger
pools against the first: ``peak_uss_total_vs_first``). Per image: the proposals files' bytes, the stage markers' bytes
(proposals.json, shards.json: the round's manifest of what was written) and the written shards' bytes.

``--kill N``: at pool size N, every process of the stage is killed (SIGKILL, the engine's own fault
point at the middle of rank 0's share: ``propose-batch`` and ``write``), the same command is run again and
finishes the stage (propose resumes each rank after the images it had proposed); the timed figures
are the finishing attempt's. Either way the run is checked at
the end: the proposals hold every pool image once, and the written shards hold every pool image once
(nothing lost, nothing doubled). Printed and saved as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench_engine import CONFIGS, engine_command  # noqa: E402  (the demonstration's engine configs)

from sam3_train.engine.manifest import KILL_ENV  # noqa: E402

BATCH = 8  # images per propose forward (engine.batch_size)


def stage_command(work: Path, overrides: list[str], stop_after: str | None = None) -> list[str]:
    """The engine's run (configs/shapes_tiny.yaml + configs/engine/shapes.yaml), quiet, up to ``stop_after``."""
    return [*engine_command(CONFIGS, work, overrides), *(["--stop-after", stop_after] if stop_after else []), "--quiet"]


SERIES_S = 5.0  # seconds between the per-process memory samples of a stage's series


def tree_memory(root: int, *, unique: bool = False) -> list[dict]:
    """``{pid, ppid, rss}`` (bytes) of ``root`` and each of its descendants now, with ``uss`` (the
    process's own pages: RSS counts pages a fork shares twice) when ``unique``; [] once gone."""
    import psutil

    try:
        proc = psutil.Process(root)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in procs:
        try:
            row = {"pid": p.pid, "ppid": p.ppid(), "rss": p.memory_info().rss}
            if unique:
                row["uss"] = p.memory_full_info().uss
            out.append(row)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def memory_profile(series: list[dict]) -> dict:
    """Per process of a stage's series (``{t, procs}`` samples): its peak RSS and USS, and its USS at the
    first sample a minute after it appeared (start-up done) and at its last sample: where memory grows."""
    mib = lambda b: round(b / 2**20, 1)  # noqa: E731
    per: dict[int, dict] = {}
    for sample in series:
        for row in sample["procs"]:
            p = per.setdefault(row["pid"], {"pid": row["pid"], "ppid": row["ppid"], "first_s": sample["t"],
                                            "peak_rss_mib": 0.0, "peak_uss_mib": 0.0, "uss_after_60s_mib": None})
            p["peak_rss_mib"] = max(p["peak_rss_mib"], mib(row["rss"]))
            p["peak_uss_mib"] = max(p["peak_uss_mib"], mib(row["uss"]))
            if p["uss_after_60s_mib"] is None and sample["t"] - p["first_s"] >= 60:
                p["uss_after_60s_mib"] = mib(row["uss"])
            p["last_s"], p["uss_last_mib"] = sample["t"], mib(row["uss"])
    return {"processes": sorted(per.values(), key=lambda p: p["first_s"]),
            "peak_uss_total_mib": mib(max((sum(r["uss"] for r in s["procs"]) for s in series), default=0))}


def run_stage(command: list[str], log: Path, *, env: dict[str, str] | None = None, series_s: float = SERIES_S) -> dict:
    """Run ``command`` in its own session, sampling its process tree's memory; its wall seconds, peaks
    and exit code (after a fault-point kill every process left in the session is killed too)."""
    with open(log, "a") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
        peaks, series = [0, 0], []
        done = threading.Event()

        def sample() -> None:
            next_series = 0.0
            while not done.is_set():
                now = time.perf_counter() - start
                unique = now >= next_series  # USS reads /proc/PID/smaps: every series_s, not every 0.2 s
                rows = tree_memory(proc.pid, unique=unique)
                sizes = [r["rss"] for r in rows]
                peaks[0], peaks[1] = max(peaks[0], max(sizes, default=0)), max(peaks[1], sum(sizes))
                if unique and rows:
                    series.append({"t": round(now, 1), "procs": rows})
                    next_series = now + series_s
                done.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait()
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    if code != 0:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # a rank the kill left behind
        except ProcessLookupError:
            pass
    return {"seconds": seconds, "peak_rss_largest_mib": round(peaks[0] / 2**20, 1),
            "peak_rss_total_mib": round(peaks[1] / 2**20, 1), "returncode": code, "memory": memory_profile(series)}


def make_proposer(work: Path, *, image_size: int, steps: int, log: Path) -> Path:
    """A tiny proposer at ``image_size``: the engine's round 0 on 200 shapes images, ``steps`` steps
    (one per size and steps: a rerun with other ``--proposer-steps`` trains its own)."""
    folder = work / f"proposer-{image_size}px-{steps}"
    ckpt = folder / "round-000" / "model.ckpt"
    if not ckpt.is_file():
        overrides = [f"data.shapes_root={work / 'shapes'}", "data.shapes_splits={train: 200, val: 8, test: 16}",
                     f"data.image_size={image_size}", f"trainer.max_steps={steps}", f"data.steps_per_epoch={steps}",
                     f"trainer.val_check_interval={steps}", "trainer.limit_val_batches=1", "data.num_workers=0",
                     "engine.rounds=0", "engine.labelled_fraction=1.0", "seed_everything=0"]
        result = run_stage(stage_command(folder, overrides), log)
        if result["returncode"] != 0 or not ckpt.is_file():
            raise SystemExit(f"bench_engine_pool: the proposer did not train (see {log})")
    return ckpt


def pool_keys(pattern: str) -> list[str]:
    from sam3_train.engine.sources import read_samples, resolve

    return [key for key, _, _, _ in read_samples(resolve(pattern, "pool"), strict=False)]


def proposal_keys(round_dir: Path) -> list[str]:
    from sam3_train.engine.proposal_files import ProposalIndex

    return [key for path in sorted(round_dir.glob("proposals-rank*/proposals.jsonl.gz")) for key in ProposalIndex(path)]


def written_keys(round_dir: Path) -> list[str]:
    from sam3_train.engine.sources import read_samples

    shards = sorted(str(p) for p in round_dir.glob("shards-rank*/*.tar"))
    return [key for key, _, _, _ in read_samples(shards)]


def pool_run(work: Path, *, images: int, image_size: int, proposer: Path, phrases: int, kill: bool, log: Path) -> dict:
    """Propose, then verify and write, over a pool of ``images`` (module docstring)."""
    from sam3_train.data.shapes import KINDS, ensure_shapes_shards

    start = time.perf_counter()
    pool = ensure_shapes_shards(work / f"pool-{images}", splits={"train": images}, image_size=image_size,
                                max_count=1000, progress=True)["train"]
    generate_s = time.perf_counter() - start
    engine_dir = work / f"engine-{images}-{proposer.parents[1].name}"  # a rerun resumes only the same proposer's rounds
    round_dir = engine_dir / "round-001"
    vocabulary = work / f"vocabulary-{phrases}.txt"
    vocabulary.write_text("".join(f"{kind}\n" for kind in KINDS[:phrases]))
    overrides = ["engine.labelled_fraction=null", "engine.phrases=vocabulary", f"engine.vocabulary={vocabulary}",
                 f"engine.pool={pool}", f"engine.checkpoint={proposer}", "engine.rounds=1",
                 f"engine.batch_size={BATCH}", "engine.num_workers=0", f"data.image_size={image_size}",
                 "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.num_nodes=1"]
    # Round 0 first, untimed: it adopts the proposer and evaluates it on the test split (Trainer.test, its
    # loader workers, W&B). Inside the first timed stage it would be counted as propose's time and memory,
    # and only in a first attempt (a rerun skips the finished round).
    round0 = run_stage(stage_command(engine_dir, [*overrides, "engine.rounds=0"]), log)
    if round0["returncode"] != 0:
        raise SystemExit(f"bench_engine_pool: round 0 failed (see {log})")
    stages, kills = {}, {}
    for stage, point, nth in (("propose", "propose-batch", images // 2 // BATCH // 2), ("write", "write", images // 4)):
        command = stage_command(engine_dir, overrides, stop_after=stage)
        if kill:
            killed = run_stage(command, log, env={KILL_ENV: f"{point}:{max(nth, 1)}"})
            kills[stage] = {"at": f"{point}:{max(nth, 1)}", "seconds": round(killed["seconds"], 1),
                            "returncode": killed["returncode"]}
            if killed["returncode"] == 0:
                raise SystemExit(f"bench_engine_pool: the {stage} stage was not killed at {point}:{nth} (see {log})")
        result = run_stage(command, log)
        if result["returncode"] != 0:
            raise SystemExit(f"bench_engine_pool: the {stage} stage failed (see {log})")
        stages[stage] = {**result, "seconds": round(result["seconds"], 1),
                         "images_per_s": round(images / result["seconds"], 2)}
    keys = pool_keys(pool)
    proposed, written = proposal_keys(round_dir), written_keys(round_dir)
    check = {"pool_images": len(keys), "proposed_records": len(proposed), "written_samples": len(written),
             "every_image_proposed_once": sorted(proposed) == sorted(keys),
             "every_image_written_once": sorted(written) == sorted(keys)}
    if not (check["every_image_proposed_once"] and check["every_image_written_once"]):
        raise SystemExit(f"bench_engine_pool: images lost or doubled at {images}: {check}")
    marker = lambda name: (round_dir / name).stat().st_size  # noqa: E731
    proposals_bytes = sum(p.stat().st_size for p in round_dir.glob("proposals-rank*/*"))
    shard_bytes = sum(p.stat().st_size for p in round_dir.glob("shards-rank*/*"))
    counts = json.loads((round_dir / "proposals.json").read_text())["counts"]
    written_counts = json.loads((round_dir / "shards.json").read_text())["counts"]
    return {
        "images": images, "generate_seconds": round(generate_s, 1), "round0_seconds": round(round0["seconds"], 1),
        "stages": stages, "kills": kills or None,
        "candidates_per_image": round(counts["candidates"] / images, 2), "pairs_per_image": round(counts["pairs"] / images, 2),
        "instances_written": written_counts["instances"], "negatives_mined": written_counts["negatives_mined"],
        "bytes_per_image": {"proposals": round(proposals_bytes / images), "proposals_json": round(marker("proposals.json") / images, 2),
                            "shards_json": round(marker("shards.json") / images, 2), "written_shards": round(shard_bytes / images)},
        "check": check,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[10_000, 100_000], help="pool sizes, in order")
    parser.add_argument("--kill", type=int, nargs="*", default=[], help="pool sizes whose stages are killed once")
    parser.add_argument("--image-size", type=int, default=112, help="pool images and proposer, px (default 112)")
    parser.add_argument("--phrases", type=int, default=4, help="phrases asked of every image: the first N shape "
                        "kinds, as a vocabulary file (engine.phrases: vocabulary; default 4)")
    parser.add_argument("--proposer-steps", type=int, default=1500, help="the proposer's training steps (default "
                        "1500: its detections pass the chain, so the write stage writes instances; at 300 none pass)")
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "bench_engine_pool"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "engine_pool.json"))
    args = parser.parse_args()
    from sam3_train.callbacks import matmul_gflops

    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "bench.log"
    gflops = matmul_gflops()
    proposer = make_proposer(work, image_size=args.image_size, steps=args.proposer_steps, log=log)
    runs = []
    for images in args.images:
        runs.append(pool_run(work, images=images, image_size=args.image_size, proposer=proposer,
                             phrases=args.phrases, kill=images in args.kill, log=log))
        print(json.dumps(runs[-1]), flush=True)
    first = runs[0]
    for run in runs[1:]:  # memory of every larger pool against the smallest one's
        run["peak_rss_vs_first"] = {stage: round(s["peak_rss_largest_mib"] / first["stages"][stage]["peak_rss_largest_mib"], 3)
                                    for stage, s in run["stages"].items()}
        run["peak_uss_total_vs_first"] = {  # the processes' own pages together: no page counted twice
            stage: round(s["memory"]["peak_uss_total_mib"] / first["stages"][stage]["memory"]["peak_uss_total_mib"], 3)
            for stage, s in run["stages"].items()}
    scores = json.loads((proposer.parent / "metrics.json").read_text())["test"]  # round 0's test of the proposer
    result = {"benchmark": "data_engine_pool", "image_size": args.image_size, "phrases": args.phrases, "proposer_steps": args.proposer_steps,
              "proposer_test": {k: round(scores[k], 4) for k in ("test/cgF1", "test/box_cgF1", "test/IL_MCC") if k in scores},
              "ranks": 2, "batch_size": BATCH, "chain": "configs/engine/shapes.yaml (heuristic)", "runs": runs,
              "matmul_fp32_gflops": round(gflops, 1), "cpus": os.cpu_count(), "python": platform.python_version(),
              "machine": platform.machine()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for run in runs:
        s = run["stages"]
        print(f"{run['images']:>7} images: propose {s['propose']['images_per_s']}/s (peak {s['propose']['peak_rss_largest_mib']} "
              f"MiB largest, {s['propose']['peak_rss_total_mib']} MiB all), write {s['write']['images_per_s']}/s (peak "
              f"{s['write']['peak_rss_largest_mib']} / {s['write']['peak_rss_total_mib']} MiB; USS of all processes: "
              f"propose {s['propose']['memory']['peak_uss_total_mib']}, write {s['write']['memory']['peak_uss_total_mib']} "
              f"MiB); bytes per image "
              f"{run['bytes_per_image']}; {run['check']}")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
