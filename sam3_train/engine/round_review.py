"""Human review of a written round: export its flagged pairs, import the corrections into its shards.

    export_round(round_dir=d, settings=s, out_dir="review/round-001")      # review.json + images + overlays
    import_round(round_dir=d, review="review/round-001/review.json")        # corrected shards, pointers moved

Export recomputes each pair's verdict from the stored proposals (deterministic, and checked against
the thresholds the shards were written with) and takes the labels from the round's current shards.
Import never edits a shard in place: it writes the whole corrected round into
``round_dir/review-<sha of the JSON>/shards-rankNNN/``, then points ``shards.json`` (what the round's
fit reads) and, for a finished round, ``manifest.json`` at it, each with one atomic replace. Killed
at any point, the round still names one complete set of shards; importing the same file again
finishes the job (an import is idempotent). Importing into a finished round records the review but
does not retrain that round's model; review before ``fit`` (``run --stop-after write``) to train on it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from sam3_train.data.shards import DEFAULT_MAX_COUNT, ShardSink
from sam3_train.engine.labelling import verify_image
from sam3_train.engine.manifest import MANIFEST, SUMMARY, TMP_SUFFIX, file_sha256, rank_dir_name, write_json_atomic
from sam3_train.engine.proposals import PROPOSALS, ProposalIndex, proposals_dir_name, record_candidates
from sam3_train.engine.review import export_review, import_review
from sam3_train.engine.settings import DataEngine
from sam3_train.engine.sources import iter_samples

WRITTEN = "shards.json"  # rounds.py's marker of the write stage


def written_shards(round_dir: str | os.PathLike) -> dict[str, Any]:
    """The round's ``shards.json``; fails naming the round when its shards are not written yet."""
    path = Path(round_dir) / WRITTEN
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the round's pseudo-labels are not written yet "
                                "(run `data_engine.py run --stop-after write` first)")
    return json.loads(path.read_text())


def _paths(round_dir: Path, entries: list[dict[str, Any]]) -> list[str]:
    return [str(round_dir / e["path"]) for e in entries]


def export_round(*, round_dir: str | os.PathLike, settings: DataEngine, out_dir: str | os.PathLike,
                 only_flagged: bool = True, min_score: float = 0.1) -> dict[str, int]:
    """Write the review set of one round (review.export_review's layout); returns its counts."""
    round_dir = Path(round_dir)
    written = written_shards(round_dir)
    if json.loads(json.dumps(settings.thresholds())) != written["inputs"]:
        raise ValueError(f"{round_dir} was written with other verifier thresholds than the config's: "
                         f"{written['inputs']}; export with the config that wrote it")
    chain = settings.chain()

    def images():
        for proposer in sorted(written["shards"], key=int):
            index = ProposalIndex(round_dir / proposals_dir_name(int(proposer)) / PROPOSALS)
            for key, data, ext, meta in iter_samples(_paths(round_dir, written["shards"][proposer])):
                yield data, ext, meta, verify_image(record_candidates(index.get(key)), chain)

    return export_review(out_dir=out_dir, images=images(), min_score=min_score, only_flagged=only_flagged)


def import_round(*, round_dir: str | os.PathLike, review: str | os.PathLike,
                 max_count: int = DEFAULT_MAX_COUNT) -> dict[str, Any]:
    """Apply an edited review JSON to the round's shards (see the module docstring).

    Returns ``{"changed": [[key, phrase], ...], "shards": folder or None}``; nothing is rewritten when
    no label changes.
    """
    round_dir, review = Path(round_dir), Path(review)
    if not review.is_file():
        raise FileNotFoundError(f"review file {review} does not exist")
    written = written_shards(round_dir)
    samples = {key: meta for proposer in written["shards"]
               for key, _, _, meta in iter_samples(_paths(round_dir, written["shards"][proposer]))}
    coco = json.loads(review.read_text())
    new, changed = import_review(coco, samples)
    result: dict[str, Any] = {"changed": [list(c) for c in changed], "shards": None}
    if changed:
        digest = file_sha256(review)
        name = f"review-{digest[:12]}"
        out, tmp = round_dir / name, round_dir / (name + TMP_SUFFIX)
        for stale in (out, tmp):  # not referenced by shards.json (that import would have changed nothing)
            if stale.exists():
                shutil.rmtree(stale)
        shards = {}
        for proposer in sorted(written["shards"], key=int):
            folder = rank_dir_name(int(proposer))
            keys = set()
            with ShardSink(out_dir=tmp / folder, prefix="pseudo", max_count=max_count) as sink:
                for key, data, ext, _ in iter_samples(_paths(round_dir, written["shards"][proposer])):
                    sink.write(key, data, ext, json.loads(json.dumps(new[key], sort_keys=True)))
                    keys.add(key)
            shards[proposer] = [{"path": f"{name}/{folder}/{p.name}", "size": p.stat().st_size,
                                 "sha256": file_sha256(p)} for p in sorted((tmp / folder).glob("*.tar"))]
            write_json_atomic(tmp / folder / SUMMARY, {"rank": int(proposer), "shards": shards[proposer],
                                                       "counts": {"changed_pairs": sum(k in keys for k, _ in changed)}})
        os.replace(tmp, out)
        record = {"file": str(review), "sha256": digest, "changed": result["changed"],
                  "replaced": written["shards"]}
        written = {**written, "shards": shards, "reviews": [*written.get("reviews", []), record]}
        write_json_atomic(round_dir / WRITTEN, written)
        result["shards"] = str(out)
    manifest_path = round_dir / MANIFEST
    if manifest_path.is_file():  # a finished round: move its pointer too (also after a kill just before)
        manifest = json.loads(manifest_path.read_text())
        if manifest["shards"] != written["shards"]:
            manifest["shards"], manifest["reviews"] = written["shards"], written.get("reviews", [])
            write_json_atomic(manifest_path, manifest)
    return result
