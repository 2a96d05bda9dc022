"""Learned verifiers: mask verification (MV: is this mask a correct, complete instance of the phrase?)
and exhaustivity verification (EV: do these masks cover every instance of the phrase in the image?),
as small nets trained on decisions the engine makes itself (verifier_examples.py), and as
:class:`~sam3_train.engine.verifiers.Verifier` s for the chain.

    sam3-train fit-verifier --config configs/verifiers/mv.yaml      # VerifierModule(kind="mask") on mv examples
    sam3-train fit-verifier --config configs/verifiers/ev.yaml      # kind="exhaustivity" on ev examples
    chain = VerifierChain(verifiers=[ScoreVerifier(min_score=0.3), LearnedMaskVerifier(checkpoint="mv.ckpt"),
                                     LearnedExhaustivityVerifier(checkpoint="ev.ckpt")])
    chain(candidate, image=png_bytes)

The architecture (:class:`VerifierNet`, the same for both, sizes in verifier_features.py): a 3-layer
CNN over the pixels (MV: the image crop around the mask and the mask; EV: the whole image, the union
of the set and the union of what the detector proposed outside it), its pooled features scaled by the
phrase's embedding (FiLM: "red" must change which pixels matter), then an MLP over [features, phrase
embedding, statistics] -> one logit. About 27 k parameters (16 k of them the phrase-word table): a
CPU trains one in seconds to a minute.

Why not the detector's own encoders, as SAM 3's verifiers build on large models: the detector is
retrained every round, so features from round k's ViT would not mean the same to a verifier in round
k + 1, and the write stage holds the image but not the ViT's features (recomputing them would double
the propose step's cost). What the detector knows enters as statistics instead: its score, presence,
mask stability and flip agreement. The honest cost: a small net learns appearance from the labelled
set only, and a phrase word it never saw gets an untrained embedding.
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings
import zlib
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import BinaryAccuracy

from sam3_train.engine.candidates import Candidate
from sam3_train.engine.verifier_features import (
    MASK_STATS,
    PHRASE_WORDS,
    SET_STATS,
    candidate_mask_inputs,
    image_tensor,
    phrase_tokens,
    set_inputs,
)
from sam3_train.engine.verifiers import Verdict, Verifier

Kind = Literal["mask", "exhaustivity"]
CHANNELS = {"mask": 4, "exhaustivity": 5}
NUM_STATS = {"mask": len(MASK_STATS), "exhaustivity": len(SET_STATS)}
EXAMPLES_FORMAT = 1


class VerifierNet(nn.Module):
    """pixels [N, C, S, S] uint8, stats [N, k] float, phrase tokens [N, PHRASE_WORDS] int64 -> logits [N].

    Args:
        in_channels: 4 (MV) or 5 (EV); the first three are RGB.
        num_stats: statistics per row.
        width: channels of the last conv layer (the first two have width / 4 and width / 2).
        phrase_buckets: rows of the phrase-word embedding table (row 0: padding).
        phrase_dim: size of a phrase's embedding.
    """

    def __init__(self, *, in_channels: int, num_stats: int, width: int = 32, phrase_buckets: int = 1024,
                 phrase_dim: int = 16):
        super().__init__()
        self.phrase_buckets = phrase_buckets
        c1, c2 = max(width // 4, 4), max(width // 2, 8)
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c2, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (N, width)
        self.words = nn.Embedding(phrase_buckets, phrase_dim, padding_idx=0)
        self.film = nn.Linear(phrase_dim, width)
        self.head = nn.Sequential(nn.Linear(width + phrase_dim + num_stats, 2 * width), nn.ReLU(),
                                  nn.Linear(2 * width, 1))

    def forward(self, pixels: torch.Tensor, stats: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        x = pixels.float() / 255.0
        x = torch.cat([x[:, :3] - 0.5, x[:, 3:]], dim=1)  # RGB centred, masks in [0, 1]
        ids = torch.where(tokens >= 0, tokens % (self.phrase_buckets - 1) + 1, torch.zeros_like(tokens))
        words = self.words(ids)  # (N, L, D); padding rows are 0
        phrase = words.sum(1) / (ids > 0).sum(1, keepdim=True).clamp(min=1)  # (N, D) mean over words
        features = self.encoder(x) * (1 + self.film(phrase))  # (N, width)
        return self.head(torch.cat([features, phrase, stats.float()], dim=1)).squeeze(1)


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


# ------------------------------------------------------------------------------------------ examples file
def load_examples(path: str | os.PathLike) -> dict[str, Any]:
    """An examples file (verifier_examples.write_examples): ``{"format", "kind", "pixels", "stats",
    "labels", "phrases", "keys", "sources"}``; loaded without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verifier examples {path} do not exist; make them with "
                                "verifier_examples.make_examples or the engine's verifiers stage")
    examples = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(examples, dict) or examples.get("format") != EXAMPLES_FORMAT:
        raise ValueError(f"{path} is not a verifier examples file (format {EXAMPLES_FORMAT})")
    return examples


class _Rows(Dataset):
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


class VerifierCLI(LightningCLI):
    """``sam3-train fit-verifier``: LightningCLI over VerifierModule / VerifierData, plus ``--save_to``
    (the trained weights and hyper-parameters, written atomically at the end of the fit)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--save_to", type=str | None, default=None,
                            help="write the trained verifier here (what LearnedMaskVerifier / "
                                 "LearnedExhaustivityVerifier load)")

    def after_fit(self) -> None:
        save_to = self.config[self.config.subcommand].get("save_to")
        if save_to:
            path = Path(save_to)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            self.trainer.save_checkpoint(tmp, weights_only=True)
            os.replace(tmp, path)


def fit_verifier(args: list[str]) -> int:
    """``sam3-train fit-verifier --config configs/verifiers/mv.yaml [--key=value ...]``; returns 0."""
    with warnings.catch_warnings():  # "args given while sys.argv holds some": they are sam3-train's own
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python")
        VerifierCLI(VerifierModule, VerifierData, args=["fit", *args], parser_kwargs={"parser_mode": "omegaconf"},
                    save_config_callback=None)
    return 0


@torch.no_grad()
def score_examples(module: VerifierModule, data: VerifierData, part: str = "val", min_prob: float = 0.5
                   ) -> dict[str, Any]:
    """Accuracy, and precision / recall of "accept", of a trained verifier on one part of its examples."""
    data.setup("fit")
    module = module.eval()
    tp = fp = fn = right = rows = 0
    for batch in DataLoader(data.parts[part], batch_size=256):
        predicted, truth = module(batch).sigmoid() >= min_prob, batch["labels"] > 0.5
        tp, fp = tp + int((predicted & truth).sum()), fp + int((predicted & ~truth).sum())
        fn, right = fn + int((~predicted & truth).sum()), right + int((predicted == truth).sum())
        rows += len(truth)
    share = lambda a, b: round(a / b, 4) if b else None  # noqa: E731
    return {"rows": rows, "accuracy": share(right, rows), "precision": share(tp, tp + fp), "recall": share(tp, tp + fn)}


# ------------------------------------------------------------------------------------------ verifiers
def load_verifier(checkpoint: str | os.PathLike, kind: Kind, owner: str) -> VerifierModule:
    """A trained verifier in eval mode; one error naming the file and what to do when it cannot be used."""
    from sam3_train.checkpointing import CheckpointError, load_checkpoint_file

    hint = "train one with `sam3-train fit-verifier --config configs/verifiers/...` or the engine's verifiers stage"
    try:
        state = load_checkpoint_file(checkpoint)
        hparams = dict(state.get("hyper_parameters") or {})
        if hparams.get("kind") != kind:
            raise CheckpointError(f"it holds no {kind} verifier (hyper-parameters {hparams or 'missing'})")
        names = inspect.signature(VerifierModule).parameters  # LightningCLI adds _class_path, _instantiator
        module = VerifierModule(**{k: v for k, v in hparams.items() if k in names})
        module.load_state_dict(state["state_dict"])
    except (FileNotFoundError, CheckpointError, KeyError, RuntimeError, TypeError) as exn:
        raise ValueError(f"{owner}: cannot load checkpoint {checkpoint}: {exn}; {hint}") from exn
    return module.eval()


class _Learned(Verifier):
    kind: Kind = "mask"
    uses_context = True  # the chain passes the image and the instances still alive

    def __init__(self, *, checkpoint: str | None = None, min_prob: float = 0.5):
        """``checkpoint``: a ``fit-verifier`` checkpoint; None: the one the round's verifiers stage
        trains (bound by the engine). ``min_prob``: the probability at or above which it accepts."""
        if not 0.0 <= min_prob <= 1.0:
            raise ValueError(f"{type(self).__name__}.min_prob must lie in [0, 1], got {min_prob}")
        self.checkpoint, self.min_prob = checkpoint, float(min_prob)
        self._module = None if checkpoint is None else load_verifier(checkpoint, self.kind, type(self).__name__)

    def bind(self, checkpoint: str | os.PathLike) -> None:
        """Use ``checkpoint`` (the engine binds a round's own verifier; ``params()`` still says None)."""
        self._module = load_verifier(checkpoint, self.kind, type(self).__name__)

    def _net(self, candidate: Candidate) -> VerifierModule:
        if self._module is None:
            raise ValueError(f"{type(self).__name__} has no checkpoint: set its checkpoint, or enable "
                             "engine.verifier_training so that the round trains one")
        return self._module

    @staticmethod
    def _image(candidate: Candidate, image: Any) -> torch.Tensor:
        if image is None:
            raise ValueError(f"a learned verifier needs the image of {candidate.key} (pass image=...; the chain "
                             "passes it when given one, or reads it from chain.images)")
        pixels = image_tensor(image)
        if tuple(pixels.shape[1:]) != (candidate.height, candidate.width):
            raise ValueError(f"image of {candidate.key} is {tuple(pixels.shape[1:])}, the candidate "
                             f"{(candidate.height, candidate.width)}")
        return pixels

    @torch.no_grad()
    def probabilities(self, candidate: Candidate, *, image: Any = None, alive: torch.Tensor | None = None
                      ) -> torch.Tensor:
        raise NotImplementedError


class LearnedMaskVerifier(_Learned):
    """Keeps an instance when the MV net gives it probability >= ``min_prob`` of being a correct,
    complete instance of the phrase. A mask check: an instance it drops makes the pair non-exhaustive
    and flags it for review (``rejects_absent`` False), as the heuristic mask checks."""

    name = "learned_mask"
    kind = "mask"

    @torch.no_grad()
    def probabilities(self, candidate, *, image=None, alive=None):
        """[n] probability per instance."""
        net = self._net(candidate)
        if candidate.num_instances == 0:
            return torch.zeros(0)
        pixels, stats = candidate_mask_inputs(self._image(candidate, image), candidate)
        tokens = phrase_tokens([candidate.phrase]).expand(candidate.num_instances, PHRASE_WORDS)
        return net({"pixels": pixels, "stats": stats, "tokens": tokens}).sigmoid()

    def __call__(self, candidate: Candidate, *, image: Any = None, alive: torch.Tensor | None = None) -> Verdict:
        return Verdict(keep=self.probabilities(candidate, image=image) >= self.min_prob)


class LearnedExhaustivityVerifier(_Learned):
    """Judges the set still alive when it runs (put it last): exhaustive when the EV net gives
    probability >= ``min_prob`` that those masks cover every instance; keeps every instance."""

    name = "learned_exhaustivity"
    kind = "exhaustivity"

    @torch.no_grad()
    def probabilities(self, candidate, *, image=None, alive=None):
        """[1] probability that the alive set (every instance when ``alive`` is None) is exhaustive."""
        net = self._net(candidate)
        alive = torch.ones(candidate.num_instances, dtype=torch.bool) if alive is None else alive.bool()
        pixels, stats = set_inputs(self._image(candidate, image), candidate.masks[alive], candidate.masks[~alive],
                                   scores_in=candidate.scores[alive], scores_out=candidate.scores[~alive],
                                   presence=candidate.presence)
        batch = {"pixels": pixels[None], "stats": stats[None], "tokens": phrase_tokens([candidate.phrase])}
        return net(batch).sigmoid()

    def __call__(self, candidate: Candidate, *, image: Any = None, alive: torch.Tensor | None = None) -> Verdict:
        p = float(self.probabilities(candidate, image=image, alive=alive)[0])
        keep = torch.ones(candidate.num_instances, dtype=torch.bool)
        if p >= self.min_prob:
            return Verdict(keep=keep, exhaustive=True)
        return Verdict(keep=keep, exhaustive=False, flags=(f"P(exhaustive) {p:.2f}",))


def main(argv: list[str] | None = None) -> int:
    return fit_verifier(sys.argv[1:] if argv is None else list(argv))
