"""Verified candidates -> pseudo-labelled samples -> one folder of shards per proposer, renamed when complete.

For proposals folder ``k`` (written by rank k of the propose step) :func:`write_rank` walks the pool
shards that rank read, in order; each image's candidates go through the verifier chain, hard
negatives are mined among its phrases, and :class:`RoundWriter` writes the image with its
pseudo-labelled queries (:func:`pseudo_sample`) into ``shards-rank{k}``. The output depends only on
the proposals, the pool and the settings, never on how many processes write it or whether an
earlier attempt died::

    round_dir/shards-rank000.tmp/     while it is written: pseudo-000000.tar ..., summary.json
    round_dir/shards-rank000/         the same folder after one atomic rename (atomic.replace_dir)
    round_dir/manifest.json           see manifest.py

A writer that dies leaves only ``*.tmp`` (never a visible, half-written shard); the next run removes
it and writes again. Shard bytes depend only on the samples written and their order (ShardSink fixes
member times; json keys are sorted), so a re-run is byte-identical.

    with RoundWriter(round_dir=d, rank=k) as writer:
        for key, image, ext, base_meta, pairs in verified_samples(d, k, chain):  # pairs: list[Verified]
            writer.write(key=key, image=image, image_ext=ext, base_meta=base_meta, pairs=pairs,
                         negatives=miner(pairs))
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Self

import numpy as np
from tqdm import tqdm

from sam3_train.atomic import replace_dir, write_json_atomic
from sam3_train.data import rle as rle_ops
from sam3_train.data.schema import query, validate_meta
from sam3_train.data.shards import DEFAULT_MAX_COUNT, DEFAULT_MAX_SIZE, ShardSink
from sam3_train.engine.candidates import Candidate, record_candidates
from sam3_train.engine.manifest import (
    SUMMARY,
    TMP_SUFFIX,
    add_counts,
    empty_counts,
    fault_point,
    file_sha256,
    proposals_dir_name,
    shards_dir_name,
)
from sam3_train.engine.proposal_files import ProposalIndex, proposals_file
from sam3_train.engine.sources import read_samples
from sam3_train.engine.verifiers import (
    ExhaustivityVerifier,
    FlipConsistencyVerifier,
    HardNegativeMiner,
    ScoreVerifier,
    StabilityVerifier,
    Verified,
    Verifier,
    VerifierChain,
    phrases_with_instances,
    verify_image,
)

log = logging.getLogger(__name__)


def instance_entry(candidate: Candidate, index: int) -> dict[str, Any] | None:
    """Schema instance ``{"box", "rle"}`` of one candidate instance (None when its mask is empty).

    The mask at logit 0 as RLE, and its tight bounding box (xywh pixels, the pixel grid's edges:
    a one-pixel mask is a 1 x 1 box). Not the model's box: a from-scratch model's box head can sit far
    from its own mask (issue 24: median IoU 0.04 between the two on the main job's model), and a
    pseudo-label whose box and mask disagree teaches the next round a box unrelated to its mask.
    SA-Co's human boxes are derived from the masks the same way. ``BoxMaskVerifier`` rejects the
    instances whose model box disagrees with the mask, where that disagreement should cost the instance.
    Review export uses the same entries, so an unedited review round-trips exactly.
    """
    mask = candidate.masks[index].numpy()
    if not mask.any():
        return None
    rle = rle_ops.encode(mask.astype(np.uint8))
    return {"box": rle_ops.to_xywh(rle), "rle": rle}


def pseudo_sample(
    base_meta: dict[str, Any], pairs: Iterable[Verified], *, negatives: Iterable[str] = ()
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One image's pseudo-labelled meta (schema.py) and its counts.

    Each pair becomes a query, sorted by phrase: its kept instances (:func:`instance_entry`) with the
    chain's exhaustivity; a phrase in ``negatives`` becomes a negative query (``exhaustive: true``,
    no instances). A kept instance with an empty mask is not written, is counted as
    ``empty_masks`` and makes its pair non-exhaustive (the model saw something there).
    ``base_meta`` gives image_id, width, height and source; its queries are replaced.
    """
    negatives = set(negatives)
    counts = empty_counts()
    queries, seen = [], set()
    width, height = int(base_meta["width"]), int(base_meta["height"])
    for v in sorted(pairs, key=lambda v: v.candidate.phrase):
        c = v.candidate
        if c.phrase in seen:
            raise ValueError(f"sample {c.key}: phrase {c.phrase!r} verified twice")
        if (c.height, c.width) != (height, width):
            raise ValueError(f"sample {c.key}: candidate is {c.width}x{c.height}, the image {width}x{height}")
        seen.add(c.phrase)
        add_counts(counts, {"pairs": 1, "kept": v.kept, "rejected": v.rejected})
        if c.phrase in negatives:
            if bool(v.keep.any()):
                raise ValueError(f"sample {c.key}: {c.phrase!r} is a mined negative but has kept instances")
            queries.append(query(c.phrase, [], exhaustive=True))
            add_counts(counts, {"negatives_mined": 1, "exhaustive_pairs": 1})
            continue
        entries = [instance_entry(c, i) for i in v.keep.nonzero().flatten().tolist()]
        instances = [e for e in entries if e is not None]
        empty = len(entries) - len(instances)
        exhaustive = v.exhaustive and not empty
        queries.append(query(c.phrase, instances, exhaustive=exhaustive))
        add_counts(counts, {"instances": len(instances), "exhaustive_pairs": int(exhaustive), "empty_masks": empty})
    unknown = negatives - seen
    if unknown:
        raise ValueError(f"negatives {sorted(unknown)} are not among the verified phrases")
    meta = {k: base_meta[k] for k in ("image_id", "width", "height") if k in base_meta}
    meta["queries"] = queries
    meta["source"] = base_meta.get("source", {})
    counts["samples"] = 1
    return validate_meta(meta), counts


class RoundWriter:
    """Writes one rank's pseudo-labelled samples into ``round_dir/shards-rankNNN.tmp`` and renames the
    folder to ``shards-rankNNN`` on a clean exit (see the module docstring).

    Args:
        round_dir: the round's directory.
        rank: this process's global rank.
        prefix: shard file prefix (no dots or slashes).
        max_count, max_size: samples / bytes per shard (ShardSink).
    """

    def __init__(self, *, round_dir: str | os.PathLike, rank: int = 0, prefix: str = "pseudo",
                 max_count: int = DEFAULT_MAX_COUNT, max_size: int = DEFAULT_MAX_SIZE):
        self.round_dir = Path(round_dir)
        self.rank = rank
        self.final_dir = self.round_dir / shards_dir_name(rank)
        self.tmp_dir = self.round_dir / (shards_dir_name(rank) + TMP_SUFFIX)
        if self.tmp_dir.exists():  # left by a run that died: its content is incomplete by definition
            shutil.rmtree(self.tmp_dir)
        self._sink = ShardSink(out_dir=self.tmp_dir, prefix=prefix, max_count=max_count, max_size=max_size)
        self.counts = empty_counts()
        self.summary: dict[str, Any] | None = None  # set by commit()
        self._done = False

    def write(self, *, key: str, image: bytes, image_ext: str, base_meta: dict[str, Any],
              pairs: Iterable[Verified], negatives: Iterable[str] = ()) -> dict[str, Any]:
        """Write one image with its verified pairs; returns the meta written."""
        pairs = list(pairs)
        for v in pairs:
            if v.candidate.key != key:
                raise ValueError(f"pair {v.candidate.phrase!r} belongs to {v.candidate.key}, not to {key}")
        meta, counts = pseudo_sample(base_meta, pairs, negatives=negatives)
        # Sorted keys: the bytes must not depend on how a dict happened to be built.
        self._sink.write(key, image, image_ext, json.loads(json.dumps(meta, sort_keys=True)))
        add_counts(self.counts, counts)
        return meta

    def commit(self) -> dict[str, Any]:
        """Close the shards, write the rank summary, rename the folder into place; returns the summary."""
        if self._done:
            raise RuntimeError(f"{self.final_dir} was already committed or aborted")
        self._done = True
        self._sink.close()
        shards = sorted(p.name for p in self.tmp_dir.glob("*.tar"))
        summary = {
            "rank": self.rank,
            "counts": self.counts,
            "shards": [{"path": f"{shards_dir_name(self.rank)}/{name}", "size": (self.tmp_dir / name).stat().st_size,
                        "sha256": file_sha256(self.tmp_dir / name)} for name in shards],
        }
        write_json_atomic(self.tmp_dir / SUMMARY, summary)
        if self.final_dir.exists():  # a complete folder from an earlier, unfinished run: replaced whole
            shutil.rmtree(self.final_dir)
        replace_dir(self.tmp_dir, self.final_dir)
        self.summary = summary
        return summary

    def abort(self) -> None:
        """Stop without publishing anything (the ``.tmp`` folder stays for the cleanup to remove)."""
        self._done = True
        self._sink.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._done:
            return
        if exc_type is None:
            self.commit()
        else:
            self.abort()


# ------------------------------------------------------------------------------------------ one proposer
# Verifiers whose verdict on an instance depends on that instance's own masks and scores alone, with
# no pair-level opinion drawn from masks: behind a score gate they never need a rejected instance's
# pixels. (The exact classes: a subclass may judge otherwise.)
_PER_INSTANCE = (StabilityVerifier, FlipConsistencyVerifier, ExhaustivityVerifier)


def score_gate(chain: VerifierChain) -> Verifier | None:
    """The chain's first verifier when it is a :class:`ScoreVerifier` and every later one is in
    ``_PER_INSTANCE``; else None.

    An instance the gate rejects is dead before any check reads pixels, and the chain counts later
    verdicts only on live instances, so its masks need never be decoded (95% of the candidates of
    the demonstration's round 1). Other chains (e.g. a learned exhaustivity check that looks at the
    rejected masks too) decode every mask a check reads.
    """
    first, *rest = chain.verifiers or [None]
    if type(first) is ScoreVerifier and all(type(v) in _PER_INSTANCE for v in rest):
        return first
    return None


def verified_samples(round_dir: str | os.PathLike, proposer: int, chain: VerifierChain,
                     counts: dict[str, Any] | None = None
                     ) -> Iterator[tuple[str, bytes, str, dict[str, Any], list[Verified]]]:
    """(key, image bytes, ext, pool meta, verified pairs) of proposals folder ``proposer``, in pool order.

    Pool samples without a record (unreadable at propose time) are skipped and counted as
    ``unproposed``; a record whose image is not in those shards fails (the round's files disagree).
    Masks are decoded when a check or the writer first reads them, and never for the instances a
    :func:`score_gate` rejects.
    """
    folder = Path(round_dir) / proposals_dir_name(proposer)
    summary = json.loads((folder / SUMMARY).read_text())
    index = ProposalIndex(proposals_file(folder))
    gate = score_gate(chain)
    counts = counts if counts is not None else {}
    counts.setdefault("unproposed", 0)
    skipped: dict[str, int] = counts.setdefault("skipped", {"samples": 0})
    seen = set()
    for key, data, ext, meta in read_samples(summary["urls"], strict=False, skipped=skipped):
        if key not in index:
            counts["unproposed"] += 1
            log.warning("pool sample %s has no proposals (it was unreadable when proposing): not written", key)
            continue
        seen.add(key)
        pairs = record_candidates(index.get(key), source=str(index.path))
        if gate is not None:
            for candidate, _ in pairs:
                candidate.limit_decoding(gate(candidate).keep)
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
            negatives = miner(pairs, exclude=phrases_with_instances(meta))
            writer.write(key=key, image=data, image_ext=ext, base_meta=meta, pairs=pairs, negatives=negatives)
            add_counts(writer.counts, {"review_pairs": sum(1 for v in pairs if v.needs_review)})
            fault_point("write")
        add_counts(writer.counts, {"unproposed": counts["unproposed"], "skipped": counts["skipped"]["samples"],
                                   "truncated_pairs": counts.get("truncated_pairs", 0)})
    return writer.summary
