"""The data engine's settings, carried inside a ``sam3-train`` config as a callback entry.

An engine config is an ordinary ``sam3-train`` config (the trainer, model and data of every round's
fit; ``sam3-train fit --config configs/engine_shapes.yaml`` trains on the configured data) whose
``trainer.callbacks`` holds one ``sam3_train.engine.settings.DataEngine`` entry with the engine's
own settings. The compromise, honestly: the LightningCLI schema has no free top-level section, and a
callback entry is the one place where typed settings can ride along without changing the CLI.
Outside ``tools/data_engine.py`` the callback does nothing; in a round's fit it logs the round's
data sources once to the loggers.

    trainer:
      callbacks:
        - class_path: sam3_train.engine.settings.DataEngine
          init_args: {work_dir: runs/engine_shapes, rounds: 2, labelled_fraction: 0.1, phrases: queries}
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L

from sam3_train.engine.candidates import STABILITY_OFFSET
from sam3_train.engine.negatives import HardNegativeMiner
from sam3_train.engine.verifiers import (
    ExhaustivityVerifier,
    FlipConsistencyVerifier,
    ScoreVerifier,
    StabilityVerifier,
    Verifier,
    VerifierChain,
)

PhraseSource = Literal["queries", "vocabulary", "labelled"]


def default_verifiers(*, flip_tta: bool = True) -> list[Verifier]:
    """Score first (see verifiers.py), then the mask checks, then exhaustivity."""
    chain: list[Verifier] = [ScoreVerifier(min_score=0.5), StabilityVerifier(min_iou=0.8)]
    if flip_tta:
        chain.append(FlipConsistencyVerifier(min_iou=0.7))
    chain.append(ExhaustivityVerifier(low=0.2, high=0.7))
    return chain


class DataEngine(L.Callback):
    """Settings of ``tools/data_engine.py run`` (see docs/data_engine.md).

    Args:
        work_dir: where rounds live: ``{work_dir}/round-000``, ``round-001``, ... (and ``split/``).
        rounds: pseudo-labelling rounds after round 0 (round 0 trains on the labelled set only).
        labelled: shard pattern of the labelled set (``::``-joined allowed).
        pool: shard pattern of the unlabelled pool.
        labelled_fraction: instead of ``labelled`` / ``pool``: split the data's train split (``data.
            train_shards`` or the shapes train split) into this share of labelled images and a pool
            of the rest with labels stripped (phrases kept as non-exhaustive queries).
        split_seed: seed of that split; split_shards: shards per part (at least ranks x workers).
        checkpoint: a ``Sam3LitModule`` checkpoint to use as round 0's model instead of fitting one.
        phrases: what to ask of each pool image: ``queries`` (its own query phrases), ``vocabulary``
            (every phrase of the ``vocabulary`` file), ``labelled`` (every phrase of the labelled set).
        vocabulary: phrase file, one per line, ``#`` comments (``phrases: vocabulary``).
        labelled_weight, pseudo_weight: share of training samples drawn from the labelled set and from
            the round's pseudo-labels (normalised; 0 leaves a source out).
        fit_from: ``base``: every round trains the config's model afresh (the same budget per round);
            ``previous``: every round starts from the previous round's weights.
        flip_tta, min_score, max_detections, stability_offset: the propose step (proposals.py).
        batch_size: images per propose forward (each brings all its phrases); num_workers: its loaders.
        verifiers: the chain, in order (None: :func:`default_verifiers`).
        negatives: the hard-negative miner (None: ``HardNegativeMiner()``).
        max_count: samples per pseudo-label shard.
        eval_shards: held-out split evaluated after every fit (None: the data's test split).
    """

    def __init__(
        self,
        *,
        work_dir: str = "runs/engine",
        rounds: int = 2,
        labelled: str | None = None,
        pool: str | None = None,
        labelled_fraction: float | None = None,
        split_seed: int = 0,
        split_shards: int = 8,
        checkpoint: str | None = None,
        phrases: PhraseSource = "queries",
        vocabulary: str | None = None,
        labelled_weight: float = 1.0,
        pseudo_weight: float = 1.0,
        fit_from: Literal["base", "previous"] = "base",
        flip_tta: bool = True,
        min_score: float = 0.05,
        max_detections: int = 100,
        stability_offset: float = STABILITY_OFFSET,
        batch_size: int = 4,
        num_workers: int = 1,
        verifiers: list[Verifier] | None = None,
        negatives: HardNegativeMiner | None = None,
        max_count: int = 1000,
        eval_shards: str | None = None,
    ):
        self.work_dir, self.rounds = work_dir, rounds
        self.labelled, self.pool = labelled, pool
        self.labelled_fraction, self.split_seed, self.split_shards = labelled_fraction, split_seed, split_shards
        self.checkpoint = checkpoint
        self.phrases, self.vocabulary = phrases, vocabulary
        self.labelled_weight, self.pseudo_weight, self.fit_from = labelled_weight, pseudo_weight, fit_from
        self.flip_tta, self.min_score, self.max_detections = flip_tta, min_score, max_detections
        self.stability_offset, self.batch_size, self.num_workers = stability_offset, batch_size, num_workers
        self.verifiers = list(verifiers) if verifiers is not None else default_verifiers(flip_tta=flip_tta)
        self.negatives = negatives or HardNegativeMiner()
        self.max_count, self.eval_shards = max_count, eval_shards
        self.round_info: dict[str, Any] | None = None  # set by the engine for the fit it runs
        self._check()

    def _check(self) -> None:
        """Settings that contradict each other fail here, before any round starts (no filesystem
        checks: ``sam3-train fit`` builds this callback too)."""
        if self.rounds < 0:
            raise ValueError(f"DataEngine.rounds must be >= 0, got {self.rounds}")
        if self.labelled_fraction is not None:
            if not 0.0 < self.labelled_fraction <= 1.0:
                raise ValueError(f"DataEngine.labelled_fraction must lie in (0, 1], got {self.labelled_fraction}")
            if self.labelled or self.pool:
                raise ValueError("DataEngine: give labelled_fraction or labelled/pool, not both")
        if self.phrases == "vocabulary" and not self.vocabulary:
            raise ValueError("DataEngine.phrases is 'vocabulary' but no vocabulary file is set")
        if min(self.labelled_weight, self.pseudo_weight) < 0 or self.labelled_weight + self.pseudo_weight <= 0:
            raise ValueError(f"DataEngine weights must be >= 0 and not both 0, got labelled "
                             f"{self.labelled_weight}, pseudo {self.pseudo_weight}")
        names = [v.name for v in self.verifiers]
        if "flip" in names and not self.flip_tta:
            raise ValueError("DataEngine: FlipConsistencyVerifier needs flip_tta: true")
        floors = {"negatives.fire_low": self.negatives.fire_low}
        floors.update({f"{v.name}.low": v.low for v in self.verifiers if isinstance(v, ExhaustivityVerifier)})
        for name, value in floors.items():
            if self.min_score > value:
                raise ValueError(f"DataEngine.min_score {self.min_score} is above {name} {value}: detections "
                                 "dropped by the floor could never make a pair uncertain or be mined")
        VerifierChain(verifiers=self.verifiers)  # unique names

    def chain(self) -> VerifierChain:
        return VerifierChain(verifiers=self.verifiers)

    def propose_params(self) -> dict[str, Any]:
        return {"flip_tta": self.flip_tta, "min_score": self.min_score, "max_detections": self.max_detections,
                "stability_offset": self.stability_offset}

    def thresholds(self) -> dict[str, Any]:
        """The manifest's thresholds: every verifier's arguments, the miner's, the propose step's."""
        return {"verifiers": self.chain().thresholds(), "negatives": self.negatives.params(),
                "propose": self.propose_params()}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.round_info is None:
            return  # a plain `sam3-train fit`: nothing to do
        for logger in trainer.loggers:
            logger.log_hyperparams({"engine": self.round_info})
