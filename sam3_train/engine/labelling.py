"""The verify-and-write step: one rank's proposals -> verified pseudo-labels -> that rank's shards.

For proposals folder ``k`` (written by rank k of the propose step) the pool shards that rank read are
walked in order; each image's candidates go through the verifier chain, hard negatives are mined
among its phrases, and :class:`~sam3_train.engine.writer.RoundWriter` writes the image with its
pseudo-labelled queries into ``shards-rank{k}``. The output depends only on the proposals, the pool
and the settings, never on how many processes write it or whether an earlier attempt died.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sam3_train.engine.candidates import Candidate
from sam3_train.engine.dist import fault_point
from sam3_train.engine.manifest import SUMMARY, add_counts
from sam3_train.engine.negatives import HardNegativeMiner
from sam3_train.engine.proposals import PROPOSALS, ProposalIndex, proposals_dir_name, record_candidates
from sam3_train.engine.sources import iter_samples
from sam3_train.engine.verifiers import Verified, VerifierChain
from sam3_train.engine.writer import RoundWriter

log = logging.getLogger(__name__)


def verify_image(pairs: list[tuple[Candidate, int]], chain: VerifierChain) -> list[Verified]:
    """The chain's verdict on every pair of one image. A pair whose detections were truncated at
    ``max_detections`` may hide more instances: it is written non-exhaustive and flagged."""
    out = []
    for candidate, dropped in pairs:
        verified = chain(candidate)
        if dropped:
            verified.exhaustive = False
            verified.flags = (*verified.flags, f"propose: {dropped} detections above the floor not kept")
        out.append(verified)
    return out


def labelled_phrases_of(meta: dict[str, Any]) -> list[str]:
    """Phrases the image already has instances for: never mined as negatives."""
    return [q["phrase"] for q in meta["queries"] if q.get("instances")]


def verified_samples(round_dir: str | os.PathLike, proposer: int, chain: VerifierChain,
                     counts: dict[str, Any] | None = None) -> Iterator[tuple[str, bytes, str, dict[str, Any], list[Verified]]]:
    """(key, image bytes, ext, pool meta, verified pairs) of proposals folder ``proposer``, in pool order.

    Pool samples without a record (unreadable at propose time) are skipped and counted as
    ``unproposed``; a record whose image is not in those shards fails (the round's files disagree).
    """
    folder = Path(round_dir) / proposals_dir_name(proposer)
    summary = json.loads((folder / SUMMARY).read_text())
    index = ProposalIndex(folder / PROPOSALS)
    counts = counts if counts is not None else {}
    counts.setdefault("unproposed", 0)
    skipped: dict[str, int] = counts.setdefault("skipped", {"samples": 0})
    seen = set()
    for key, data, ext, meta in iter_samples(summary["urls"], skipped):
        if key not in index:
            counts["unproposed"] += 1
            log.warning("pool sample %s has no proposals (it was unreadable when proposing): not written", key)
            continue
        seen.add(key)
        pairs = record_candidates(index.get(key))
        counts["truncated_pairs"] = counts.get("truncated_pairs", 0) + sum(1 for _, dropped in pairs if dropped)
        yield key, data, ext, meta, verify_image(pairs, chain)
    missing = set(index.offsets) - seen
    if missing:
        raise RuntimeError(f"{folder}: proposals for {len(missing)} images not found in its pool shards "
                           f"(e.g. {sorted(missing)[:3]}): the pool changed since proposing; delete the round")


def write_rank(*, round_dir: str | os.PathLike, proposer: int, chain: VerifierChain, miner: HardNegativeMiner,
               max_count: int = 1000, progress: bool = True) -> dict[str, Any]:
    """Verify proposals folder ``proposer`` and write ``shards-rank{proposer}``; returns its summary."""
    counts: dict[str, Any] = {}
    with RoundWriter(round_dir=round_dir, rank=proposer, max_count=max_count) as writer:
        samples = verified_samples(round_dir, proposer, chain, counts)
        bar = tqdm(samples, desc=f"verify+write (proposals {proposer})", unit="img", disable=not progress,
                   dynamic_ncols=True)
        for key, data, ext, meta, pairs in bar:
            negatives = miner(pairs, exclude=labelled_phrases_of(meta))
            writer.write(key=key, image=data, image_ext=ext, base_meta=meta, pairs=pairs, negatives=negatives)
            add_counts(writer.counts, {"review_pairs": sum(1 for v in pairs if v.needs_review)})
            fault_point("write")
        add_counts(writer.counts, {"unproposed": counts["unproposed"], "skipped": counts["skipped"]["samples"],
                                   "truncated_pairs": counts.get("truncated_pairs", 0)})
    return writer.summary
