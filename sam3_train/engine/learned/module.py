"""The learned verifiers' LightningModule: a :class:`~sam3_train.engine.learned.nets.VerifierNet` and
its objective, trained by ``sam3-train fit-verifier`` (cli.py) on a :class:`~sam3_train.engine.learned.
data.VerifierData`; and :func:`score_examples`, a trained one's accuracy on held-out rows.

    sam3-train fit-verifier --config configs/verifiers/base.yaml --config configs/verifiers/mv.yaml
    module = VerifierModule(kind="mask")           # what the config's model section builds
    logits = module({"pixels": ..., "stats": ..., "tokens": ...})     # [N]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import BinaryAccuracy

from sam3_train.engine.learned.features import MASK_STATS
from sam3_train.engine.learned.nets import CHANNELS, NUM_STATS, Kind, VerifierNet

if TYPE_CHECKING:
    from sam3_train.engine.learned.data import VerifierData


class VerifierModule(L.LightningModule):
    """A verifier net and its objective (binary cross-entropy: 1 = accept / exhaustive).

    Args:
        kind: ``mask`` (MV: one row per instance) or ``exhaustivity`` (EV: one row per proposed set).
        width, phrase_buckets, phrase_dim: :class:`VerifierNet`'s sizes.
        lr, weight_decay: AdamW.
    Logs ``train/loss``, ``train/accuracy``, ``val/loss``, ``val/accuracy`` (at probability 0.5).
    """

    def __init__(self, *, kind: Kind = "mask", width: int = 32, phrase_buckets: int = 1024, phrase_dim: int = 16,
                 lr: float = 3e-3, weight_decay: float = 1e-4):
        super().__init__()
        if kind not in CHANNELS:
            raise ValueError(f"VerifierModule.kind must be one of {sorted(CHANNELS)}, got {kind!r}")
        self.save_hyperparameters()
        self.kind = kind
        self.net = VerifierNet(in_channels=CHANNELS[kind], num_stats=NUM_STATS[kind], width=width,
                               phrase_buckets=phrase_buckets, phrase_dim=phrase_dim)
        self.train_accuracy, self.val_accuracy = BinaryAccuracy(), BinaryAccuracy()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits [N] of a batch ``{"pixels", "stats", "tokens"}``."""
        return self.net(batch["pixels"], batch["stats"], batch["tokens"])

    def on_fit_start(self) -> None:
        data = getattr(self.trainer, "datamodule", None)
        if data is not None and getattr(data, "kind", self.kind) != self.kind:
            raise ValueError(f"the examples {data.examples} are {data.kind} examples; model.kind is {self.kind}")

    def _step(self, batch: dict[str, torch.Tensor], stage: str, accuracy: BinaryAccuracy) -> torch.Tensor:
        logits = self(batch)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch["labels"].float())
        accuracy(logits.sigmoid(), batch["labels"].long())
        n = len(logits)
        self.log(f"{stage}/loss", loss, batch_size=n, prog_bar=stage == "val")
        self.log(f"{stage}/accuracy", accuracy, batch_size=n, prog_bar=stage == "val")
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", self.train_accuracy)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val", self.val_accuracy)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


@torch.no_grad()
def held_out(module: VerifierModule, data: VerifierData, part: str = "val"
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probability of "accept" [N], label [N] bool, statistics [N, S]) of a trained verifier on every
    row of one part of its examples."""
    data.setup("fit")
    module = module.eval()
    probs, labels, stats = [], [], []
    for batch in DataLoader(data.parts[part], batch_size=256):
        probs.append(module(batch).sigmoid())
        labels.append(batch["labels"] > 0.5)
        stats.append(batch["stats"])
    return torch.cat(probs), torch.cat(labels), torch.cat(stats)


def score_examples(module: VerifierModule, data: VerifierData, part: str = "val", min_prob: float = 0.5
                   ) -> dict[str, Any]:
    """Accuracy, and precision / recall of "accept", of a trained verifier on one part of its examples."""
    probs, truth, _ = held_out(module, data, part)
    predicted = probs >= min_prob
    tp, fp = int((predicted & truth).sum()), int((predicted & ~truth).sum())
    fn, right, rows = int((~predicted & truth).sum()), int((predicted == truth).sum()), len(truth)
    share = lambda a, b: round(a / b, 4) if b else None  # noqa: E731
    return {"rows": rows, "accuracy": share(right, rows), "precision": share(tp, tp + fp), "recall": share(tp, tp + fn)}


def precision_threshold(module: VerifierModule, data: VerifierData, target: float, part: str = "val",
                        min_score: float = 0.0) -> dict[str, Any]:
    """The lowest acceptance probability at which a trained MV's "accept" reaches precision ``target`` on
    one part of its examples, counting only the rows made from the detector's proposals with a score of
    at least ``min_score`` (``evidence`` 1: what the chain judges behind its score check; perturbed
    ground-truth rows are left out), with the recall there. ``min_prob`` is None when no threshold
    reaches the target. Of the thresholds that reach it, the lowest keeps the most (the highest recall);
    tied probabilities are cut together. The examples keep at most ``max_rejects_per_pair`` rejected
    proposals a pair (examples.py), so the precision measured here can be above the pool's."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target precision must lie in (0, 1], got {target}")
    probs, labels, stats = held_out(module, data, part)
    judged = (stats[:, MASK_STATS.index("evidence")] > 0.5) & (stats[:, MASK_STATS.index("score")] >= min_score)
    p, y = probs[judged], labels[judged]
    result: dict[str, Any] = {"target": target, "min_score": min_score, "rows": len(p), "positives": int(y.sum()),
                              "min_prob": None, "precision": None, "recall": None}
    if not len(p) or not bool(y.any()):
        return result
    p, order = p.sort(descending=True)
    tp = y[order].cumsum(0).double()
    precision = tp / torch.arange(1, len(p) + 1, dtype=torch.float64)
    cut = torch.ones(len(p), dtype=torch.bool)
    cut[:-1] = p[1:] < p[:-1]  # the last row of each run of equal probabilities
    ok = ((precision >= target) & cut).nonzero().flatten()
    if len(ok):
        i = int(ok.max())
        result.update(min_prob=float(p[i]), precision=round(float(precision[i]), 4),
                      recall=round(float(tp[i] / tp[-1]), 4))
    return result
