"""SAM 3's training objective (pure torch): matchers, loss terms and the criterion that weights them."""

from sam3_train.losses.criterion import Sam3Criterion, num_boxes_across_ranks
from sam3_train.losses.matcher import HungarianMatcher, MatchIndices, OneToManyMatcher
from sam3_train.losses.targets import PackedTargets

__all__ = [
    "HungarianMatcher",
    "MatchIndices",
    "OneToManyMatcher",
    "PackedTargets",
    "Sam3Criterion",
    "num_boxes_across_ranks",
]
