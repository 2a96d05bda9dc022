"""Image-level presence accuracy of the presence head, as a DDP-safe torchmetrics Metric.

The decision measured is the presence head's own: ``presence probability >= threshold`` (sigmoid of
``presence_logit``), against whether the pair has any target instance. This isolates the head that
SAM 3 adds for recognition; cgF1's IL_MCC instead judges the final detections (any prediction with
score >= 0.5, where score = sigmoid(class) x sigmoid(presence)).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric


class PresenceAccuracy(Metric):
    """Accuracy, precision and recall of the presence decision over exhaustive (image, phrase) pairs.

    ``update(presence, targets)``:
        presence    [P] float, presence probabilities in [0, 1] (sigmoid of ``presence_logit``)
        targets     P dicts with "boxes" [m, 4] (or "masks" [m, H, W]) and "exhaustive" bool
    A pair is present when it has at least one target. Non-exhaustive pairs are skipped (their
    absence is not known) and counted in ``presence_num_skipped``.

    ``compute()`` returns 0-d float64 tensors (fractions; 0 where a denominator is 0):
        presence_accuracy    (TP + TN) / pairs
        presence_precision   TP / (TP + FP)
        presence_recall      TP / (TP + FN)
        presence_num_pairs, presence_num_skipped
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, *, threshold: float = 0.5, **kwargs: Any) -> None:
        """
        Args:
            threshold: a pair is predicted present when its presence probability is >= threshold.
            kwargs: torchmetrics ``Metric`` options.
        """
        super().__init__(**kwargs)
        self.threshold = threshold
        for name in ("tp", "fp", "tn", "fn", "num_skipped"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, presence: torch.Tensor, targets: Sequence[dict[str, Any]]) -> None:
        """Count one batch of pairs; see the class docstring for shapes and keys."""
        if presence.numel() != len(targets):
            raise ValueError(
                f"PresenceAccuracy.update got {presence.numel()} presence values for {len(targets)} targets"
            )
        device = presence.device
        exhaustive = torch.tensor([bool(t["exhaustive"]) for t in targets], dtype=torch.bool, device=device)
        present = torch.tensor(
            [len(t["boxes"] if "boxes" in t else t["masks"]) > 0 for t in targets], dtype=torch.bool, device=device
        )
        predicted = presence.reshape(-1) >= self.threshold
        predicted, present = predicted[exhaustive], present[exhaustive]
        self.tp += (predicted & present).sum()
        self.fp += (predicted & ~present).sum()
        self.tn += (~predicted & ~present).sum()
        self.fn += (~predicted & present).sum()
        self.num_skipped += (~exhaustive).sum()

    def compute(self) -> dict[str, torch.Tensor]:
        """The named values of the class docstring."""
        tp, fp, tn, fn = (int(getattr(self, n)) for n in ("tp", "fp", "tn", "fn"))

        def ratio(num: int, den: int) -> float:
            return num / den if den else 0.0

        out = {
            "presence_accuracy": ratio(tp + tn, tp + fp + tn + fn),
            "presence_precision": ratio(tp, tp + fp),
            "presence_recall": ratio(tp, tp + fn),
            "presence_num_pairs": float(tp + fp + tn + fn),
            "presence_num_skipped": float(self.num_skipped),
        }
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}
