"""Noun-phrase helpers: per-image query sampling and the left/right swap of a horizontal flip."""

from __future__ import annotations

import random
import re
from typing import Any

from sam3_train.data.schema import is_negative, is_unlabelled

_LEFT_RIGHT = re.compile(r"\b(left|right|Left|Right|LEFT|RIGHT)\b")
_SWAP = {"left": "right", "right": "left", "Left": "Right", "Right": "Left", "LEFT": "RIGHT", "RIGHT": "LEFT"}


def swap_left_right(phrase: str) -> str:
    """"left hand on the right" -> "right hand on the left" (whole words, case kept)."""
    return _LEFT_RIGHT.sub(lambda m: _SWAP[m.group(0)], phrase)


def select_queries(
    queries: list[dict[str, Any]],
    *,
    max_queries: int | None,
    negative_share: float,
    rng: random.Random,
) -> list[dict[str, Any]]:
    """Pick at most ``max_queries`` of an image's queries, about ``negative_share`` of them negatives.

    Negatives are exhaustive queries without instances. Unlabelled queries (non-exhaustive without
    instances, or crowd instances only: ``schema.is_unlabelled``) are never picked; they carry no
    target the objective can use. When one kind runs short the other fills the remaining places, so an image keeps
    ``min(max_queries, len(labelled queries))`` queries. The order of the result is random.
    ``max_queries=None`` keeps every query (evaluation, where only exhaustive pairs are scored).
    """
    if max_queries is None:
        return list(queries)
    queries = [q for q in queries if not is_unlabelled(q)]
    if len(queries) <= max_queries:
        rng.shuffle(queries)
        return queries
    negatives = [q for q in queries if is_negative(q)]
    positives = [q for q in queries if not is_negative(q)]
    n_neg = min(len(negatives), round(negative_share * max_queries))
    n_pos = min(len(positives), max_queries - n_neg)
    n_neg = min(len(negatives), max_queries - n_pos)  # fill with negatives when positives are few
    chosen = rng.sample(positives, n_pos) + rng.sample(negatives, n_neg)
    rng.shuffle(chosen)
    return chosen
