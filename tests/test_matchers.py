"""Matchers: hand-computed cost, invariants (batched = per pair, target permutation, empty pairs), DAC limits."""

from __future__ import annotations

import itertools
import math

import torch

from sam3_train.losses import HungarianMatcher, OneToManyMatcher, PackedTargets


def _random_case(num_pairs: int, num_queries: int, sizes: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(num_pairs, num_queries, generator=g),
        "pred_boxes": torch.cat(
            [
                torch.rand(num_pairs, num_queries, 2, generator=g),
                0.05 + 0.4 * torch.rand(num_pairs, num_queries, 2, generator=g),
            ],
            dim=-1,
        ),
    }
    targets = [
        {
            "boxes": torch.cat([torch.rand(n, 2, generator=g), 0.05 + 0.4 * torch.rand(n, 2, generator=g)], dim=-1),
            "exhaustive": True,
        }
        for n in sizes
    ]
    return outputs, targets


def _local(indices, targets) -> dict[int, set[tuple[int, int]]]:
    """{pair: {(query, target index within the pair)}}."""
    offsets = torch.tensor([0] + [t["boxes"].shape[0] for t in targets]).cumsum(0)
    out: dict[int, set[tuple[int, int]]] = {}
    for p, q, t in zip(indices.pair.tolist(), indices.query.tolist(), indices.target.tolist()):
        out.setdefault(p, set()).add((q, t - int(offsets[p])))
    return out


def test_hungarian_cost_by_hand():
    # logit 0 -> p = 0.5. Focal cost = pos - neg:
    #   pos = 0.25 x (1 - 0.5)^2 x ln 2 = 0.0625 ln 2;  neg = 0.75 x 0.5^2 x ln 2 = 0.1875 ln 2
    #   class = -0.125 ln 2 = -0.0866434
    # pred (0.5, 0.5, 0.2, 0.2) vs target (0.5, 0.5, 0.2, 0.4): L1 = |0.2 - 0.4| = 0.2
    #   IoU = 0.04 / 0.08 = 0.5; the hull is the target box itself, so GIoU = IoU = 0.5
    # cost = 2 x (-0.0866434) + 5 x 0.2 - 2 x 0.5 = -0.1732868
    packed = PackedTargets.from_list([{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.4]]), "exhaustive": True}])
    cost = HungarianMatcher().cost_matrix(torch.zeros(1, 1), torch.tensor([[[0.5, 0.5, 0.2, 0.2]]]), packed)
    expected = 2 * (-0.125 * math.log(2)) + 5 * 0.2 - 2 * 0.5
    assert math.isclose(cost.item(), expected, rel_tol=1e-5)


def test_hungarian_is_optimal_against_brute_force():
    outputs, targets = _random_case(1, 5, [3], seed=1)
    matcher = HungarianMatcher()
    packed = PackedTargets.from_list(targets)
    cost = matcher.cost_matrix(outputs["pred_logits"], outputs["pred_boxes"], packed)[0]  # [5, 3]
    best = min(sum(cost[q, t].item() for t, q in enumerate(qs)) for qs in itertools.permutations(range(5), 3))
    got = matcher(outputs, targets)
    assert len(got) == 3
    assert math.isclose(cost[got.query, got.target].sum().item(), best, rel_tol=1e-6)


def test_hungarian_batched_equals_per_pair():
    sizes = [3, 0, 5, 1, 2]
    outputs, targets = _random_case(len(sizes), 12, sizes, seed=2)
    matcher = HungarianMatcher()
    batched = _local(matcher(outputs, targets), targets)
    for p in range(len(sizes)):
        single = matcher({k: v[p : p + 1] for k, v in outputs.items()}, [targets[p]])
        assert batched.get(p, set()) == _local(single, [targets[p]]).get(0, set())
    assert 1 not in batched  # the pair with no target has no indices
    assert all(len(batched[p]) == n for p, n in enumerate(sizes) if n)


def test_hungarian_permuting_targets_permutes_assignment():
    sizes = [4, 6]
    outputs, targets = _random_case(2, 10, sizes, seed=3)
    matcher = HungarianMatcher()
    before = _local(matcher(outputs, targets), targets)
    perms = [torch.randperm(n, generator=torch.Generator().manual_seed(7)) for n in sizes]
    permuted = [{"boxes": t["boxes"][perm], "exhaustive": True} for t, perm in zip(targets, perms)]
    after = _local(matcher(outputs, permuted), permuted)
    for p, perm in enumerate(perms):
        # new target j is old target perm[j]
        assert {(q, int(perm[j])) for q, j in after[p]} == before[p]


def test_matchers_with_no_targets_return_no_indices():
    outputs, targets = _random_case(3, 8, [0, 0, 0], seed=4)
    for matcher in (HungarianMatcher(), OneToManyMatcher()):
        idx = matcher(outputs, targets)
        assert len(idx) == 0 and idx.pair.dtype == torch.long


def test_hungarian_more_targets_than_queries_and_degenerate_boxes():
    outputs, targets = _random_case(1, 4, [9], seed=5)
    targets[0]["boxes"][:, 2] = 0.0  # zero width everywhere
    idx = HungarianMatcher()(outputs, targets)
    assert len(idx) == 4 and len(set(idx.query.tolist())) == 4 and len(set(idx.target.tolist())) == 4


def test_one_to_many_by_hand():
    # One target (0.5, 0.5, 0.4, 0.4). Scores 0.3 p + 0.7 IoU:
    #   q0: exact box, logit 0    -> 0.3 x 0.5  + 0.7 x 1   = 0.85  match
    #   q1: width 0.2, logit 0    -> 0.3 x 0.5  + 0.7 x 0.5 = 0.50  match (IoU 0.08 / 0.16)
    #   q2: far box, logit 10     -> 0.3 x ~1   + 0.7 x 0   = 0.30  below 0.4: no match
    #   q3: width 0.1, logit -10  -> 0.3 x ~0   + 0.7 x 0.25 = 0.175 no match
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.4], [0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.05, 0.05], [0.5, 0.5, 0.1, 0.4]]])
    outputs = {"pred_logits": torch.tensor([[0.0, 0.0, 10.0, -10.0]]), "pred_boxes": boxes}
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]]), "exhaustive": True}]
    idx = OneToManyMatcher()(outputs, targets)
    assert idx.query.tolist() == [0, 1] and idx.target.tolist() == [0, 0]
    # With topk 1 only the best query remains.
    idx = OneToManyMatcher(topk=1)(outputs, targets)
    assert idx.query.tolist() == [0]


def test_one_to_many_limits_and_brute_force():
    sizes = [3, 0, 20, 7]
    outputs, targets = _random_case(len(sizes), 50, sizes, seed=6)
    # Put several queries on top of the targets so many scores pass 0.4.
    for p, t in enumerate(targets):
        n = t["boxes"].shape[0]
        outputs["pred_boxes"][p, :n] = t["boxes"] + 0.01
        outputs["pred_boxes"][p, n : 2 * n] = t["boxes"] - 0.01
    matcher = OneToManyMatcher()
    idx = matcher(outputs, targets)
    packed = PackedTargets.from_list(targets)
    score = matcher.scores(outputs["pred_logits"], outputs["pred_boxes"], packed)
    local = idx.target - packed.offsets[idx.pair]
    matched_scores = score[idx.pair, idx.query, local]
    assert len(idx) > 0
    assert (matched_scores > 0.4).all()
    assert torch.bincount(idx.target, minlength=packed.boxes.shape[0]).max() <= 4
    # Same set as "among the target's top 4 and above 0.4", enumerated per target.
    expected = set()
    for p, n in enumerate(sizes):
        for t in range(n):
            top = score[p, :, t].topk(4).indices.tolist()
            expected |= {(p, q, t) for q in top if score[p, q, t] > 0.4}
    assert set(zip(idx.pair.tolist(), idx.query.tolist(), local.tolist())) == expected


def test_one_to_many_query_may_match_several_targets():
    # Two identical targets and one query on them: score 0.3 x 0.5 + 0.7 x 1 = 0.85 for both.
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1]]])
    outputs = {"pred_logits": torch.zeros(1, 2), "pred_boxes": boxes}
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]]), "exhaustive": True}]
    idx = OneToManyMatcher()(outputs, targets)
    assert idx.query.tolist() == [0, 0] and idx.target.tolist() == [0, 1]
