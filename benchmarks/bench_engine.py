"""The data engine's measured demonstration: do pseudo-labelling rounds close the gap to full supervision?

    python benchmarks/bench_engine.py --jobs 2        # two seeds x two regimes, learned verifiers (~2 h, 2 cores)
    python benchmarks/bench_engine.py --quick         # a handful of steps on a small shapes set: checks it runs
    python benchmarks/bench_engine.py --regimes transfer --base runs/ft/base/hf --seeds 0 1 2 --rounds 2 --jobs 3 \
        --audit-images 100 --work-dir runs/bench_engine_transfer
                                                      # the transfer regime: a pretrained base on a new domain
                                                      # (the base: benchmarks/bench_finetune.py --out runs/ft)
    python benchmarks/bench_engine.py --chain heuristic --regimes weak --seeds 0 --steps 3000 --rounds 2
                                                      # the first round's demonstration (hand-set checks)

The engine's stages timed on their own (mask IoU, the write stage): benchmarks/bench_engine_stages.py.

The engine configs are configs/shapes_tiny.yaml with the overlay configs/engine/shapes.yaml, and for the
learned verifiers (``--chain learned``, the default) configs/engine/shapes_learned.yaml on top.

On the built-in shapes dataset, 10% of the train split keeps its labels and the other 90% (labels
stripped) is the unlabelled pool. Per seed (``seed_everything``; the split is the same for all):

- **student**: round 0 trains on the labelled 10% (``--steps``), then ``--rounds`` pseudo-labelling
  rounds, each proposed by the previous round's model (the *weak* regime: the from-scratch case);
- **strong**: the same rounds, but round 0's model is a stronger proposer adopted through
  ``engine.checkpoint``: the config's model trained on the same labelled 10% for ``--proposer-steps``
  (once, seed 0, shared by the seeds as one pretrained model is shared by its users). Its students
  train ``--steps`` as everywhere;
- **full**: a model trained on 100% of the labels, the gap's far end;
- **transfer** (``--regimes transfer --base HF_FOLDER``): the regime users run, a pretrained model on a
  new domain. The base (the main job's model: ``benchmarks/bench_finetune.py``'s ``OUT/base/hf``) is
  fine-tuned with bench_finetune's full fine-tuning recipe on the shifted shapes domain
  (``--transfer-splits``, generated under the work folder): round 0 on its labelled 10%, every round
  after on labelled + verified pseudo-labels of the other 90%, each from the base afresh for
  ``--transfer-steps``; its reference, **transfer-full**, is the base fine-tuned on 100% of the
  domain's labels, same steps. Evaluated on the domain's test split.

Every student trains from the same initialisation (``fit_from: base``) with the same budget and is
evaluated on the held-out test split; the gap closed by the last round is (last - student round 0) /
(full - student round 0), in both from-scratch regimes against the same student round 0; in the
transfer regime (last - transfer round 0) / (transfer-full - transfer round 0), per seed (the worst
seed is the aim's figure). Per round it reports what the chain kept and rejected, how good the written
pseudo-labels are against the pool's withheld labels (``audit.pseudo_label_quality``), and every
chain's decisions on the same proposals (``audit.round_verifier_quality``: the heuristic chain of
configs/engine/shapes.yaml, the learned one the round trained, and the same with its MV at a held-out
precision target of 0.85, configs/engine/shapes_learned_precision.yaml: scored, and written with
``--chain learned-p85``). Mean and
spread (min, max) over the seeds. Every run goes through the real front (``tools/data_engine.py run``,
in subprocesses), so the benchmark is resumable: run the same command again after an interruption.
``--jobs N`` runs N seeds at once, each with cpus / N threads. ``--control`` (transfer, with
``engine.fit_from=previous``): round k against round 0's model continued for as many steps on the
labelled images alone (``transfer-labelled``), which tells what the pseudo-labels add beyond more steps:

    python benchmarks/bench_engine.py --regimes transfer --base runs/ft/base/hf --seeds 0 1 2 --rounds 1 \
        --chain learned-p85 --control --audit-images 100 engine.fit_from=previous
Printed and saved as JSON (``--out``).
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
LEARNED = "configs/engine/shapes_learned.yaml"
PRECISION = "configs/engine/shapes_learned_precision.yaml"  # MV at a held-out precision target
# A CPU smoke scale: 40 / 8 / 8 images at 112 px, three steps per model.
QUICK = ["data.shapes_splits={train: 40, val: 8, test: 8}", "data.image_size=112", "trainer.max_steps=3",
         "data.steps_per_epoch=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
         "trainer.log_every_n_steps=1", "data.batch_size=2", "data.eval_batch_size=4", "data.num_workers=0",
         "data.max_phrases_per_image=3", "engine.split_shards=4", "engine.num_workers=0", "engine.max_detections=5"]

# The transfer regime's shifted domain: 10% of 1,000 training images labelled (100 labelled, a pool of
# 900: the learned write stage costs ~1 s an image on this CPU), 48 validation images (checkpoint
# choice is not used: the last weights are evaluated) and the 200-image test split.
TRANSFER_SPLITS = {"train": 1000, "val": 48, "test": 200}
# Below this gap (cgF1 points) between round 0 and the 100%-label reference, "gap recovered" divides
# by noise and is not reported: twice the seed spread of the 400-step transfer fine-tunes (0.21).
MIN_GAP = 0.5


def transfer_config(work: Path, base: Path, *, steps: int, splits: dict[str, int], quick: bool = False) -> str:
    """configs/shapes_tiny.yaml turned into the full fine-tune of ``base`` on the shifted shapes domain
    (bench_finetune's recipe: SAM 3's, at a third of the base's learning rate), written to
    ``work/transfer.yaml``; its data are the domain's shards under ``work/shifted`` (generated once)."""
    import yaml
    from bench_finetune import base_image_size, finetune_data, finetune_model

    from sam3_train.data.shapes import ensure_shapes_shards

    shards = ensure_shapes_shards(work / "shifted", splits=splits, domain="shifted")
    cfg = yaml.safe_load((REPO / "configs" / "shapes_tiny.yaml").read_text())
    finetune_model(cfg["model"], base)
    data = finetune_data(cfg["data"])
    for key in ("shapes_root", "shapes_splits"):
        data.pop(key, None)
    data.update(train_shards=shards["train"], val_shards=shards["val"], test_shards=shards["test"],
                steps_per_epoch=steps, image_size=base_image_size(base) or data["image_size"])
    cfg["trainer"].update(max_steps=steps, val_check_interval=steps)
    if quick:
        data.update(image_size=112, batch_size=2, eval_batch_size=4, num_workers=0, max_phrases_per_image=3)
        cfg["trainer"].update(limit_val_batches=1, log_every_n_steps=1)
    path = work / "transfer.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def quick_base(work: Path) -> Path:
    """--quick: a random tiny detector at the quick image size as an HF folder, the transfer regime's base."""
    folder = work / "random_base" / "hf"
    if not (folder / "config.json").is_file():
        from sam3_train.model import build_detector

        build_detector("tiny", num_queries=20, image_size=112).save_pretrained(folder)
    return folder


def engine_command(configs: list[str], work_dir: Path, overrides: list[str]) -> list[str]:
    """The ``tools/data_engine.py run`` command of ``configs`` (in order) into ``work_dir``, run from the repo."""
    options = [a for c in configs for a in ("--config", str(c))]
    return [sys.executable, str(TOOL), "run", *options, f"engine.work_dir={work_dir}", *overrides]


def run_engine(configs: list[str], work_dir: Path, overrides: list[str], *, threads: int | None = None,
               log: Path | None = None) -> None:
    """One ``tools/data_engine.py run`` in a subprocess (with ``threads`` intra-op threads; output to ``log``)."""
    command = engine_command(configs, work_dir, overrides)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    print("$", " ".join(command) + (f"  > {log}" if log else ""), flush=True)
    if log is None:
        subprocess.run(command, check=True, cwd=REPO, env=env)
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        if subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT).returncode:
            raise RuntimeError(f"{' '.join(command)} failed: see {log}")


def control_fit(round0: Path, out: Path, init: Path) -> None:
    """In this process: ``round0``'s fit (its labelled images, steps and recipe) started from ``init``'s
    weights, into ``out``; its test metrics go to ``out/metrics.json`` last (the marker)."""
    import yaml

    from sam3_train.atomic import write_json_atomic
    from sam3_train.engine.manifest import FIT_CONFIG, MODEL
    from sam3_train.engine.manifest import METRICS as METRICS_FILE
    from sam3_train.engine.settings import round_fit_config, write_config
    from sam3_train.engine.training import evaluate, fit_round

    out.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load((round0 / FIT_CONFIG).read_text())
    write_config(round_fit_config(cfg, round_dir=out, train_shards=None, name=f"control-{out.name}"), out / FIT_CONFIG)
    trainer = fit_round(round_dir=out, init_from=init, round_info={"round": out.name, "sources": {}, "counts": {}})
    os.replace(out / (MODEL + ".tmp"), out / MODEL)
    metrics, _ = evaluate(round_dir=out, checkpoint=out / MODEL, trainer=trainer)
    write_json_atomic(out / METRICS_FILE, {"test": metrics, "fit": {**control_inputs(round0, init),
                                                                     "steps": trainer.global_step}})


def control_inputs(round0: Path, init: Path) -> dict:
    """What a control's result depends on: the weights it starts from and round 0's fit config."""
    from sam3_train.engine.manifest import FIT_CONFIG, file_sha256

    config = round0 / FIT_CONFIG
    return {"init_from": str(init), "init_sha256": file_sha256(init), "config": str(config),
            "config_sha256": file_sha256(config)}


def run_controls(engine_dir: Path, control_dir: Path, rounds: int, *, threads: int | None, log: Path) -> None:
    """The labelled-only control of a ``fit_from: previous`` run: control k is round 0's model continued
    for k x round 0's steps on round 0's labelled images alone (control k - 1's model, one fit further),
    so that round k and control k have had the same steps and the same recipe; only round k's pool
    pseudo-labels differ. Each control refits round 0's config as it is, its seed included, so it
    replays round 0's draws and augmentations (as the engine's rounds replay theirs). Each control is
    a subprocess; a finished one (its metrics.json, recorded from the same start weights and round 0
    config) is skipped, one recorded from others is fitted again."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    for k in range(1, rounds + 1):
        out = control_dir / f"round-{k:03d}"
        init = (engine_dir / "round-000" if k == 1 else control_dir / f"round-{k - 1:03d}") / "model.ckpt"
        done = out / "metrics.json"
        if done.is_file():
            recorded, current = json.loads(done.read_text())["fit"], control_inputs(engine_dir / "round-000", init)
            if all(recorded.get(key) == current[key] for key in ("init_sha256", "config_sha256")):
                continue
            print(f"control {k}: {out} was fitted from other weights or another round 0: fitted again", flush=True)
            done.unlink()
        code = (f"import sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); from pathlib import Path; "
                f"import bench_engine; bench_engine.control_fit(Path({str(engine_dir / 'round-000')!r}), "
                f"Path({str(out)!r}), Path({str(init)!r}))")
        print(f"$ control {k}: {engine_dir / 'round-000'} continued from {init}  > {log}", flush=True)
        with open(log, "a") as stream:
            if subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, stdout=stream,
                              stderr=subprocess.STDOUT).returncode:
                raise RuntimeError(f"the labelled-only control {k} of {engine_dir} failed: see {log}")


def manifest(round_dir: Path) -> dict:
    path = round_dir / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the run did not finish")
    return json.loads(path.read_text())


def verifier_report(counts: dict) -> dict:
    """What the chain did to the round's candidates, and the verifier that rejected the most."""
    # the chain's first verifier judges every candidate, each later one the survivors
    candidates = max((n + counts["rejected"].get(v, 0) for v, n in counts["kept"].items()), default=0)
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


def chain_of(configs: list[str]):
    """The verifier chain and the hard-negative miner of an engine config."""
    from sam3_train.engine.settings import load_config

    settings = load_config([REPO / c for c in configs])[1]
    return settings.chain(), settings.negatives


def read_marker(round_dir: Path, name: str) -> dict | None:
    path = round_dir / name
    return json.loads(path.read_text()) if path.is_file() else None


def round_report(engine_dir: Path, round_dir: Path, chains: dict[str, list[str]], audit_images: int | None) -> dict:
    """A pseudo-labelling round, as far as it got: every chain's decisions on its proposals (once
    proposed; the learned chain once its verifiers are trained), and what its own chain wrote and how
    good that is (once written), against the pool's withheld labels."""
    from sam3_train.engine.audit import round_verifier_quality
    from sam3_train.engine.manifest import PROPOSED, VERIFIED, WRITTEN, file_sha256

    split = json.loads((engine_dir / "split" / "split.json").read_text())
    labelled = [u if Path(u).is_absolute() else str(REPO / u) for u in split["params"]["urls"]]
    decisions = {}
    for name, configs in chains.items():
        chain, miner = chain_of(configs)
        if not (round_dir / PROPOSED).is_file() or (chain.needs_image and not (round_dir / VERIFIED).is_file()):
            continue
        # keyed by what the audit scores: the chain's thresholds, the miner's and its guards' sweep
        guards = ["presence", "skip_doubted", "chain"]
        key = " ".join([name, str(audit_images), "negatives", json.dumps([miner.params(), guards], sort_keys=True),
                        json.dumps(chain.thresholds(), sort_keys=True),
                        *(file_sha256(p) for p in sorted(round_dir.glob(
            "proposals-rank*/proposals.jsonl.gz"))), *(file_sha256(p) for p in sorted(round_dir.glob("verifiers/*.ckpt")))])
        cache = engine_dir.parent.parent / "decisions.json"  # the strong regime's seeds share round 1's
        known = json.loads(cache.read_text()) if cache.is_file() else {}  # proposals and verifiers; reruns
        if key not in known:
            known[key] = round_verifier_quality(round_dir, labelled, chain, max_images=audit_images, miner=miner)
            fresh = json.loads(cache.read_text()) if cache.is_file() else {}  # another report may have added some
            cache.write_text(json.dumps({**fresh, key: known[key]}, indent=1) + "\n")
        decisions[name] = known[key]
    written = read_marker(round_dir, WRITTEN)
    return {"chain": verifier_report(written["counts"]) if written else None,
            "pseudo_labels": label_quality(engine_dir, round_dir, written) if written else None,
            "decisions": decisions}


def run_report(engine_dir: Path, chains: dict[str, list[str]], audit_images: int | None) -> list[dict]:
    """Per round of one engine run (as far as it got): its test metrics, and for rounds >= 1 :func:`round_report`."""
    out = []
    for i, round_dir in enumerate(sorted(engine_dir.glob("round-[0-9][0-9][0-9]"))):
        m = read_marker(round_dir, "manifest.json")
        row = {"round": i, "metrics": {k: m["metrics"].get(k) for k in METRICS} if m else None}
        if i > 0:
            row.update(round_report(engine_dir, round_dir, chains, audit_images))
        out.append(row)
    return out


def share_proposer_round(src: Path, dst: Path) -> bool:
    """Give the engine run ``dst`` the first pseudo-labelling round of ``src`` up to its pseudo-labels.

    In the strong regime round 1's proposals, verifiers and pseudo-labels depend only on the proposer
    and the pool (the same for every seed), never on the student's seed: the first seed makes them,
    later seeds take them and only fit. The stage markers record their inputs with the run's paths,
    which are rewritten, so the engine's input checks still compare everything else. False while
    ``src`` has not written its pseudo-labels yet."""
    import shutil

    from sam3_train.engine.manifest import PROPOSED, VERIFIED, WRITTEN

    source, target = src / "round-001", dst / "round-001"
    if (target / WRITTEN).is_file():
        return True
    if not (source / WRITTEN).is_file():
        return False
    target.mkdir(parents=True, exist_ok=True)
    for folder in [*source.glob("proposals-rank*"), *source.glob("shards-rank*"), source / "verifiers"]:
        if folder.is_dir() and not folder.name.endswith(".tmp"):
            shutil.copytree(folder, target / folder.name, dirs_exist_ok=True)
    for marker in (PROPOSED, VERIFIED, WRITTEN):  # the write marker last: it says the stages are done
        if (source / marker).is_file():
            (target / marker).write_text((source / marker).read_text().replace(str(src), str(dst)))
    return True


def seed_runs(*, seed: int, work: Path, configs: list[str], overrides: list[str], regimes: list[str],
              proposer: Path | None, threads: int | None, first_seed: int,
              transfer: tuple[list[str], list[str]] | None = None, control: bool = False, rounds: int = 1) -> None:
    """Every engine run of one seed (each resumable): the student's rounds, 100% labels, the strong regime
    (whose round 1 up to the pseudo-labels a later seed takes from ``first_seed``'s run), and the
    transfer regime with its 100%-label reference (``transfer``: its configs and overrides)."""
    base = [*overrides, f"seed_everything={seed}"]
    log = work / f"seed-{seed}" / "engine.log"
    run = lambda name, args, cfgs=configs: run_engine(cfgs, work / f"seed-{seed}" / name, args,  # noqa: E731
                                                      threads=threads, log=log)
    if "transfer" in regimes:
        configs_t, overrides_t = transfer
        base_t = [*overrides_t, f"seed_everything={seed}"]
        # the reference first: an interrupted benchmark can already read the gap of its finished rounds
        run("transfer-full", [*base_t, "engine.labelled_fraction=1.0", "engine.rounds=0"], configs_t)
        run("transfer", base_t, configs_t)
        if control:
            run_controls(work / f"seed-{seed}" / "transfer", work / f"seed-{seed}" / "transfer-labelled", rounds,
                         threads=threads, log=log)
        return  # the transfer regime runs alone (demonstration)
    if "weak" in regimes:
        run("weak", base)
    if "strong" in regimes:
        strong = [*base, f"engine.checkpoint={proposer}"]
        if seed != first_seed:
            run("strong", [*strong, "engine.rounds=0"])  # round 0 adopts the proposer
            while not share_proposer_round(work / f"seed-{first_seed}" / "strong", work / f"seed-{seed}" / "strong"):
                time.sleep(30)
        run("strong", strong)
    run("full", [*base, "engine.labelled_fraction=1.0", "engine.rounds=0"])


def cgf1(row: dict | None) -> float | None:
    return row["metrics"]["test/cgF1"] if row and row.get("metrics") else None


def seed_result(*, seed: int, work: Path, chains: dict[str, list[str]], regimes: list[str],
                audit_images: int | None) -> dict:
    """One seed's runs as far as they got (a missing figure is None)."""
    root = work / f"seed-{seed}"

    def metrics(name: str) -> dict | None:
        m = read_marker(root / name / "round-000", "manifest.json")
        return {k: m["metrics"].get(k) for k in METRICS} if m else None

    result = {"seed": seed, "full": metrics("full") if set(regimes) - {"transfer"} else None, "regimes": {}}
    if "transfer" in regimes:
        result["transfer-full"] = metrics("transfer-full")
        controls = sorted((root / "transfer-labelled").glob("round-*/metrics.json"))
        result["transfer-labelled"] = [{k: json.loads(p.read_text())["test"].get(k) for k in METRICS}
                                       for p in controls] or None
    runs = {regime: run_report(root / regime, chains, audit_images) for regime in regimes}
    for regime, rows in runs.items():
        # the gap's two ends: the transfer regime's own round 0 and reference; the from-scratch regimes
        # share the weak student's round 0 and the full model
        reference, first = ("transfer-full", rows) if regime == "transfer" else ("full", runs.get("weak"))
        student0 = cgf1(first[0]) if first else None
        best = result[reference]["test/cgF1"] if result.get(reference) else None
        known = None not in (student0, best) and best - student0 >= (MIN_GAP if regime == "transfer" else 0.0)
        gaps = [(cgf1(r) - student0) / (best - student0) if known and cgf1(r) is not None else None for r in rows[1:]]
        changes = [cgf1(r) - student0 for r in rows[1:] if cgf1(r) is not None and student0 is not None]
        # the last finished round's (an interrupted run's last round may have no figure yet)
        result["regimes"][regime] = {"rounds": rows, "gap_recovered": next((g for g in reversed(gaps) if g is not None), None),
                                     "gap_recovered_by_round": gaps, "worst_round_change": min(changes, default=None)}
    return result


def spread(values: list[float | None]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "values": values}


def summary(seeds: list[dict], regimes: list[str]) -> dict:
    """Mean and spread over the seeds of the figures the aims name (over the seeds that have them)."""
    get = lambda obj, *path: None if obj is None else (obj if not path else get(obj.get(path[0]), *path[1:]))  # noqa: E731
    out = {}
    if set(regimes) - {"transfer"}:
        out["full cgF1"] = spread([get(s, "full", "test/cgF1") for s in seeds])
    if "transfer" in regimes:
        out["transfer-full cgF1"] = spread([get(s, "transfer-full", "test/cgF1") for s in seeds])
        for k in range(1, 1 + max(len(s.get("transfer-labelled") or []) for s in seeds)):
            # round k against its labelled-only control (fit_from: previous; --control)
            pairs = [(get(s, "transfer-labelled") or [None] * k, s["regimes"]["transfer"]["rounds"]) for s in seeds]
            pairs = [(c[k - 1]["test/cgF1"] if len(c) >= k and c[k - 1] else None,
                      cgf1(rounds[k]) if len(rounds) > k else None) for c, rounds in pairs]
            out[f"transfer-labelled control {k} cgF1"] = spread([c for c, _ in pairs])
            out[f"transfer round {k} minus its control"] = spread([None if None in (c, r) else r - c for c, r in pairs])
    for regime in regimes:
        runs = [s["regimes"][regime] for s in seeds]
        for i in range(max(len(r["rounds"]) for r in runs)):
            rows = [r["rounds"][i] if i < len(r["rounds"]) else None for r in runs]
            out[f"{regime} round {i} cgF1"] = spread([cgf1(r) for r in rows])
            if i == 0:
                continue
            for what in ("precision", "recall"):
                out[f"{regime} round {i} pseudo-label {what}"] = spread(
                    [get(r, "pseudo_labels", "instances", what) for r in rows])
            # phrases written as absent (mined hard negatives, and exhaustive pairs the chain kept nothing
            # of) whose withheld labels have instances
            out[f"{regime} round {i} absent phrases wrong"] = spread(
                [None if get(r, "pseudo_labels", "negatives", "accuracy") is None
                 else 1 - get(r, "pseudo_labels", "negatives", "accuracy") for r in rows])
            chains = sorted({c for r in rows if r for c in r["decisions"]})
            for chain in chains:
                d = [get(r, "decisions", chain) for r in rows]
                out[f"{regime} round {i} {chain} MV precision"] = spread([get(x, "mask", "precision") for x in d])
                out[f"{regime} round {i} {chain} MV recall"] = spread([get(x, "mask", "recall") for x in d])
                out[f"{regime} round {i} {chain} EV accuracy"] = spread([get(x, "exhaustivity", "accuracy") for x in d])
                out[f"{regime} round {i} {chain} mined negatives wrong"] = spread(
                    [get(x, "negatives", "as_given", "wrong_share") for x in d])
                out[f"{regime} round {i} {chain} its own negatives wrong"] = spread(
                    [get(x, "negatives", "chain", "wrong_share") for x in d])
        out[f"{regime} gap recovered"] = spread([r["gap_recovered"] for r in runs])
        for i in range(max(len(r["gap_recovered_by_round"]) for r in runs)):
            out[f"{regime} gap recovered by round {i + 1}"] = spread(
                [r["gap_recovered_by_round"][i] if i < len(r["gap_recovered_by_round"]) else None for r in runs])
        out[f"{regime} worst round change"] = spread([r["worst_round_change"] for r in runs])
    return out


def demonstration(args: argparse.Namespace) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from sam3_train.callbacks import matmul_gflops

    if "transfer" in args.regimes and len(args.regimes) > 1:
        raise SystemExit("bench_engine: run the transfer regime on its own (--regimes transfer): it has its own "
                         "domain, base and reference")
    if args.control and ("transfer" not in args.regimes or "engine.fit_from=previous" not in args.overrides):
        raise SystemExit("bench_engine: --control is the labelled-only control of the transfer regime's rounds "
                         "fitted from the previous round's model: give --regimes transfer and engine.fit_from=previous")
    learned = args.chain != "heuristic"
    args.audit_images = args.audit_images or None
    chains = {"heuristic": CONFIGS, **({"learned": [*CONFIGS, LEARNED], "learned-p85": [*CONFIGS, LEARNED, PRECISION]}
                                       if learned else {})}
    configs = args.config or chains[args.chain]
    suffix = "_quick" if args.quick else ""
    # another writing chain, another folder: finished rounds are skipped, so a shared one would report
    # the learned chain's rounds as another's
    chain = "" if args.chain == "learned" else f"_{args.chain}"
    work = Path(args.work_dir or REPO / "runs" / f"bench_engine{chain}{suffix}").resolve()
    out = Path(args.out or REPO / "benchmarks" / "results" / f"engine{suffix}.json")
    quick = [*QUICK, f"data.shapes_root={work / 'shapes'}"] if args.quick else []
    steps = 3 if args.quick else args.steps
    overrides = [*quick, f"trainer.max_steps={steps}", f"engine.rounds={args.rounds}", *args.overrides]
    if args.quick:
        configs = [*configs, *quick_verifier_configs(work)] if learned else configs
    transfer = None
    if "transfer" in args.regimes:
        if not args.base and not args.quick:
            raise SystemExit("bench_engine: the transfer regime fine-tunes a pretrained base: give --base (an HF "
                             "folder, e.g. benchmarks/bench_finetune.py's OUT/base/hf)")
        base = quick_base(work) if args.quick else Path(args.base).resolve()
        splits = {"train": 40, "val": 8, "test": 8} if args.quick else json.loads(args.transfer_splits)
        steps_t = 3 if args.quick else args.transfer_steps
        model_cfg = transfer_config(work, base, steps=steps_t, splits=splits, quick=args.quick)
        engine_cfgs = [c for c in configs if c != "configs/shapes_tiny.yaml"]
        quick_t = [q for q in QUICK if q.startswith("engine.")] if args.quick else []
        transfer = ([model_cfg, *engine_cfgs], [*quick_t, f"trainer.max_steps={steps_t}", f"engine.rounds={args.rounds}",
                                                *args.overrides])
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    gflops = matmul_gflops()
    start = time.perf_counter()
    proposer = work / "proposer" / "round-000" / "model.ckpt" if "strong" in args.regimes else None
    if "strong" in args.regimes and not args.report_only:  # once, with every thread, before the seeds
        steps_proposer = 6 if args.quick else args.proposer_steps
        run_engine(CONFIGS, work / "proposer", [*quick, *args.overrides, f"trainer.max_steps={steps_proposer}",
                                                "engine.rounds=0", "seed_everything=0"])
    with ThreadPoolExecutor(max_workers=args.jobs if not args.report_only else 1) as pool:
        futures = [pool.submit(seed_runs, seed=seed, work=work, configs=configs, overrides=overrides,
                               regimes=args.regimes, proposer=proposer, threads=threads if args.jobs > 1 else None,
                               first_seed=args.seeds[0], transfer=transfer, control=args.control, rounds=args.rounds)
                   for seed in (args.seeds if not args.report_only else [])]
        for future in futures:
            future.result()
    seconds = time.perf_counter() - start
    seeds = [seed_result(seed=seed, work=work, chains=chains, regimes=args.regimes, audit_images=args.audit_images)
             for seed in args.seeds]
    result = {
        "benchmark": "data_engine", "quick": args.quick, "config": configs, "overrides": overrides,
        "chain": args.chain, "audit_images": args.audit_images, "seeds": args.seeds, "regimes": args.regimes, "rounds": args.rounds,
        "steps_per_student": None if args.regimes == ["transfer"] else steps,
        "transfer": None if transfer is None else {
            "base": str(base), "steps": steps_t, "splits": splits, "config": transfer[0], "overrides": transfer[1]},
        "proposer": None if proposer is None else {
            "steps": 6 if args.quick else args.proposer_steps,
            "metrics": {k: manifest(work / "proposer" / "round-000")["metrics"].get(k) for k in METRICS}},
        "summary": summary(seeds, args.regimes), "per_seed": seeds,
        "matmul_fp32_gflops": round(gflops, 1), "jobs": args.jobs, "wall_seconds": None if args.report_only else round(seconds, 1),
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
    }
    print_result(result)
    save_result(out, result_group(args.regimes), result)
    print(f"saved {out} ({result_group(args.regimes)})")


def result_group(regimes: list[str]) -> str:
    """The results file's key of a run: ``transfer``, or ``from_scratch`` (weak and strong)."""
    return "transfer" if regimes == ["transfer"] else "from_scratch"


def save_result(out: Path, group: str, result: dict) -> None:
    """Write ``result`` as ``out[group]``, keeping the other group's result already in ``out`` (a file
    of the format before the groups, one from-scratch result, becomes the ``from_scratch`` group)."""
    saved = json.loads(out.read_text()) if out.is_file() else {}
    if "benchmark" in saved:
        saved = {"from_scratch": saved}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**saved, group: result}, indent=2) + "\n")


def quick_verifier_configs(work: Path) -> list[str]:
    """--quick: an overlay pointing the verifiers stage at 3-step copies of the verifier configs."""
    import yaml

    folder = work / "verifier_configs"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind, name in (("mask_config", "mv"), ("exhaustivity_config", "ev")):
        cfg = yaml.safe_load((REPO / "configs" / "verifiers" / f"{name}.yaml").read_text())
        cfg["trainer"]["max_steps"] = 3
        paths[kind] = folder / f"{name}.yaml"
        paths[kind].write_text(yaml.safe_dump(cfg))
    overlay = folder / "engine.yaml"
    overlay.write_text(yaml.safe_dump({"engine": {"verifier_training": {k: str(v) for k, v in paths.items()}}}))
    return [str(overlay)]


def print_result(result: dict) -> None:
    fmt = lambda s: "n/a" if s is None else (  # noqa: E731
        f"{s['mean']:.3g} ({', '.join(f'{v:.3g}' for v in s['values'])})")
    steps = result["transfer"]["steps"] if result["regimes"] == ["transfer"] else result["steps_per_student"]
    print(f"\nheld-out test split, {steps} steps per student, seeds {result['seeds']}, "
          f"{result['chain']} verifiers{' (QUICK: a smoke run, not a measurement)' if result['quick'] else ''}")
    if result["transfer"]:
        t = result["transfer"]
        print(f"transfer regime: {t['base']} fine-tuned {t['steps']} steps on the shifted domain {t['splits']}")
    if result["proposer"]:
        print(f"strong regime's proposer: {result['proposer']['steps']} steps on the labelled share, test cgF1 "
              f"{result['proposer']['metrics']['test/cgF1']:.3g}")
    for name, value in result["summary"].items():
        print(f"  {name:<48} {fmt(value)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", help="engine config files, in order (default: "
                        f"{' then '.join(CONFIGS)}, then {LEARNED} with --chain learned, and {PRECISION} with "
                        "--chain learned-p85)")
    parser.add_argument("--quick", action="store_true", help="tiny scale (a handful of steps): checks the pipeline")
    parser.add_argument("--chain", choices=["learned", "learned-p85", "heuristic"], default="learned",
                        help="the verifiers that write the pseudo-labels (default learned; learned-p85: its MV at a "
                             "held-out precision target of 0.85; every chain is scored)")
    parser.add_argument("--regimes", nargs="+", choices=["weak", "strong", "transfer"], default=["weak", "strong"],
                        help="weak and strong: from scratch (default); transfer: a pretrained --base on a new domain")
    parser.add_argument("--base", help="transfer: the pretrained base, an HF folder (bench_finetune.py's OUT/base/hf)")
    parser.add_argument("--transfer-steps", type=int, default=1600,
                        help="transfer: steps of every fine-tune, round 0, the rounds and the reference (default "
                             "1600: at 400 the 10%% and 100%% fine-tunes are equal, docs/data_engine.md)")
    parser.add_argument("--transfer-splits", default=json.dumps(TRANSFER_SPLITS),
                        help=f"transfer: JSON images per split of the shifted domain (default {json.dumps(TRANSFER_SPLITS)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--rounds", type=int, default=1, help="pseudo-labelling rounds per regime (default 1)")
    parser.add_argument("--steps", type=int, default=1500, help="training steps of every student (default 1500)")
    parser.add_argument("--proposer-steps", type=int, default=3000,
                        help="the strong regime's proposer's steps on the labelled share (default 3000)")
    parser.add_argument("--audit-images", type=int, default=300, help="pool images on which every chain's "
                        "decisions are scored against the withheld labels (default 300; 0: all)")
    parser.add_argument("--control", action="store_true", help="transfer with engine.fit_from=previous: also "
                        "fit round 0's model on the labelled images alone for as many steps as each round has had "
                        "(transfer-labelled: what the rounds' pseudo-labels add beyond more steps)")
    parser.add_argument("--report-only", action="store_true", help="report the runs already in --work-dir")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at once (threads split between them)")
    parser.add_argument("--work-dir", help="default: runs/bench_engine (runs/bench_engine_quick with --quick)")
    parser.add_argument("--out", help="default: benchmarks/results/engine.json (engine_quick.json with --quick)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for both runs (as data_engine.py)")
    args = parser.parse_args()
    demonstration(args)


if __name__ == "__main__":
    main()
