"""How good a round's pseudo-labels are, measured against labels the engine never saw.

When the pool was cut from a labelled split (the demonstration does this; so can anyone holding out
a labelled sample of their pool), the written shards can be scored against the withheld labels:

    quality = pseudo_label_quality(shard_paths(round_dir, manifest), labelled_urls)
    quality["instances"]   # precision / recall of the kept instances (mask IoU >= 0.5, one-to-one)
    quality["exhaustive"]  # pairs marked exhaustive whose instances are exactly the true ones
    quality["negatives"]   # instance-free exhaustive pairs whose phrase is truly absent

Instances are matched per (image, phrase) pair, greedily in the order written (the writer keeps
them by descending score), each to the unmatched true instance of highest IoU (matching.py).

The verifiers themselves are scored on the proposals, before anything is written, for any chain
(the heuristic one, a learned one: the same proposals, so the two compare directly)::

    q = round_verifier_quality(round_dir, labelled_urls, settings.chain())
    q["mask"]          # precision / recall of the kept proposals as "correct instance" (MV)
    q["exhaustivity"]  # accuracy of the exhaustive verdicts: the kept set covers every true instance (EV)
    q = round_verifier_quality(round_dir, labelled_urls, settings.chain(), miner=settings.negatives)
    q["negatives"]     # the hard negatives mined from those verdicts: how many, how many wrong
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from sam3_train.engine.candidates import masks_of, record_candidates
from sam3_train.engine.learned.chain import bind_round_verifiers, calibrations
from sam3_train.engine.manifest import proposal_dirs
from sam3_train.engine.matching import MATCH_IOU, greedy_match, matched_instances
from sam3_train.engine.proposal_files import ProposalIndex, proposals_file
from sam3_train.engine.sources import read_samples
from sam3_train.engine.verifiers import HardNegativeMiner, VerifierChain, verify_image

NEGATIVE_PRESENCES = (0.05, 0.1, 0.2, 0.3)  # the miner's presence guard, swept by verifier_quality


def _masks(instances: list[dict[str, Any]], height: int, width: int) -> torch.Tensor:
    return masks_of([i["rle"] for i in instances], height, width)


def pseudo_label_quality(written: Iterable[str], labelled: Iterable[str], *, min_iou: float = MATCH_IOU) -> dict[str, Any]:
    """Scores of the pseudo-labelled shards ``written`` against the labelled shards ``labelled``
    (the same images with their true labels; extra labelled images are ignored)."""
    truth = {key: {q["phrase"]: q["instances"] for q in meta["queries"]}
             for key, _, _, meta in read_samples(list(labelled))}
    kept = hits = true_total = 0
    exhaustive = exhaustive_right = negatives = negatives_right = 0
    for key, _, _, meta in read_samples(list(written)):
        if key not in truth:
            raise ValueError(f"written sample {key} has no labelled counterpart in {len(truth)} labelled samples")
        height, width = int(meta["height"]), int(meta["width"])
        for query in meta["queries"]:
            true = truth[key].get(query["phrase"])
            if true is None:
                raise ValueError(f"sample {key}: phrase {query['phrase']!r} is not among its labelled phrases")
            found = matched_instances(_masks(query["instances"], height, width), _masks(true, height, width), min_iou)
            kept, hits, true_total = kept + len(query["instances"]), hits + found, true_total + len(true)
            if query["exhaustive"]:
                exhaustive += 1
                exhaustive_right += int(found == len(query["instances"]) == len(true))
                if not query["instances"]:
                    negatives += 1
                    negatives_right += int(not true)
    share = lambda a, b: round(a / b, 4) if b else None  # noqa: E731
    return {
        "min_iou": min_iou,
        "instances": {"kept": kept, "true": true_total, "matched": hits,
                      "precision": share(hits, kept), "recall": share(hits, true_total)},
        "exhaustive": {"pairs": exhaustive, "right": exhaustive_right, "accuracy": share(exhaustive_right, exhaustive)},
        "negatives": {"pairs": negatives, "right": negatives_right, "accuracy": share(negatives_right, negatives)},
    }


# ------------------------------------------------------------------------------------------ the verifiers themselves
def verifier_quality(*, proposals: Iterable[str | os.PathLike], labelled: Iterable[str], chain: VerifierChain,
                     min_iou: float = MATCH_IOU, max_images: int | None = None,
                     miner: HardNegativeMiner | None = None,
                     max_presences: Iterable[float] = NEGATIVE_PRESENCES) -> dict[str, Any]:
    """How well ``chain`` judges the proposals in the ``proposals-rankNNN`` folders ``proposals``,
    against the withheld labels of the same images (``labelled`` shards: their images feed verifiers
    that look at pixels). Call it once per chain on the same proposals to compare chains (the
    heuristic default and a learned one), e.g. ``round_verifier_quality`` for a round.

    Truth per (image, phrase) pair whose labelled query is exhaustive (other pairs are skipped):
      - mask verification: a proposal is correct when it claims, in score order, an unclaimed true
        instance at mask IoU >= ``min_iou`` (matching.greedy_match). ``mask``: over every
        proposal, the chain's kept ones scored as predictions of "correct" (precision, recall);
        ``reachable`` is the recall of a perfect verifier (true instances some proposal matches).
      - exhaustivity verification: the pair's kept set is complete when it matches every true
        instance one to one at ``min_iou`` (extra masks aside: those are mask verification's errors).
        ``exhaustivity``: accuracy of the chain's exhaustive verdict, and precision / recall of
        "exhaustive".

    ``max_images``: score only the first that many proposed images (in ``labelled`` order): a
    learned chain costs about as much as the write stage per image.

    ``miner``: also score the hard negatives it mines from the chain's verdicts (as the write stage
    does; nothing excluded: the pool holds no instances): ``negatives`` counts the mined phrases and
    the wrong ones (the image has instances of the phrase), for the miner as given and for copies of
    it with each of ``max_presences`` (its guard: the detector's presence probability must stay below
    it) and with ``skip_doubted`` (an exhaustivity verifier's verdict on the empty set as the guard), on the same
    verdicts; ``absent_pairs`` is how many pairs are truly absent (what a perfect miner could draw from);
    ``chain``: the negatives the chain writes without a miner (exhaustive pairs with nothing kept) and
    the wrong ones among them.
    """
    indexes = [ProposalIndex(proposals_file(p)) for p in proposals]
    m = {"proposals": 0, "kept": 0, "correct": 0, "kept_correct": 0, "true": 0}
    e = {"pairs": 0, "right": 0, "said": 0, "said_right": 0, "complete": 0}
    pairs_seen = images = absent_pairs = 0
    miners = {} if miner is None else {"as_given": miner, **{
        f"max_presence {p:g}": HardNegativeMiner(**{**miner.params(), "max_presence": p}) for p in max_presences},
        "skip_doubted": HardNegativeMiner(**{**miner.params(), "skip_doubted": True})}
    mined = {name: {"mined": 0, "wrong": 0} for name in miners}
    own = {"pairs": 0, "wrong": 0}  # the chain's own negatives: exhaustive pairs with nothing kept
    for key, data, _, meta in read_samples(list(labelled)):
        index = next((i for i in indexes if key in i), None)
        if index is None:
            continue
        if max_images is not None and images == max_images:
            break
        images += 1
        height, width = int(meta["height"]), int(meta["width"])
        truth = {q["phrase"]: _masks(q["instances"], height, width) for q in meta["queries"] if q["exhaustive"]}
        pairs = [(c, d) for c, d in record_candidates(index.get(key)) if c.phrase in truth]
        image_verdicts = verify_image(pairs, chain, image=data)
        absent_pairs += sum(len(truth[v.candidate.phrase]) == 0 for v in image_verdicts)
        for name, negative_miner in miners.items():
            for phrase in negative_miner(image_verdicts):
                mined[name]["mined"] += 1
                mined[name]["wrong"] += int(len(truth[phrase]) > 0)
        for verified in image_verdicts:
            c, true = verified.candidate, truth[verified.candidate.phrase]
            pairs_seen += 1
            correct = torch.tensor([j is not None for j in greedy_match(c.masks, true, min_iou)], dtype=torch.bool)
            keep = verified.keep.bool()
            if verified.exhaustive and not bool(keep.any()):
                own["pairs"] += 1
                own["wrong"] += int(len(true) > 0)
            m["proposals"] += c.num_instances
            m["kept"] += int(keep.sum())
            m["correct"] += int(correct.sum())
            m["kept_correct"] += int((keep & correct).sum())
            m["true"] += len(true)
            complete = matched_instances(c.masks[keep], true, min_iou) == len(true)
            e["pairs"] += 1
            e["right"] += int(verified.exhaustive == complete)
            e["said"] += int(verified.exhaustive)
            e["said_right"] += int(verified.exhaustive and complete)
            e["complete"] += int(complete)
    share = lambda a, b: round(a / b, 4) if b else None  # noqa: E731
    negatives = None if miner is None else {
        "absent_pairs": absent_pairs, "chain": {**own, "wrong_share": share(own["wrong"], own["pairs"])},
        **{name: {**n, "wrong_share": share(n["wrong"], n["mined"])} for name, n in mined.items()}}
    return {
        "min_iou": min_iou, "images": images, "pairs": pairs_seen, "verifiers": chain.names, "negatives": negatives,
        "mask": {**m, "precision": share(m["kept_correct"], m["kept"]),
                 "recall": share(m["kept_correct"], m["correct"]), "reachable": share(m["correct"], m["true"])},
        "exhaustivity": {**e, "accuracy": share(e["right"], e["pairs"]), "precision": share(e["said_right"], e["said"]),
                         "recall": share(e["said_right"], e["complete"])},
    }


def round_verifier_quality(round_dir: str | os.PathLike, labelled: Iterable[str], chain: VerifierChain,
                           *, min_iou: float = MATCH_IOU, max_images: int | None = None,
                           miner: HardNegativeMiner | None = None) -> dict[str, Any]:
    """:func:`verifier_quality` of ``chain`` (and ``miner``) on a round's pool proposals (its learned
    verifiers without a checkpoint bound to the ones the round trained)."""
    round_dir = Path(round_dir)
    if chain.needs_image:
        bind_round_verifiers(chain, round_dir)
    quality = verifier_quality(proposals=proposal_dirs(round_dir), labelled=labelled, chain=chain, min_iou=min_iou,
                               max_images=max_images, miner=miner)
    return {**quality, "calibration": calibrations(chain)}
