"""Data engine: candidate records, each verifier on crafted predictions, the chain's counts, hard negatives."""

from __future__ import annotations

import pytest
import torch
from conftest import EngineFrame

from sam3_train.engine import (
    BoxMaskVerifier,
    ExhaustivityVerifier,
    FlipConsistencyVerifier,
    HardNegativeMiner,
    InstancesOnly,
    ScoreVerifier,
    StabilityVerifier,
    VerifierChain,
    candidate_from_logits,
)
from sam3_train.engine.verifiers import verify_image
from sam3_train.metrics.iou import mask_iou, rowwise_mask_iou

pytestmark = pytest.mark.usefixtures("one_thread")
H, W = 12, 16
FRAME = EngineFrame(H, W)
box_mask, candidate = FRAME.box_mask, FRAME.candidate


def test_rowwise_mask_iou_hand_computed_and_empty_is_zero():
    a = torch.stack([box_mask(0, 0, 4, 4), box_mask(0, 0, 4, 4), torch.zeros(H, W, dtype=torch.bool)])
    b = torch.stack([box_mask(0, 0, 4, 4), box_mask(2, 0, 6, 4), torch.zeros(H, W, dtype=torch.bool)])
    assert rowwise_mask_iou(a, b).tolist() == pytest.approx([1.0, 8 / 24, 0.0])


def test_rowwise_mask_iou_is_the_diagonal_of_the_pairwise_one():
    """The verifiers' row-wise IoU (int32 sums, float32) and the pairwise one of cgF1 and flip matching
    (pycocotools' arithmetic) agree on every pair of rows, empty masks included."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(6, H, W, generator=gen) > 0.6, torch.rand(6, H, W, generator=gen) > 0.4
    a[0], b[0], b[1] = False, False, False  # both empty; one empty
    pairwise = mask_iou(a, b)
    assert pairwise.shape == (6, 6) and pairwise.dtype == torch.float64
    assert torch.equal(rowwise_mask_iou(a, b), pairwise.diagonal().float())


def test_score_verifier_drops_low_scores():
    c = candidate([0.8, 0.5, 0.49], [box_mask(0, 0, 4, 4)] * 3)
    assert ScoreVerifier(min_score=0.5)(c).keep.tolist() == [True, True, False]


def test_stability_rejects_masks_that_move_with_the_threshold():
    core = box_mask(0, 0, 4, 4)  # 16 px
    unstable_loose = box_mask(0, 0, 5, 5)  # 25 px: IoU 16 / 25 = 0.64
    stable_loose = core.clone()
    stable_loose[4, 0] = True  # 17 px: IoU 16 / 17 = 0.94
    empty = torch.zeros(H, W, dtype=torch.bool)
    c = candidate([0.9, 0.9, 0.9], [core, core, empty], loose=[unstable_loose, stable_loose, empty],
                  tight=[core, core, empty])
    assert StabilityVerifier(min_iou=0.8)(c).keep.tolist() == [False, True, False]
    assert StabilityVerifier(min_iou=0.6)(c).keep.tolist() == [True, True, False]


def test_box_mask_verifier_rejects_boxes_away_from_their_own_mask():
    mask = box_mask(0, 0, 4, 4)  # 16 px, tight box (0, 0, 4, 4)
    empty = torch.zeros(H, W, dtype=torch.bool)
    c = candidate([0.9, 0.9, 0.9, 0.9], [mask, mask, mask, empty])
    c.boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0],     # the mask's own box: IoU 1
                            [2.0, 0.0, 6.0, 4.0],     # shifted by half: 8 / 24 = 0.33
                            [0.0, 0.0, 4.0, 8.0],     # twice as tall: 16 / 32 = 0.5
                            [0.0, 0.0, 4.0, 4.0]])    # an empty mask: nothing to agree with
    assert BoxMaskVerifier(min_iou=0.5)(c).keep.tolist() == [True, False, True, False]
    assert BoxMaskVerifier(min_iou=0.3)(c).keep.tolist() == [True, True, True, False]
    none = candidate([], [])
    assert BoxMaskVerifier()(none).keep.shape == (0,)


def test_flip_consistency_rejects_masks_the_flipped_run_disagrees_with():
    a, b = box_mask(0, 0, 4, 4), box_mask(8, 0, 12, 4)
    c = candidate([0.9, 0.9], [a, b], flip=[box_mask(0, 0, 4, 3), box_mask(10, 0, 14, 4)])  # IoU 0.75, 1/3
    assert FlipConsistencyVerifier(min_iou=0.7)(c).keep.tolist() == [True, False]
    with pytest.raises(ValueError, match="flip_masks"):
        FlipConsistencyVerifier(min_iou=0.7)(candidate([0.9], [a], flip=False))


def test_exhaustivity_only_for_confident_sets():
    m = box_mask(0, 0, 4, 4)
    v = ExhaustivityVerifier(low=0.2, high=0.7)
    confident = v(candidate([0.95, 0.7, 0.2, 0.01], [m] * 4))  # band is open: 0.7 and 0.2 are outside
    assert confident.exhaustive is True and not confident.flags
    uncertain = v(candidate([0.95, 0.45, 0.01], [m] * 3))
    assert uncertain.exhaustive is False and uncertain.flags
    assert v(candidate([], [])).exhaustive is True  # nothing proposed at all: confidently absent
    with pytest.raises(ValueError):
        ExhaustivityVerifier(low=0.7, high=0.2)


def chain() -> VerifierChain:
    return VerifierChain(verifiers=[ScoreVerifier(min_score=0.5), StabilityVerifier(min_iou=0.8),
                                    FlipConsistencyVerifier(min_iou=0.7), ExhaustivityVerifier(low=0.2, high=0.7)])


def test_chain_counts_add_up_and_mask_rejections_make_a_pair_non_exhaustive():
    good, other = box_mask(0, 0, 4, 4), box_mask(8, 4, 12, 8)
    c = candidate([0.9, 0.85, 0.8, 0.05], [good, other, good, good],
                  loose=[good, box_mask(7, 3, 13, 9), good, good],  # instance 1 unstable (16 / 36)
                  flip=[good, other, torch.zeros(H, W, dtype=torch.bool), good])  # instance 2 flip-inconsistent
    v = chain()(c)
    assert v.keep.tolist() == [True, False, False, False]
    assert v.rejected_by == [None, "stability", "flip", "score"]
    assert v.rejected == {"score": 1, "stability": 1, "flip": 1, "exhaustivity": 0}
    assert v.kept == {"score": 3, "stability": 2, "flip": 1, "exhaustivity": 1}
    assert sum(v.rejected.values()) + int(v.keep.sum()) == c.num_instances
    assert v.exhaustive is False and v.needs_review  # a believed instance was dropped for its mask
    assert v.doubted_by == ()  # ... which no verifier judged incomplete (scores 0.9, 0.85, 0.8, 0.05: no doubt)
    clean = chain()(candidate([0.9, 0.05], [good, other]))
    assert clean.exhaustive is True and not clean.needs_review and clean.keep.tolist() == [True, False]
    doubted = chain()(candidate([0.9, 0.45], [good, other]))  # 0.45 in the exhaustivity band
    assert doubted.exhaustive is False and doubted.doubted_by == ("exhaustivity",)
    # detections cut at max_detections: more may be missing, a doubt too (and a review flag)
    (cut,) = verify_image([(candidate([0.9, 0.05], [good, other]), 3)], chain())
    assert cut.exhaustive is False and cut.doubted_by == ("propose",) and cut.needs_review
    assert chain().thresholds()["stability"] == {"min_iou": 0.8}
    with pytest.raises(ValueError, match="unique"):
        VerifierChain(verifiers=[ScoreVerifier(), ScoreVerifier()])


def test_candidate_from_logits_sorts_thresholds_and_matches_flip_masks():
    def logits(mask: torch.Tensor, edge: float = 0.5) -> torch.Tensor:
        # +3 inside, -3 outside, `edge` on a one-pixel ring just outside: loose differs from tight there
        ring = box_mask(0, 0, W, H) & ~mask
        out = torch.where(mask, torch.tensor(3.0), torch.tensor(-3.0))
        grown = torch.nn.functional.max_pool2d(mask[None, None].float(), 3, 1, 1)[0, 0].bool()
        return torch.where(grown & ring, torch.tensor(edge), out)

    a, b = box_mask(1, 1, 4, 4), box_mask(9, 5, 13, 9)
    c = candidate_from_logits(key="k", phrase="star", presence=0.8, scores=torch.tensor([0.3, 0.9]),
                              boxes=torch.tensor([[1.0, 1, 4, 4], [9, 5, 13, 9]]),
                              mask_logits=torch.stack([logits(a), logits(b, edge=-0.5)]),
                              flip_mask_logits=torch.stack([logits(a), logits(b)]))  # flip run's order kept
    assert c.scores.tolist() == pytest.approx([0.9, 0.3])
    assert torch.equal(c.boxes[0], torch.tensor([9.0, 5, 13, 9]))
    assert (c.masks_tight <= c.masks).all() and (c.masks <= c.masks_loose).all()
    assert torch.equal(c.masks_tight[0], b) and torch.equal(c.masks[0], b) and not torch.equal(c.masks_loose[0], b)
    assert torch.equal(c.masks[1], box_mask(0, 0, 5, 5))  # the 0.5 ring is in the 0-logit mask
    # flip masks follow the instances after sorting (the flip run lists a first): b's flip mask has
    # the +0.5 ring (36 px against 16), a's is its own mask
    assert rowwise_mask_iou(c.masks, c.flip_masks).tolist() == pytest.approx([16 / 36, 1.0])


def pair(phrase, scores, *, presence, keep_min=0.5):
    c = candidate(scores, [box_mask(0, 0, 4, 4)] * len(scores), presence=presence, phrase=phrase)
    return VerifierChain(verifiers=[ScoreVerifier(min_score=keep_min)])(c)


def test_instances_only_writes_the_kept_instances_and_no_pair_exhaustive():
    from sam3_train.engine import pseudo_sample

    good, other = box_mask(0, 0, 4, 4), box_mask(8, 4, 12, 8)
    strict = VerifierChain(verifiers=[ScoreVerifier(min_score=0.5), InstancesOnly()])
    kept = strict(candidate([0.9, 0.8, 0.05], [good, other, good]))
    assert kept.keep.tolist() == [True, True, False] and kept.exhaustive is False
    assert kept.doubted_by == ("instances_only",) and kept.rejected == {"score": 1, "instances_only": 0}
    clean = chain()(candidate([0.9, 0.05], [good, other]))  # what the full chain writes exhaustive ...
    assert clean.exhaustive is True
    confident = strict(candidate([0.9, 0.05], [good, other]))  # ... is not, here
    empty = strict(candidate([0.1], [good], phrase="blue star"))  # nothing kept: not written absent either
    miner = HardNegativeMiner(fire_low=0.05, fire_high=0.5, max_presence=1.0, max_per_image=0)
    assert miner([empty], exclude=[]) == []  # the miner off, as configs/engine/shapes_instances_only.yaml
    meta, counts = pseudo_sample({"image_id": 1, "width": W, "height": H}, [confident, empty])
    by_phrase = {q["phrase"]: q for q in meta["queries"]}
    assert not by_phrase["blue star"]["exhaustive"] and not by_phrase["blue star"]["instances"]
    assert len(by_phrase[confident.candidate.phrase]["instances"]) == 1
    assert not by_phrase[confident.candidate.phrase]["exhaustive"]
    assert counts["exhaustive_pairs"] == 0 and counts["instances"] == 1


def test_hard_negatives_only_for_weak_fires_that_verify_absent():
    pairs = [
        pair("blue star", [0.3, 0.1], presence=0.1),  # weak fire, nothing kept, presence low: mined
        pair("red star", [0.3], presence=0.1, keep_min=0.25),  # weak fire but an instance survives
        pair("hexagon", [0.01], presence=0.05),  # the model ignores it: an easy negative, not mined
        pair("cross", [0.3], presence=0.6),  # presence says it may be there
        pair("circle", [0.95], presence=0.95),  # a positive
        pair("square", [0.2], presence=0.2),  # would be mined, but the image is labelled with it
        pair("purple star", [0.4], presence=0.05),  # mined
    ]
    miner = HardNegativeMiner(fire_low=0.05, fire_high=0.5, max_presence=0.3)
    assert miner(pairs, exclude=["square"]) == ["blue star", "purple star"]
    limited = HardNegativeMiner(fire_low=0.05, fire_high=0.5, max_presence=0.3, max_per_image=1)
    assert limited(pairs, exclude=["square"]) == ["purple star"]  # lowest presence first
