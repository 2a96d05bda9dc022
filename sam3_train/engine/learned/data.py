"""The learned verifiers' training data: the rows of one examples file (examples.py), split by image
into training and validation.

    data = VerifierData(examples="runs/verifier_examples/mv-examples.pt", val_fraction=0.2)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))   # {"pixels", "stats", "tokens", "labels"}
"""

from __future__ import annotations

import zlib
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from sam3_train.engine.learned.examples import load_examples
from sam3_train.engine.learned.features import phrase_tokens


class _Rows(Dataset):
    """Rows ``index`` of a loaded examples file, their phrases hashed once."""

    def __init__(self, examples: dict[str, Any], index: list[int]):
        self.examples, self.index = examples, index
        self.tokens = phrase_tokens([examples["phrases"][i] for i in index])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = self.index[i]
        return {"pixels": self.examples["pixels"][j], "stats": self.examples["stats"][j], "tokens": self.tokens[i],
                "labels": self.examples["labels"][j]}


class VerifierData(L.LightningDataModule):
    """Training and validation rows of one examples file.

    Args:
        examples: the ``.pt`` file (``mv-examples.pt`` / ``ev-examples.pt``).
        val_fraction: share of images (by a hash of the sample key: no image in both) held out.
        batch_size: rows per step.
        seed: the training order's seed.
    """

    def __init__(self, *, examples: str, val_fraction: float = 0.2, batch_size: int = 64, seed: int = 0):
        super().__init__()
        self.examples, self.val_fraction, self.batch_size, self.seed = examples, val_fraction, batch_size, seed
        self.kind: str | None = None
        self.parts: dict[str, _Rows] = {}

    def setup(self, stage: str | None = None) -> None:
        rows = load_examples(self.examples)
        self.kind = rows["kind"]
        val = [zlib.crc32(k.encode()) % 1000 < self.val_fraction * 1000 for k in rows["keys"]]
        if all(val) or not any(val):  # too few images to split by image: every fifth row
            val = [self.val_fraction > 0 and i % 5 == 4 for i in range(len(val))]
        self.parts = {"train": _Rows(rows, [i for i, v in enumerate(val) if not v]),
                      "val": _Rows(rows, [i for i, v in enumerate(val) if v])}

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.parts["train"], batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.parts["val"], batch_size=self.batch_size)
