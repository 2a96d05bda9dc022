"""The round directory: every file and folder name in it, the stage markers, and the manifest that
finishes a round. Every other module takes these names from here.

::

    {work_dir}/split/labelled/, pool/, split.json    SPLIT_DIR, SPLIT_MARKER (labelled_fraction: sources.py)
    {work_dir}/round-001/                        round_dir_name(1)
      proposals-rank000/proposals.jsonl.gz, summary.json, start.json  proposals_dir_name(r), PROPOSALS, SUMMARY, START
      proposals.json                             PROPOSED: the propose stage's marker
      verifiers/                                 VERIFIERS_DIR: the verifiers stage (engine.verifier_training)
        inputs.json, proposals-rank000/, proposals.json    VERIFIER_INPUTS, the labelled set's proposals
        mv-examples.pt, ev-examples.pt, examples.json      EXAMPLES_FILES[kind], EXAMPLE_COUNTS
        mask-config.yaml, mask/, mask.ckpt       verifier_config_name, its logs, verifier_checkpoint
        exhaustivity-config.yaml, exhaustivity/, exhaustivity.ckpt
      verifiers.json                             VERIFIED: the verifiers stage's marker
      shards-rank000/pseudo-000000.tar ...       shards_dir_name(r)
      review-<sha>/shards-rank000/ ...           review_dir_name(sha): a review import's shards
      shards.json                                WRITTEN: the write stage's marker
      fit-config.yaml, fit/, fit-info.json       FIT_CONFIG, FIT_DIR, FIT_INFO
      model.ckpt                                 MODEL: the fit stage's marker
      metrics.json                               METRICS: the evaluate stage's marker
      manifest.json                              MANIFEST: written last, the round is finished

A folder is built under its name + TMP_SUFFIX and renamed when complete; a file is written through
``sam3_train.atomic`` (a ``.partial`` file renamed over it). What a kill leaves of either is removed
before the stage runs again (:func:`clean_unfinished`, rounds.py), except a proposing rank's
``.tmp`` folder: a rank started for the same inputs resumes from it (proposals.ProposalWriter).

``manifest.json`` (keys sorted, no timestamps: the same inputs give the same bytes)::

    {"format": 1,
     "inputs": {...},                                  # pool shards, phrase source, config: the caller's
     "checkpoint": {"path": str, "sha256": str},
     "thresholds": {"verifiers": {name: {arg: value}}, "negatives": {...}},
     "counts": {"samples", "pairs", "exhaustive_pairs", "instances", "negatives_mined", "empty_masks",
                "kept": {verifier: n}, "rejected": {verifier: n}, ...},   # the round loop adds more
     "shards": {"0": [{"path": "shards-rank000/pseudo-000000.tar", "size": bytes, "sha256": str}], ...},
     "world_size": int,
     "metrics": {},                                    # the round's fit and evaluation (held-out split)
     "outputs": {...}}                                 # what the round made: its checkpoint, fit sources

After every rank has renamed its folder (a barrier), rank 0 calls :func:`finalize_round`.
:func:`round_finished` tells a re-run to skip the round; :func:`clean_unfinished` removes what a
killed run left so the round can be written again. :func:`fault_point` kills the process at a named
point of a stage, so that tests can interrupt a round exactly there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from sam3_train.atomic import PARTIAL_SUFFIX, write_json_atomic
from sam3_train.dist import is_rank_zero

FORMAT = 1
TMP_SUFFIX = ".tmp"  # a folder being written; renamed into place when complete (files: PARTIAL_SUFFIX)
SUMMARY = "summary.json"  # per-rank summary inside each proposals-rankNNN and shards-rankNNN folder
START = "start.json"  # inside proposals-rankNNN: what the rank proposes from (a killed rank resumes on a match)
PROPOSALS = "proposals.jsonl.gz"  # one gzip member per image, inside proposals-rankNNN (proposal_files.py)
LEGACY_PROPOSALS = "proposals.jsonl"  # the earlier plain JSON lines, still read
# The stages' markers (written last by each stage, in this order) and the fit's other files.
PROPOSED = "proposals.json"
WRITTEN = "shards.json"
MODEL = "model.ckpt"
METRICS = "metrics.json"
MANIFEST = "manifest.json"
FIT_CONFIG = "fit-config.yaml"
FIT_INFO = "fit-info.json"
FIT_DIR = "fit"  # the round's fit: its logs and checkpoints (settings.round_fit_config)
# Folders of one rank (names end in the rank, NNN) and of one review import; folder name prefixes.
PROPOSALS_PREFIX, SHARDS_PREFIX, REVIEW_PREFIX = "proposals-rank", "shards-rank", "review-"
# The verifiers stage (learned/stage.py): its folder, marker and files.
VERIFIERS_DIR = "verifiers"
VERIFIED = "verifiers.json"
VERIFIER_INPUTS = "inputs.json"  # what the stage's files were made from
EXAMPLES_FILES = {"mask": "mv-examples.pt", "exhaustivity": "ev-examples.pt"}  # learned/examples.py
EXAMPLE_COUNTS = "examples.json"
# The labelled / pool split of labelled_fraction, under the work dir.
SPLIT_DIR = "split"
SPLIT_MARKER = "split.json"
KILL_ENV = "SAM3_ENGINE_KILL_AT"  # fault injection for the resumability tests: "<point>" or "<point>:<n>"
_hits: dict[str, int] = {}


def round_dir_name(index: int) -> str:
    return f"round-{index:03d}"


def proposals_dir_name(rank: int) -> str:
    """The folder of the proposals of one rank of the propose step."""
    return f"{PROPOSALS_PREFIX}{rank:03d}"


def shards_dir_name(rank: int) -> str:
    """The folder of the shards written from one rank's proposals."""
    return f"{SHARDS_PREFIX}{rank:03d}"


def review_dir_name(digest: str) -> str:
    """The folder of the shards a review import rewrote (``digest``: the review file's sha256)."""
    return f"{REVIEW_PREFIX}{digest[:12]}"


def proposal_dirs(round_dir: str | os.PathLike) -> list[Path]:
    """The finished ``proposals-rankNNN`` folders of a round (or of its verifiers folder), by rank."""
    return sorted(p for p in Path(round_dir).glob(f"{PROPOSALS_PREFIX}*")
                  if p.is_dir() and not p.name.endswith(TMP_SUFFIX))


def verifier_checkpoint(round_dir: str | os.PathLike, kind: str) -> Path:
    """The learned verifier of ``kind`` (``mask`` / ``exhaustivity``) a round's verifiers stage trained."""
    return Path(round_dir) / VERIFIERS_DIR / f"{kind}.ckpt"


def verifier_config_name(kind: str) -> str:
    """The ``fit-verifier`` config the verifiers stage wrote for ``kind`` (inside VERIFIERS_DIR)."""
    return f"{kind}-config.yaml"


def empty_counts() -> dict[str, Any]:
    """Counts one rank adds up over its samples (the manifest sums them over ranks)."""
    return {"samples": 0, "pairs": 0, "exhaustive_pairs": 0, "instances": 0, "negatives_mined": 0,
            "empty_masks": 0, "kept": {}, "rejected": {}}


def add_counts(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """``total += part`` for (nested) count dicts, in place; returns ``total``."""
    for k, v in part.items():
        if isinstance(v, dict):
            add_counts(total.setdefault(k, {}), v)
        else:
            total[k] = total.get(k, 0) + v
    return total


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str | os.PathLike) -> dict[str, Any] | None:
    """A JSON file's content, or None when it is missing or not valid JSON (a marker not yet written)."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def merge_summaries(round_dir: str | os.PathLike, world_size: int) -> dict[str, Any]:
    """``{"counts", "shards"}`` summed / collected over the ranks' ``shards-rankNNN/summary.json``.

    Raises FileNotFoundError naming the rank whose folder is missing (that rank did not finish).
    """
    round_dir = Path(round_dir)
    counts, shards = empty_counts(), {}
    for rank in range(world_size):
        summary_path = round_dir / shards_dir_name(rank) / SUMMARY
        if not summary_path.is_file():
            raise FileNotFoundError(f"{summary_path} is missing: rank {rank} did not finish writing its shards; "
                                    "run the round again")
        summary = json.loads(summary_path.read_text())
        add_counts(counts, summary["counts"])
        shards[str(rank)] = summary["shards"]
    return {"counts": counts, "shards": shards}


def checkpoint_entry(checkpoint: str | os.PathLike | None) -> dict[str, Any]:
    """``{"path", "sha256"}`` of a checkpoint file (both None for none); a missing file fails."""
    if checkpoint is None:
        return {"path": None, "sha256": None}
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return {"path": str(path), "sha256": file_sha256(path)}


def finalize_round(
    round_dir: str | os.PathLike,
    *,
    world_size: int,
    inputs: dict[str, Any],
    checkpoint: str | os.PathLike | None,
    thresholds: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    outputs: dict[str, Any] | None = None,
    written: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Rank 0, after the barrier: merge the ranks' summaries and write the manifest; returns it.

    ``checkpoint``: the model that proposed (None for a round that proposed nothing, round 0).
    ``written``: ``{"counts", "shards"}`` to record instead of merging the rank folders' summaries
    (a round whose shards were rewritten by a review import). Raises FileNotFoundError naming the
    rank whose folder is missing (that rank did not finish).
    """
    round_dir = Path(round_dir)
    written = written if written is not None else merge_summaries(round_dir, world_size)
    manifest = {
        "format": FORMAT,
        "inputs": inputs,
        "checkpoint": checkpoint_entry(checkpoint),
        "thresholds": thresholds,
        "counts": written["counts"],
        "shards": written["shards"],
        "world_size": world_size,
        "metrics": metrics or {},
        "outputs": outputs or {},
    }
    write_json_atomic(round_dir / MANIFEST, manifest)
    return manifest


def read_manifest(round_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest, or None when it is missing or not valid JSON."""
    return read_json(Path(round_dir) / MANIFEST)


def shard_paths(round_dir: str | os.PathLike, manifest: dict[str, Any]) -> list[str]:
    """Every shard a round's manifest (or its write stage's ``shards.json``) lists, rank by rank, as paths."""
    return [str(Path(round_dir) / s["path"]) for r in sorted(manifest["shards"], key=int) for s in manifest["shards"][r]]


def round_finished(round_dir: str | os.PathLike, *, check_hashes: bool = False) -> bool:
    """True when the manifest exists, has the current format and every shard it lists exists with
    its recorded size (and sha256 with ``check_hashes``; reading every byte is slow for big rounds)."""
    round_dir = Path(round_dir)
    manifest = read_manifest(round_dir)
    if manifest is None or manifest.get("format") != FORMAT:
        return False
    for entries in manifest.get("shards", {}).values():
        for entry in entries:
            path = round_dir / entry["path"]
            if not path.is_file() or path.stat().st_size != entry["size"]:
                return False
            if check_hashes and file_sha256(path) != entry["sha256"]:
                return False
    return True


def clean_unfinished(round_dir: str | os.PathLike) -> list[str]:
    """Remove what an unfinished round left (``*.tmp`` folders, ``*.partial`` files, rank folders, a
    stale manifest) so it can be written again from scratch; a finished round is left alone.

    Returns the names removed. Rank folders go too: a re-run may use another world size, and a
    rank folder that outlived its manifest no longer belongs to any round.
    """
    round_dir = Path(round_dir)
    if not round_dir.is_dir() or round_finished(round_dir):
        return []
    removed = []
    for path in sorted(round_dir.iterdir()):
        if (path.name.endswith((TMP_SUFFIX, PARTIAL_SUFFIX)) or path.name.startswith(SHARDS_PREFIX)
                or path.name == MANIFEST):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path.name)
    return removed


def fault_point(name: str) -> None:
    """Kill this process (SIGKILL: no cleanup, no ``finally``) when ``$SAM3_ENGINE_KILL_AT`` names
    this point, optionally at its n-th visit (``write:3``). Only rank 0 dies; its DDP peers then fail
    at their next collective, as after a real crash. Tests use it to interrupt a round exactly there."""
    spec = os.environ.get(KILL_ENV)
    if not spec or not is_rank_zero():
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
