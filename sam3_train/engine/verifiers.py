"""Judging candidates: which instances become pseudo-labels, whether a pair is exhaustive, which
phrases become hard negatives.

One interface, so a stronger model or a person can replace or add a check: a :class:`Verifier` has
a ``name`` and maps a :class:`~sam3_train.engine.candidates.Candidate` to a :class:`Verdict`.
:class:`VerifierChain` runs them in order and counts, per verifier, the instances it kept and
rejected among those still alive when it ran (the manifest's counts).

    chain = VerifierChain(verifiers=[ScoreVerifier(min_score=0.5), StabilityVerifier(min_iou=0.8),
                                     FlipConsistencyVerifier(min_iou=0.7),
                                     ExhaustivityVerifier(low=0.2, high=0.7)])
    verified = chain(candidate)     # .keep [n] bool, .exhaustive, .flags, .kept / .rejected per verifier
    negatives = HardNegativeMiner()(verify_image(pairs, chain), exclude=phrases_with_instances(meta))

Order matters: put the score check first. A later mask check that drops an instance the score check
let through drops something the model believes is there, so the chain marks that pair
non-exhaustive (its unmatched predictions must not be punished) and flags it for review.

Hard negatives: a phrase the model ignores (top score near 0) teaches nothing as a negative; one it
confidently finds is a positive. The useful negatives sit between: the model half-believes the
concept is there, yet no instance survives verification and the presence head leans towards
"absent". Such a pair becomes a negative query (``exhaustive: true``, no instances), which punishes
exactly the weak firing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torchvision

from sam3_train.data.decode import decode_image
from sam3_train.engine.candidates import Candidate
from sam3_train.metrics.iou import rowwise_mask_iou


@dataclass(frozen=True)
class Verdict:
    """A verifier's opinion of one pair.

    Attributes:
        keep: [n] bool, the instances this verifier accepts.
        exhaustive: False when the verifier doubts that every instance was found; None: no opinion.
        flags: short reasons a person should look at the pair (empty: nothing to review).
    """

    keep: torch.Tensor
    exhaustive: bool | None = None
    flags: tuple[str, ...] = ()


class Verifier(ABC):
    """A check on one pair. ``rejects_absent`` says whether an instance it drops is judged not to be
    there at all (a low score), as opposed to being there with a bad mask."""

    name: str = "verifier"
    rejects_absent: bool = False
    # True: called as ``verifier(candidate, image=..., alive=...)`` with the image ([3, H, W] uint8,
    # or None when the chain has none) and the [n] bool instances no earlier verifier dropped
    # (the learned verifiers, learned.py); False: ``verifier(candidate)``.
    uses_context: bool = False

    @abstractmethod
    def __call__(self, candidate: Candidate) -> Verdict: ...

    def params(self) -> dict[str, Any]:
        """Constructor arguments, for the manifest's thresholds."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


class ScoreVerifier(Verifier):
    """Keeps an instance when its score (class x presence probability) is at least ``min_score``."""

    name = "score"
    rejects_absent = True

    def __init__(self, *, min_score: float = 0.5):
        self.min_score = float(min_score)

    def __call__(self, candidate: Candidate) -> Verdict:
        return Verdict(keep=candidate.scores >= self.min_score)


class StabilityVerifier(Verifier):
    """Keeps an instance when its mask barely moves with the logit threshold: IoU between the tight
    (logit > +offset) and loose (logit > -offset) masks at least ``min_iou``. A mask whose border sits in
    a wide band of uncertain logits is a guess."""

    name = "stability"

    def __init__(self, *, min_iou: float = 0.8):
        self.min_iou = float(min_iou)

    def __call__(self, candidate: Candidate) -> Verdict:
        return Verdict(keep=rowwise_mask_iou(candidate.masks_tight, candidate.masks_loose) >= self.min_iou)


class BoxMaskVerifier(Verifier):
    """Keeps an instance when the model's box agrees with its own mask: IoU between the box and the
    mask's tight box at least ``min_iou``. The written pseudo-label always takes the mask's box
    (pseudo_labels.instance_entry); this check rejects the instances where the two heads disagree,
    a sign that the query did not pick out one object. Empty masks are rejected."""

    name = "box_mask"

    def __init__(self, *, min_iou: float = 0.5):
        self.min_iou = float(min_iou)

    def __call__(self, candidate: Candidate) -> Verdict:
        masks = candidate.masks
        if masks.shape[0] == 0:
            return Verdict(keep=torch.zeros(0, dtype=torch.bool))
        nonempty = masks.flatten(1).any(dim=1)
        # masks_to_boxes gives pixel-centre coordinates (x1 = last column); +1 makes them whole pixels.
        mask_boxes = torchvision.ops.masks_to_boxes(masks[nonempty].to(torch.uint8)) + torch.tensor([0.0, 0.0, 1.0, 1.0])
        iou = torch.zeros(masks.shape[0])
        iou[nonempty] = torchvision.ops.box_iou(candidate.boxes[nonempty].float(), mask_boxes).diagonal()
        return Verdict(keep=iou >= self.min_iou)


class FlipConsistencyVerifier(Verifier):
    """Keeps an instance when the mask predicted on the flipped image (flipped back) agrees with it:
    IoU at least ``min_iou``. Rejects everything when the candidate has no flip masks (the check
    was asked for but not run: a configuration error would otherwise pass silently)."""

    name = "flip"

    def __init__(self, *, min_iou: float = 0.7):
        self.min_iou = float(min_iou)

    def __call__(self, candidate: Candidate) -> Verdict:
        if candidate.flip_masks is None:
            raise ValueError(f"FlipConsistencyVerifier: candidate {candidate.key}/{candidate.phrase!r} has no "
                             "flip_masks; run the propose step with flip TTA or drop this verifier")
        return Verdict(keep=rowwise_mask_iou(candidate.masks, candidate.flip_masks) >= self.min_iou)


class ExhaustivityVerifier(Verifier):
    """Marks a pair exhaustive only when no candidate score lies in the uncertain band (low, high):
    every proposal is then either confidently an instance or confidently not. Keeps every instance."""

    name = "exhaustivity"

    def __init__(self, *, low: float = 0.2, high: float = 0.7):
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"ExhaustivityVerifier needs 0 <= low < high <= 1, got low={low}, high={high}")
        self.low, self.high = float(low), float(high)

    def __call__(self, candidate: Candidate) -> Verdict:
        uncertain = (candidate.scores > self.low) & (candidate.scores < self.high)
        keep = torch.ones_like(candidate.scores, dtype=torch.bool)
        if bool(uncertain.any()):
            return Verdict(keep=keep, exhaustive=False, flags=(f"{int(uncertain.sum())} uncertain scores",))
        return Verdict(keep=keep, exhaustive=True)


class InstancesOnly(Verifier):
    """Writes no pair exhaustive: a round then trains only on the instances the chain kept, and nothing
    on a pool image is written absent or punished as a false positive (with the miner off too:
    ``HardNegativeMiner(max_per_image=0)``; configs/engine/shapes_instances_only.yaml). For a chain whose
    exhaustivity verdicts are too often wrong to train on: where an exhaustive pair that misses an
    instance teaches the model to suppress it, and a wrong negative teaches it the phrase is absent
    (docs/data_engine.md). Keeps every instance; its doubt is recorded (``Verified.doubted_by``)."""

    name = "instances_only"

    def __call__(self, candidate: Candidate) -> Verdict:
        return Verdict(keep=torch.ones_like(candidate.scores, dtype=torch.bool), exhaustive=False)


@dataclass
class Verified:
    """A candidate after the chain.

    Attributes:
        candidate: the record verified.
        keep: [n] bool, instances every verifier accepted.
        rejected_by: per instance, the name of the first verifier that rejected it (None: kept).
        exhaustive: whether the pair may be written as exhaustive.
        doubted_by: the verifiers whose verdict said the kept set may miss instances (``exhaustive``
            False), and ``propose`` when the detections were cut at ``max_detections``
            (:func:`verify_image`); not a mask check's drop, which also makes the pair non-exhaustive.
        flags: reasons for review, prefixed with the verifier's name.
        kept, rejected: per verifier name, instances it kept / rejected among those alive when it ran.
    """

    candidate: Candidate
    keep: torch.Tensor
    rejected_by: list[str | None]
    exhaustive: bool
    doubted_by: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    kept: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)

    @property
    def needs_review(self) -> bool:
        return bool(self.flags)


def image_tensor(image: Any) -> torch.Tensor:
    """Encoded bytes, a PIL image, an [H, W, 3] uint8 array or a [3, H, W] uint8 tensor -> [3, H, W] uint8:
    the image the chain hands to verifiers that look at pixels (``uses_context``)."""
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor must be uint8 [3, H, W], got {image.dtype} {tuple(image.shape)}")
        return image
    if isinstance(image, (bytes, bytearray)):
        image = decode_image(bytes(image))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image must be RGB [H, W, 3], got shape {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array.astype(np.uint8))).permute(2, 0, 1).contiguous()


class VerifierChain:
    """Runs ``verifiers`` in order; an instance survives when every verifier keeps it.

    A pair is exhaustive when no verifier says otherwise and no verifier with ``rejects_absent =
    False`` dropped an instance (see the module docstring).

    Verifiers with ``uses_context`` also get the image: the one passed to the call (encoded bytes or
    a [3, H, W] uint8 tensor), else ``images[candidate.key]`` when ``images`` (a mapping, e.g.
    ``learned.ShardImages``) is set.
    """

    def __init__(self, *, verifiers: Sequence[Verifier], images: Any = None):
        names = [v.name for v in verifiers]
        if len(set(names)) != len(names):
            raise ValueError(f"verifier names must be unique (they key the manifest's counts), got {names}")
        self.verifiers = list(verifiers)
        self.images = images

    @property
    def needs_image(self) -> bool:
        return any(v.uses_context for v in self.verifiers)

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.verifiers]

    def thresholds(self) -> dict[str, dict[str, Any]]:
        """``{verifier name: its constructor arguments}`` for the manifest."""
        return {v.name: v.params() for v in self.verifiers}

    def __call__(self, candidate: Candidate, *, image: Any = None) -> Verified:
        alive = torch.ones(candidate.num_instances, dtype=torch.bool)
        rejected_by: list[str | None] = [None] * candidate.num_instances
        exhaustive, flags, doubted_by = True, [], []
        kept, rejected = {}, {}
        if self.needs_image:
            if image is None and self.images is not None:
                image = self.images[candidate.key]
            if image is not None:
                image = image_tensor(image)  # decoded once for every verifier
        for verifier in self.verifiers:
            verdict = verifier(candidate, image=image, alive=alive.clone()) if verifier.uses_context \
                else verifier(candidate)
            if tuple(verdict.keep.shape) != (candidate.num_instances,):
                raise ValueError(f"verifier {verifier.name!r} returned keep of shape {tuple(verdict.keep.shape)} "
                                 f"for {candidate.num_instances} instances")
            dropped = alive & ~verdict.keep.bool()
            for i in dropped.nonzero().flatten().tolist():
                rejected_by[i] = verifier.name
            alive = alive & ~dropped
            kept[verifier.name], rejected[verifier.name] = int(alive.sum()), int(dropped.sum())
            if verdict.exhaustive is False:
                exhaustive = False
                doubted_by.append(verifier.name)
            if bool(dropped.any()) and not verifier.rejects_absent:
                exhaustive = False
                flags.append(f"{verifier.name}: rejected {int(dropped.sum())}")
            flags += [f"{verifier.name}: {f}" for f in verdict.flags]
        return Verified(candidate=candidate, keep=alive, rejected_by=rejected_by, exhaustive=exhaustive,
                        doubted_by=tuple(doubted_by), flags=tuple(flags), kept=kept, rejected=rejected)


def verify_image(pairs: Iterable[tuple[Candidate, int]], chain: VerifierChain, *, image: Any = None
                 ) -> list[Verified]:
    """The chain's verdict on every (candidate, dropped) pair of one image (``image``: its encoded
    bytes or [3, H, W] uint8, for verifiers that look at it). A pair whose detections were truncated
    at ``max_detections`` (``dropped`` > 0) may hide more instances: it is written non-exhaustive and
    flagged."""
    out = []
    if image is not None and chain.needs_image:
        image = image_tensor(image)  # decoded once for the image's pairs
    for candidate, dropped in pairs:
        verified = chain(candidate, image=image)
        if dropped:
            verified.exhaustive = False
            verified.doubted_by = (*verified.doubted_by, "propose")  # more may be missing: a doubt
            verified.flags = (*verified.flags, f"propose: {dropped} detections above the floor not kept")
        out.append(verified)
    return out


def phrases_with_instances(meta: dict[str, Any]) -> list[str]:
    """Phrases the image already has instances for (in its pool meta): never mined as negatives."""
    return [q["phrase"] for q in meta["queries"] if q.get("instances")]


class HardNegativeMiner:
    """Picks the phrases of one image to write as negatives.

    A pair is a hard negative when all hold:
      - its top candidate score lies in ``[fire_low, fire_high)`` (the model fires, weakly);
      - no instance survived the verifier chain;
      - its presence probability is below ``max_presence``;
      - with ``skip_doubted``: nothing doubted that the (empty) kept set is complete (``doubted_by``:
        no verifier, no truncation at ``max_detections``). An exhaustive pair with nothing kept is
        written as a negative anyway; mining adds the non-exhaustive ones, those a mask check emptied
        (which the guard lets through: an exhaustivity verifier after it has judged the empty set
        complete) and the doubted ones (which it skips).

    Args:
        fire_low, fire_high: the weak-firing band of the top score (probabilities).
        max_presence: presence probability at or above which the concept may be there after all.
        max_per_image: at most this many negatives per image, weakest presence first (None: no limit);
            too many negatives per image would swamp its positives in phrase sampling.
        skip_doubted: never overrule a verifier's "something is missing" (an exhaustivity verifier's
            verdict on the empty kept set). Without it 38% of the phrases mined on a transfer round were
            present (docs/data_engine.md).
    """

    def __init__(self, *, fire_low: float = 0.05, fire_high: float = 0.5, max_presence: float = 0.3,
                 max_per_image: int | None = None, skip_doubted: bool = False):
        if not 0.0 <= fire_low < fire_high <= 1.0:
            raise ValueError(f"HardNegativeMiner needs 0 <= fire_low < fire_high <= 1, got {fire_low}, {fire_high}")
        self.fire_low, self.fire_high = float(fire_low), float(fire_high)
        self.max_presence = float(max_presence)
        self.max_per_image = max_per_image
        self.skip_doubted = bool(skip_doubted)

    def params(self) -> dict[str, float | int | bool | None]:
        # skip_doubted only when set: rounds recorded before it keep their thresholds
        return {"fire_low": self.fire_low, "fire_high": self.fire_high, "max_presence": self.max_presence,
                "max_per_image": self.max_per_image, **({"skip_doubted": True} if self.skip_doubted else {})}

    def is_hard_negative(self, verified: Verified) -> bool:
        c = verified.candidate
        return (self.fire_low <= c.top_score < self.fire_high and not bool(verified.keep.any())
                and c.presence < self.max_presence and not (self.skip_doubted and verified.doubted_by))

    def __call__(self, pairs: Iterable[Verified], *, exclude: Iterable[str] = ()) -> list[str]:
        """Phrases of one image's verified pairs to write as negatives, sorted.

        ``exclude``: phrases already labelled on the image (never turned into negatives).
        """
        skip = set(exclude)
        chosen = [v for v in pairs if v.candidate.phrase not in skip and self.is_hard_negative(v)]
        if self.max_per_image is not None:
            chosen = sorted(chosen, key=lambda v: (v.candidate.presence, v.candidate.phrase))[: self.max_per_image]
        return sorted({v.candidate.phrase for v in chosen})
