"""Training examples for the learned verifiers, made without a person: the current model's proposals
on labelled images, judged against the labels (and against a person's corrections where a round
was reviewed).

    counts = make_examples(out_dir=d, labelled=labelled_urls, proposals=[".../proposals-rank000"],
                           reviewed_rounds=["runs/engine/round-001"])
    rows = load_examples(d / "mv-examples.pt")    # what VerifierData (data.py) trains on

    examples = Examples("mask")                   # rows collected by hand (e.g. a crafted test set)
    examples.add(mask_pixels(image, masks), mask_stats(masks), [1.0, 0.0], key="k", phrase="cat", source="mine")
    examples.write(path)

Mask verification (one row per instance, label 1 = accept):
  - proposals: in score order, a proposal that overlaps a ground-truth instance of its phrase not yet
    claimed by a higher-scored one at mask IoU >= ``accept_iou`` is accepted and claims it (matching.py,
    the audit's matcher); the rest are rejected, at most ``max_rejects_per_pair`` per pair (the
    highest-scored: the hard ones). A query that is not exhaustive gives no rejections (an unmatched
    proposal may be an unlabelled instance).
  - ground truth (``perturb``): every instance is accepted as it is; shifted (by 60% of its extent)
    and eroded (by a quarter of its shorter side) copies are rejected when their IoU with every true
    instance stays below ``accept_iou``, merged ones (with the nearest other instance) always.
    Compromise: a merged mask of two instances has IoU >= 0.5 with the larger one, so the IoU rule
    that labels proposals would accept it; here it is a reject, as SAM 3's MV would judge it.
Exhaustivity verification (one row per (image, phrase, set), label 1 = the set covers every true
instance one to one at ``accept_iou``), exhaustive queries only:
  - proposals: the matched set, and the sets kept at scores >= 0.3, 0.5 and 0.7 (each once);
  - ground truth (``perturb``): the true set (1) and the true set less one instance (0).
Rows made from ground truth carry no detector statistics (``evidence`` 0, features.py);
accepted and rejected ones come in pairs, so the flag alone predicts nothing.

Files are written once, atomically (``sam3_train.atomic``): the engine's verifiers stage skips this
step when both exist. Every random choice is seeded by (seed, key, phrase): the rows do not depend
on the order or number of images read before.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sam3_train.atomic import atomic_path
from sam3_train.engine.candidates import Candidate, masks_of, record_candidates
from sam3_train.engine.learned.features import mask_pixels, mask_stats, set_inputs
from sam3_train.engine.learned.nets import CHANNELS
from sam3_train.engine.manifest import EXAMPLES_FILES, WRITTEN, proposal_dirs, read_json, shard_paths
from sam3_train.engine.matching import greedy_match, matched_instances
from sam3_train.engine.proposal_files import ProposalIndex, proposals_file
from sam3_train.engine.sources import read_samples
from sam3_train.engine.verifiers import image_tensor
from sam3_train.metrics.iou import mask_iou

EXAMPLES_FORMAT = 1
SET_THRESHOLDS = (0.3, 0.5, 0.7)
Truth = dict[str, tuple[torch.Tensor, bool]]  # phrase -> (true masks [m, H, W] bool, exhaustive)


def perturbations(truth: torch.Tensor, rng: random.Random) -> list[tuple[str, torch.Tensor]]:
    """Wrong masks made from each true instance of [m, H, W]: shifted, eroded, merged (see the module docstring)."""
    out = []
    height, width = truth.shape[1:]
    for i, mask in enumerate(truth):
        ys, xs = mask.nonzero(as_tuple=True)
        if len(xs) == 0:
            continue
        h, w = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
        sign = rng.choice((-1, 1))
        dy, dx = (round(0.6 * h) * sign, 0) if rng.random() < 0.5 else (0, round(0.6 * w) * sign)
        shifted = torch.zeros_like(mask)
        src = mask[max(0, -dy): height - max(0, dy), max(0, -dx): width - max(0, dx)]
        shifted[max(0, dy): max(0, dy) + src.shape[0], max(0, dx): max(0, dx) + src.shape[1]] = src
        out.append(("shifted", shifted))
        r = max(1, min(h, w) // 4)
        eroded = -F.max_pool2d(-mask[None, None].float(), 2 * r + 1, stride=1, padding=r)[0, 0] > 0.5
        out.append(("eroded", eroded))
        if len(truth) > 1:
            others = [j for j in range(len(truth)) if j != i]
            centre = torch.stack([ys.float().mean(), xs.float().mean()])
            def distance(j: int) -> float:
                yj, xj = truth[j].nonzero(as_tuple=True)
                return float((torch.stack([yj.float().mean(), xj.float().mean()]) - centre).norm()) if len(xj) else 1e9
            out.append(("merged", mask | truth[min(others, key=distance)]))
    return out


class Examples:
    """Rows of one kind (``mask`` / ``exhaustivity``) being collected, then written as one examples file.

    Attributes (parallel lists, one entry per :meth:`add`, or per row): pixels ([n, C, S, S] uint8 per
    add), stats ([n, k] float per add), labels (1.0 accept / exhaustive, 0.0 reject), phrases, keys
    (sample keys: VerifierData splits by them), sources (where a row came from, e.g.
    ``labelled/proposals``).
    """

    def __init__(self, kind: str):
        if kind not in CHANNELS:
            raise ValueError(f"Examples.kind must be one of {sorted(CHANNELS)}, got {kind!r}")
        self.kind, self.pixels, self.stats, self.labels = kind, [], [], []
        self.phrases, self.keys, self.sources = [], [], []

    def add(self, pixels: torch.Tensor, stats: torch.Tensor, labels: list[float], *, key: str, phrase: str,
            source: str) -> None:
        """Add ``len(labels)`` rows: ``pixels`` [n, C, S, S] uint8 and ``stats`` [n, k] of one image and phrase."""
        if len(labels):
            self.pixels.append(pixels)
            self.stats.append(stats)
            self.labels += labels
            self.phrases += [phrase] * len(labels)
            self.keys += [key] * len(labels)
            self.sources += [source] * len(labels)

    def counts(self) -> dict[str, Any]:
        """``{"rows", "accept", "by_source": {source: {"accept", "reject"}}}``."""
        by_source: dict[str, dict[str, int]] = {}
        for source, label in zip(self.sources, self.labels):
            entry = by_source.setdefault(source, {"accept": 0, "reject": 0})
            entry["accept" if label else "reject"] += 1
        return {"rows": len(self.labels), "accept": int(sum(self.labels)), "by_source": by_source}

    def write(self, path: str | os.PathLike) -> None:
        """The examples file (:func:`load_examples` reads it), written atomically."""
        empty = (0, CHANNELS[self.kind])
        rows = {"format": EXAMPLES_FORMAT, "kind": self.kind,
                "pixels": torch.cat(self.pixels) if self.pixels else torch.zeros(*empty, 1, 1, dtype=torch.uint8),
                "stats": torch.cat(self.stats) if self.stats else torch.zeros(0, 1),
                "labels": torch.tensor(self.labels, dtype=torch.float32), "phrases": self.phrases,
                "keys": self.keys, "sources": self.sources}
        with atomic_path(path) as partial:
            torch.save(rows, partial)


def load_examples(path: str | os.PathLike) -> dict[str, Any]:
    """An examples file (:meth:`Examples.write`): ``{"format", "kind", "pixels", "stats", "labels",
    "phrases", "keys", "sources"}``; loaded without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verifier examples {path} do not exist; make them with "
                                "learned.make_examples or the engine's verifiers stage")
    examples = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(examples, dict) or examples.get("format") != EXAMPLES_FORMAT:
        raise ValueError(f"{path} is not a verifier examples file (format {EXAMPLES_FORMAT})")
    return examples


def image_examples(mv: Examples, ev: Examples, *, key: str, image: torch.Tensor, truth: Truth,
                   candidates: dict[str, Candidate], source: str, accept_iou: float = 0.5, min_score: float = 0.05,
                   max_rejects_per_pair: int = 10, perturb: bool = True, seed: int = 0) -> None:
    """Add one image's MV and EV rows (see the module docstring) to ``mv`` and ``ev``."""
    for phrase in sorted(truth):
        true, exhaustive = truth[phrase]
        rng = random.Random(f"{seed}/{key}/{phrase}")
        c = candidates.get(phrase)
        if c is not None and c.num_instances:
            keep = c.scores >= min_score
            idx = keep.nonzero().flatten()
            masks, scores = c.masks[idx], c.scores[idx]
            claimed = greedy_match(masks, true, accept_iou)
            stats = mask_stats(masks, scores=scores, presence=c.presence, loose=c.masks_loose[idx],
                               tight=c.masks_tight[idx], flip=None if c.flip_masks is None else c.flip_masks[idx])
            rejects = [i for i, j in enumerate(claimed) if j is None][:max_rejects_per_pair] if exhaustive else []
            rows = [i for i, j in enumerate(claimed) if j is not None] + rejects
            rows.sort()
            chosen = torch.tensor(rows, dtype=torch.long)
            mv.add(mask_pixels(image, masks[chosen]), stats[chosen], [float(claimed[i] is not None) for i in rows],
                   key=key, phrase=phrase, source=f"{source}/proposals")
            if exhaustive:
                sets = {tuple(i for i, j in enumerate(claimed) if j is not None)}
                sets.update(tuple((scores >= t).nonzero().flatten().tolist()) for t in SET_THRESHOLDS)
                for members in sorted(sets):
                    inside = torch.zeros(len(masks), dtype=torch.bool)
                    inside[list(members)] = True
                    pixels, set_stats = set_inputs(image, masks[inside], masks[~inside], scores_in=scores[inside],
                                                   scores_out=scores[~inside], presence=c.presence)
                    label = float(matched_instances(masks[inside], true, accept_iou) == len(true))
                    ev.add(pixels[None], set_stats[None], [label], key=key, phrase=phrase, source=f"{source}/proposals")
        if not perturb:
            continue
        # A merged mask always is one (two instances are never one); the others only when clearly off.
        wrong = [m for how, m in perturbations(true, rng)
                 if m.any() and (how == "merged" or float(mask_iou(m[None], true).max()) < accept_iou)]
        masks = torch.cat([true, torch.stack(wrong)]) if wrong else true
        # each row judged alone (no higher-scored neighbours): duplicate IoU 0 for all
        stats = torch.cat([mask_stats(m[None]) for m in masks]) if len(masks) else mask_stats(masks)
        mv.add(mask_pixels(image, masks), stats, [1.0] * len(true) + [0.0] * len(wrong), key=key, phrase=phrase,
               source=f"{source}/ground_truth")
        if exhaustive:
            empty = true[:0]
            pixels, set_stats = set_inputs(image, true, empty)
            ev.add(pixels[None], set_stats[None], [1.0], key=key, phrase=phrase, source=f"{source}/ground_truth")
            if len(true):
                less = torch.ones(len(true), dtype=torch.bool)
                less[rng.randrange(len(true))] = False
                pixels, set_stats = set_inputs(image, true[less], empty)
                ev.add(pixels[None], set_stats[None], [0.0], key=key, phrase=phrase, source=f"{source}/ground_truth")


def _truth(meta: dict[str, Any], phrases: Iterable[str] | None = None) -> Truth:
    height, width = int(meta["height"]), int(meta["width"])
    wanted = None if phrases is None else set(phrases)
    return {q["phrase"]: (masks_of([i["rle"] for i in q["instances"]], height, width), bool(q.get("exhaustive", True)))
            for q in meta["queries"] if wanted is None or q["phrase"] in wanted}


def reviewed_pairs(round_dir: str | os.PathLike) -> dict[str, list[str]]:
    """``{sample key: [phrases]}`` a person changed in a round's imported reviews (shards.json's ``reviews``)."""
    written = read_json(Path(round_dir) / WRITTEN) or {}
    pairs: dict[str, set[str]] = {}
    for review in written.get("reviews", []):
        for key, phrase in review["changed"]:
            pairs.setdefault(key, set()).add(phrase)
    return {k: sorted(v) for k, v in sorted(pairs.items())}


def make_examples(*, out_dir: str | os.PathLike, labelled: list[str], proposals: Iterable[str | os.PathLike],
                  reviewed_rounds: Iterable[str | os.PathLike] = (), accept_iou: float = 0.5,
                  min_score: float = 0.05, max_rejects_per_pair: int = 10, perturb: bool = True,
                  seed: int = 0) -> dict[str, Any]:
    """Write ``out_dir/mv-examples.pt`` and ``ev-examples.pt`` (manifest.EXAMPLES_FILES); returns their
    counts per label and source.

    Args:
        labelled: labelled shards (their queries are the truth).
        proposals: ``proposals-rankNNN`` folders of the current model on (some of) those images; an
            image without proposals gives ground-truth rows only.
        reviewed_rounds: round directories whose imported reviews add the pairs a person changed
            (truth: the reviewed shards; proposals: the round's own).
        accept_iou, min_score, max_rejects_per_pair, perturb, seed: see the module docstring.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    indexes = [ProposalIndex(proposals_file(p)) for p in proposals]
    mv, ev = Examples("mask"), Examples("exhaustivity")
    settings = dict(accept_iou=accept_iou, min_score=min_score, max_rejects_per_pair=max_rejects_per_pair, seed=seed)

    def candidates(key: str, found: list[ProposalIndex]) -> dict[str, Candidate]:
        index = next((i for i in found if key in i), None)
        return {} if index is None else {c.phrase: c for c, _ in record_candidates(index.get(key))}

    for key, data, _, meta in read_samples(list(labelled), strict=False):
        image_examples(mv, ev, key=key, image=image_tensor(data), truth=_truth(meta),
                       candidates=candidates(key, indexes), source="labelled", perturb=perturb, **settings)
    for round_dir in reviewed_rounds:
        round_dir = Path(round_dir)
        pairs, written = reviewed_pairs(round_dir), read_json(round_dir / WRITTEN)
        if not pairs:
            continue
        found = [ProposalIndex(proposals_file(p)) for p in proposal_dirs(round_dir)]
        for key, data, _, meta in read_samples(shard_paths(round_dir, written), strict=False):
            if key in pairs:
                image_examples(mv, ev, key=key, image=image_tensor(data), truth=_truth(meta, pairs[key]),
                               candidates=candidates(key, found), source="review", perturb=perturb, **settings)
    ev.write(out / EXAMPLES_FILES["exhaustivity"])
    mv.write(out / EXAMPLES_FILES["mask"])  # last: its presence says both are complete
    return {"mask": mv.counts(), "exhaustivity": ev.counts()}
