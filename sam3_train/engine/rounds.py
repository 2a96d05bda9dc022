"""The round loop: propose -> verify + write -> fit -> evaluate, round after round, resumable.

    cfg, settings = load_config(["configs/shapes_tiny.yaml", "configs/engine/shapes.yaml"])   # settings.py
    engine = Engine(cfg=cfg, settings=settings, configs=["configs/shapes_tiny.yaml", "configs/engine/shapes.yaml"])
    engine.run()                        # every rank runs this (sam3_train.dist.launch first)

``{work_dir}/round-000`` trains on the labelled set alone (or adopts ``settings.checkpoint``);
round k >= 1 proposes on the pool with round k-1's model. Each stage ends in one file, written
atomically by rank 0 after a barrier, and a stage runs again only while its file is missing; what a
killed attempt left of it is removed first (a proposing rank's folder excepted: it resumes, see
proposals.ProposalWriter), and nothing downstream of it can exist::

    stage     its outputs                           its marker       kill point
    propose   proposals-rankNNN/ (each rank)        proposals.json   propose-batch, propose
    write     shards-rankNNN/ (one per proposer)    shards.json      write (per sample), written
    fit       fit/, fit-config.yaml                 model.ckpt       fit
    evaluate                                        metrics.json     eval
    manifest                                        manifest.json    (written last: the round is done)

A stage's output depends only on its inputs (proposals on checkpoint + pool + settings, never on the
world size of the write), so a round finished after any kill equals an uninterrupted one. Inputs that
changed under an unfinished round (another checkpoint, pool, phrases, thresholds) fail, naming them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import lightning as L

from sam3_train.atomic import PARTIAL_SUFFIX, replace_dir, write_json_atomic
from sam3_train.dist import barrier, is_rank_zero, on_rank_zero, rank_and_world
from sam3_train.engine.manifest import (
    FIT_CONFIG,
    FIT_DIR,
    FIT_INFO,
    MANIFEST,
    METRICS,
    MODEL,
    PROPOSALS_PREFIX,
    PROPOSED,
    REVIEW_PREFIX,
    SHARDS_PREFIX,
    SPLIT_DIR,
    SUMMARY,
    TMP_SUFFIX,
    VERIFIED,
    VERIFIERS_DIR,
    WRITTEN,
    add_counts,
    checkpoint_entry,
    empty_counts,
    fault_point,
    file_sha256,
    finalize_round,
    merge_summaries,
    proposals_dir_name,
    read_json,
    read_manifest,
    round_dir_name,
    round_finished,
    shard_paths,
)
from sam3_train.engine.proposals import ProposalWriter, ProposeData, ProposeModule
from sam3_train.engine.pseudo_labels import write_rank
from sam3_train.engine.settings import DataEngine, round_fit_config, trainer_kwargs, write_config
from sam3_train.engine.sources import (
    labelled_set_phrases,
    read_vocabulary,
    resolve,
    split_labelled_pool,
    weighted_shards,
)
from sam3_train.engine.training import evaluate, fit_round, log_round

log = logging.getLogger(__name__)
STAGES = ("propose", "verifiers", "write", "fit", "eval")


def say(message: str) -> None:
    if is_rank_zero():
        print(f"[data engine] {message}", flush=True)


def _remove(round_dir: Path, names: list[str]) -> None:
    """Rank 0: delete round files by name or prefix (``shards-rank*``) and what a kill left of them
    (``.tmp`` folders, ``.partial`` files)."""
    if not is_rank_zero() or not round_dir.is_dir():
        return
    for path in sorted(round_dir.iterdir()):
        base = path.name
        for suffix in (TMP_SUFFIX, PARTIAL_SUFFIX):
            base = base.removesuffix(suffix)
        if any(base == n or (n.endswith("*") and base.startswith(n[:-1])) for n in names):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


# What each stage's (re)start removes: its own outputs and everything downstream.
_FIT = [FIT_DIR, FIT_CONFIG, FIT_INFO, MODEL, METRICS]
_WRITE = [f"{SHARDS_PREFIX}*", f"{REVIEW_PREFIX}*", WRITTEN, *_FIT]
DOWNSTREAM = {
    # not its rank folders: a killed rank resumes from its own (proposals.ProposalWriter checks what
    # it was started for and starts afresh otherwise)
    "propose": [PROPOSED, VERIFIERS_DIR, VERIFIED, *_WRITE],
    # not its folder: each of its steps resumes from its own file (learned/stage.py)
    "verifiers": [VERIFIED, *_WRITE],
    "write": _WRITE,
    "fit": _FIT,
    "eval": [METRICS],
}


class Engine:
    """Runs the rounds of one engine config (see the module docstring)."""

    def __init__(self, *, cfg: dict[str, Any], settings: DataEngine, configs: list[str], progress: bool = True):
        """``cfg`` and ``settings`` as ``settings.load_config`` reads them from the files ``configs``
        (recorded in every manifest)."""
        self.cfg = cfg
        self.settings = settings
        self.configs = [str(c) for c in configs]
        self.progress = progress
        self.work_dir = Path(settings.work_dir)
        self.labelled: list[str] = []
        self.pool: list[str] = []
        self.inputs: dict[str, Any] = {}
        self.phrases: list[str] | None = None

    def round_dir(self, index: int) -> Path:
        return self.work_dir / round_dir_name(index)

    # ------------------------------------------------------------------ inputs
    def prepare(self) -> None:
        """Resolve (or build, for ``labelled_fraction``) the labelled set and pool, and the phrases:
        rank 0 decides, every rank gets its answer. Bad paths fail here, naming them."""
        self.labelled, self.pool, self.inputs, self.phrases = on_rank_zero(self._prepare)

    def _prepare(self) -> tuple[list[str], list[str], dict[str, Any], list[str] | None]:
        s = self.settings
        labelled_pattern, pool_pattern = s.labelled, s.pool
        if s.labelled_fraction is not None:
            from sam3_train.data import Sam3DataModule

            data = Sam3DataModule(**self.cfg["data"])
            data.prepare_data()  # generates the shapes dataset when configured
            data.setup("fit")
            split = split_labelled_pool(urls=data.urls["train"], out_dir=self.work_dir / SPLIT_DIR,
                                        fraction=s.labelled_fraction, seed=s.split_seed, num_shards=s.split_shards)
            labelled_pattern, pool_pattern = split["patterns"]["labelled"], split["patterns"].get("pool")
            say(f"split {split['counts']['labelled']} labelled / {split['counts']['pool']} pool images "
                f"into {self.work_dir / SPLIT_DIR}")
        if s.checkpoint is not None:
            from sam3_train.checkpointing import check_checkpoint_file

            check_checkpoint_file(s.checkpoint)  # missing, truncated or foreign: one message naming the file
        labelled = resolve(labelled_pattern, "DataEngine.labelled") if (labelled_pattern or s.checkpoint is None) else []
        pool = resolve(pool_pattern, "DataEngine.pool") if s.rounds > 0 else []
        phrases = None
        if s.phrases == "vocabulary":
            phrases = read_vocabulary(s.vocabulary)
        elif s.phrases == "labelled":
            phrases = labelled_set_phrases(labelled)
        phrase_info = {"source": s.phrases, "vocabulary": s.vocabulary}
        if phrases is not None:
            phrase_info.update(count=len(phrases), sha256=hashlib.sha256("\n".join(phrases).encode()).hexdigest())
        inputs = {"config": self.configs, "labelled": labelled_pattern, "pool": pool_pattern,
                  "phrases": phrase_info, "labelled_weight": s.labelled_weight, "pseudo_weight": s.pseudo_weight,
                  "fit_from": s.fit_from}
        return labelled, pool, inputs, phrases

    # ------------------------------------------------------------------ loop
    def run(self, *, stop_after: str | None = None) -> list[dict[str, Any]]:
        """Every round from 0 to ``settings.rounds``; finished ones are skipped. With ``stop_after``
        (a stage name) return after that stage of the first unfinished round that has it."""
        if stop_after is not None and stop_after not in STAGES:
            raise ValueError(f"stop_after must be one of {STAGES}, got {stop_after!r}")
        self.prepare()
        manifests = []
        for index in range(self.settings.rounds + 1):
            manifest = self.run_round(index, stop_after=stop_after)
            if manifest is None:
                return manifests
            manifests.append(manifest)
        return manifests

    def _stage_done(self, round_dir: Path, marker: str, stage: str) -> bool:
        """Rank 0's answer, shared: is the stage's marker there? If not, clear the stage and downstream."""
        def check() -> bool:
            done = (round_dir / marker).is_file()
            if not done:
                _remove(round_dir, DOWNSTREAM[stage])
            return done

        return on_rank_zero(check)

    def run_round(self, index: int, *, stop_after: str | None = None) -> dict[str, Any] | None:
        """One round; returns its manifest, or None when it stopped at ``stop_after``."""
        round_dir = self.round_dir(index)
        if on_rank_zero(lambda: round_finished(round_dir)):
            say(f"round {index}: finished, skipped ({round_dir / MANIFEST})")
            return read_manifest(round_dir)
        if is_rank_zero():
            round_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        previous = None if index == 0 else self.round_dir(index - 1) / MODEL
        written = {"counts": empty_counts(), "shards": {}, "world_size": 0}
        if index > 0:
            # What the proposals depend on (and nothing else: a new training weight must not void them).
            propose_inputs = {"checkpoint": on_rank_zero(lambda: checkpoint_entry(previous)), "pool": self.pool,
                              "phrases": self.inputs["phrases"], "propose": self.settings.propose_params()}
            if not self._stage_done(round_dir, PROPOSED, "propose"):
                self.propose(round_dir, previous, propose_inputs)
            self._check_inputs(round_dir / PROPOSED, propose_inputs, "proposals")
            if stop_after == "propose":
                return None
            if self.settings.verifier_training is not None:
                from sam3_train.engine.learned.stage import run_stage, stage_inputs

                if not self._stage_done(round_dir, VERIFIED, "verifiers"):
                    run_stage(self, round_dir, previous, index)
                self._check_inputs(round_dir / VERIFIED, stage_inputs(self, previous, index), "verifiers")
                if stop_after == "verifiers":
                    return None
            if not self._stage_done(round_dir, WRITTEN, "write"):
                self.write(round_dir)
            self._check_inputs(round_dir / WRITTEN, self.settings.thresholds(), "shards")
            written = read_json(round_dir / WRITTEN)
            written["counts"]["proposed"] = read_json(round_dir / PROPOSED)["counts"]
            if stop_after == "write":
                return None
        sources = {"labelled": (self.labelled, self.settings.labelled_weight if index else 1.0)} if self.labelled else {}
        if index > 0:
            sources["pseudo"] = (shard_paths(round_dir, written), self.settings.pseudo_weight)
        trainer = None
        if not self._stage_done(round_dir, MODEL, "fit"):
            trainer = self.fit(index, round_dir, sources, written["counts"])
        if stop_after == "fit":
            return None
        if not self._stage_done(round_dir, METRICS, "eval"):
            self.evaluate(index, round_dir, trainer, written["counts"])
        metrics = read_json(round_dir / METRICS)

        def finalize() -> dict[str, Any]:
            outputs = {"checkpoint": checkpoint_entry(round_dir / MODEL), "fit": metrics.pop("fit", {})}
            manifest = finalize_round(
                round_dir, world_size=written["world_size"], inputs={**self.inputs, "round": index},
                checkpoint=previous, thresholds=self.settings.thresholds() if index else {},
                metrics=metrics["test"], outputs=outputs,
                written={"counts": written["counts"], "shards": written["shards"]})
            say(f"round {index}: done, " + ", ".join(f"{k} {v:.2f}" for k, v in metrics["test"].items()
                                                       if k.endswith("cgF1")))
            return manifest

        return on_rank_zero(finalize)

    def _check_inputs(self, marker: Path, expected: dict[str, Any], what: str) -> None:
        recorded = json.loads(json.dumps(read_json(marker)["inputs"]))
        expected = json.loads(json.dumps(expected))  # tuples -> lists, as stored
        if recorded != expected:
            keys = sorted(k for k in set(recorded) | set(expected) if recorded.get(k) != expected.get(k))
            raise ValueError(f"{marker.parent}: its {what} were made with other inputs ({', '.join(keys)} differ); "
                             f"restore them or delete {marker.parent} to redo the round")

    # ------------------------------------------------------------------ stages
    def propose(self, round_dir: Path, checkpoint: Path, inputs: dict[str, Any], *, pool: list[str] | None = None,
                phrases: Any = "engine", kill_point: str = "propose") -> None:
        """Propose with ``checkpoint`` on ``pool`` (None: the engine's pool) asking ``phrases`` (the
        default: the engine's phrase source; None: each image's own) into ``round_dir``."""
        s = self.settings
        pool = self.pool if pool is None else pool
        phrases = self.phrases if phrases == "engine" else phrases
        say(f"{round_dir.name}: propose with {checkpoint} on {len(pool)} shards")
        data_args = self.cfg["data"]
        module = ProposeModule(checkpoint=str(checkpoint), flip_tta=s.flip_tta, min_score=s.min_score,
                               max_detections=s.max_detections, stability_offset=s.stability_offset,
                               tokenizer_path=data_args["tokenizer_path"])
        data = ProposeData(pool=pool, phrases=phrases, image_size=module.image_size,
                           batch_size=s.batch_size, num_workers=s.num_workers,
                           square_resize=data_args["square_resize"], tokenizer_path=data_args["tokenizer_path"])
        trainer = L.Trainer(**trainer_kwargs(self.cfg), logger=False,
                            callbacks=[ProposalWriter(round_dir=round_dir, inputs=inputs)],
                            default_root_dir=str(round_dir), enable_checkpointing=False, enable_model_summary=False,
                            enable_progress_bar=self.progress, use_distributed_sampler=False)
        trainer.predict(module, datamodule=data, return_predictions=False)  # ends with a barrier
        if is_rank_zero():
            counts, world = {}, trainer.world_size
            ranks = {proposals_dir_name(r) for r in range(world)}
            for stale in round_dir.glob(f"{PROPOSALS_PREFIX}*"):  # of a killed run with more ranks
                if stale.is_dir() and stale.name.removesuffix(TMP_SUFFIX) not in ranks:
                    shutil.rmtree(stale)
            for rank in range(world):
                add_counts(counts, read_json(round_dir / proposals_dir_name(rank) / SUMMARY)["counts"])
            write_json_atomic(round_dir / PROPOSED, {"inputs": inputs, "world_size": world, "counts": counts})
            say(f"{round_dir.name}: proposed {counts['candidates']} candidates for {counts['pairs']} pairs "
                f"of {counts['images']} images ({counts['skipped']} unreadable skipped)")
        barrier()
        fault_point(kill_point)

    def write(self, round_dir: Path) -> None:
        proposers = read_json(round_dir / PROPOSED)["world_size"]
        chain, miner = self.settings.chain(), self.settings.negatives
        calibrated = {}
        if chain.needs_image:  # learned verifiers: the round's own where they name none, the pool's images
            from sam3_train.engine.learned.chain import ShardImages, bind_round_verifiers, calibrations

            bind_round_verifiers(chain, round_dir)
            calibrated = calibrations(chain)  # thresholds a verifier set itself (a precision target)
        rank, world = rank_and_world()
        for proposer in range(rank, proposers, world):
            if chain.needs_image:
                chain.images = ShardImages(read_json(round_dir / proposals_dir_name(proposer) / SUMMARY)["urls"])
            write_rank(round_dir=round_dir, proposer=proposer, chain=chain, miner=miner,
                       max_count=self.settings.max_count, progress=self.progress and is_rank_zero())
        barrier()
        if is_rank_zero():
            merged = merge_summaries(round_dir, proposers)
            write_json_atomic(round_dir / WRITTEN, {"inputs": self.settings.thresholds(), "world_size": proposers,
                                                    **({"calibration": calibrated} if calibrated else {}), **merged})
            c = merged["counts"]
            say(f"{round_dir.name}: wrote {c['samples']} images, {c['instances']} instances, {c['negatives_mined']} "
                f"mined negatives, {c['exhaustive_pairs']}/{c['pairs']} exhaustive pairs; rejected {c['rejected']}")
        barrier()
        fault_point("written")

    def fit(self, index: int, round_dir: Path, sources: dict[str, tuple[list[str], float]],
            counts: dict[str, Any]) -> L.Trainer | None:
        """Fit the round's model (or adopt ``settings.checkpoint`` in round 0); publish ``fit-info.json``
        then ``model.ckpt``, the stage's marker. Returns the fit's trainer (None when adopted)."""
        s = self.settings
        adopt = index == 0 and s.checkpoint is not None
        shards, mix = (None, {}) if adopt and not self.labelled else weighted_shards(sources)
        cfg = round_fit_config(self.cfg, round_dir=round_dir, train_shards=shards, test_shards=s.eval_shards)
        if is_rank_zero():
            write_config(cfg, round_dir / FIT_CONFIG)
        barrier()
        trainer, tmp = None, round_dir / (MODEL + TMP_SUFFIX)  # training.fit_round writes this name
        if adopt:
            info = {"adopted": checkpoint_entry(s.checkpoint)}
            if is_rank_zero():
                shutil.copyfile(s.checkpoint, tmp)
            say(f"{round_dir.name}: adopt {s.checkpoint} as the round's model (no fit)")
        else:
            init_from = self.round_dir(index - 1) / MODEL if s.fit_from == "previous" and index > 0 else None
            say(f"{round_dir.name}: fit on " + ", ".join(f"{k} ({v['samples']} images, share {v['share']:.2f})"
                                                        for k, v in mix.items()))
            trainer = fit_round(round_dir=round_dir, init_from=init_from,
                                round_info={"round": index, "sources": mix, "counts": counts})
            info = {"sources": mix, "steps": trainer.global_step, "init_from": None if init_from is None
                    else str(init_from), "config_sha256": file_sha256(round_dir / FIT_CONFIG)}
        if is_rank_zero():
            write_json_atomic(round_dir / FIT_INFO, info)
            replace_dir(tmp, round_dir / MODEL)  # SafeCheckpointIO wrote and fsync'ed it
        barrier()
        fault_point("fit")
        return trainer

    def evaluate(self, index: int, round_dir: Path, trainer: L.Trainer | None, counts: dict[str, Any]) -> None:
        say(f"{round_dir.name}: evaluate on the held-out split")
        metrics, trainer = evaluate(round_dir=round_dir, checkpoint=round_dir / MODEL, trainer=trainer)
        log_round(trainer, round_index=index, counts=counts, metrics=metrics)
        if is_rank_zero():
            write_json_atomic(round_dir / METRICS, {"test": metrics, "fit": read_json(round_dir / FIT_INFO) or {}})
        barrier()
        fault_point("eval")

