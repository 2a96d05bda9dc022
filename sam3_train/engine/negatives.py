"""Hard-negative mining: vocabulary phrases the model fires on weakly but that verify as absent.

A phrase the model ignores (top score near 0) teaches nothing as a negative; one it confidently
finds is a positive. The useful negatives sit between: the model half-believes the concept is
there, yet no instance survives verification and the presence head leans towards "absent". Such a
pair becomes a negative query (``exhaustive: true``, no instances), which punishes exactly the weak
firing.
"""

from __future__ import annotations

from collections.abc import Iterable

from sam3_train.engine.verifiers import Verified


class HardNegativeMiner:
    """Picks the phrases of one image to write as negatives.

    A pair is a hard negative when all hold:
      - its top candidate score lies in ``[fire_low, fire_high)`` (the model fires, weakly);
      - no instance survived the verifier chain;
      - its presence probability is below ``max_presence``.

    Args:
        fire_low, fire_high: the weak-firing band of the top score (probabilities).
        max_presence: presence probability at or above which the concept may be there after all.
        max_per_image: at most this many negatives per image, weakest presence first (None: no limit);
            too many negatives per image would swamp its positives in phrase sampling.
    """

    def __init__(self, *, fire_low: float = 0.05, fire_high: float = 0.5, max_presence: float = 0.3,
                 max_per_image: int | None = None):
        if not 0.0 <= fire_low < fire_high <= 1.0:
            raise ValueError(f"HardNegativeMiner needs 0 <= fire_low < fire_high <= 1, got {fire_low}, {fire_high}")
        self.fire_low, self.fire_high = float(fire_low), float(fire_high)
        self.max_presence = float(max_presence)
        self.max_per_image = max_per_image

    def params(self) -> dict[str, float | int | None]:
        return {"fire_low": self.fire_low, "fire_high": self.fire_high, "max_presence": self.max_presence,
                "max_per_image": self.max_per_image}

    def is_hard_negative(self, verified: Verified) -> bool:
        c = verified.candidate
        return (self.fire_low <= c.top_score < self.fire_high and not bool(verified.keep.any())
                and c.presence < self.max_presence)

    def __call__(self, pairs: Iterable[Verified], *, exclude: Iterable[str] = ()) -> list[str]:
        """Phrases of one image's verified pairs to write as negatives, sorted.

        ``exclude``: phrases already labelled on the image (never turned into negatives).
        """
        skip = set(exclude)
        chosen = [v for v in pairs if v.candidate.phrase not in skip and self.is_hard_negative(v)]
        if self.max_per_image is not None:
            chosen = sorted(chosen, key=lambda v: (v.candidate.presence, v.candidate.phrase))[: self.max_per_image]
        return sorted({v.candidate.phrase for v in chosen})
