"""The data engine's settings, and how an engine config is read.

An engine config is a ``sam3-train`` config (the trainer, model and data of every round's fit) plus
an ``engine:`` section holding :class:`DataEngine`. It usually comes as two files, the base config
and an overlay with the engine section (and any overrides of the base), read in order by the
``sam3-train`` CLI's own parser with an ``engine`` group added: one parse, the same schema, links,
type checks and error messages as ``sam3-train fit``::

    cfg, settings = load_config(["configs/shapes_tiny.yaml", "configs/engine/shapes.yaml"],
                                ["trainer.max_steps=50", "engine.rounds=1"])

Overrides are ``key=value`` (the CLI's ``--key=value``, the value parsed for the option's type).
``cfg`` is the parsed base config as a plain dict, without the engine section; a round's fit gets a
copy with its own output paths and training shards (:func:`round_fit_config`), written next to the
round's checkpoint and read back by ``Sam3CLI`` exactly as ``sam3-train fit`` would.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, instantiate_class

from sam3_train.atomic import write_bytes_atomic
from sam3_train.cli import Sam3CLI, as_list, redirect_outputs
from sam3_train.data import Sam3DataModule
from sam3_train.engine.candidates import STABILITY_OFFSET
from sam3_train.engine.manifest import FIT_DIR
from sam3_train.engine.verifiers import (
    ExhaustivityVerifier,
    FlipConsistencyVerifier,
    HardNegativeMiner,
    ScoreVerifier,
    StabilityVerifier,
    Verifier,
    VerifierChain,
)
from sam3_train.lit import Sam3LitModule

PhraseSource = Literal["queries", "vocabulary", "labelled"]


def default_verifiers(*, flip_tta: bool = True) -> list[Verifier]:
    """Score first (see verifiers.py), then the mask checks, then exhaustivity."""
    chain: list[Verifier] = [ScoreVerifier(min_score=0.5), StabilityVerifier(min_iou=0.8)]
    if flip_tta:
        chain.append(FlipConsistencyVerifier(min_iou=0.7))
    chain.append(ExhaustivityVerifier(low=0.2, high=0.7))
    return chain


@dataclass(kw_only=True)
class VerifierTraining:
    """The round's ``verifiers`` stage (learned/stage.py): train the learned MV and EV on the labelled
    set, proposed on by the round's proposing model, before the write stage uses them.

    Args:
        base_config: the ``sam3-train fit-verifier`` config both fits share (model, trainer, data
            settings; the stage sets the examples file, the outputs and ``save_to``).
        mask_config, exhaustivity_config: the overlay of each fit on ``base_config`` (read after it,
            as ``fit-verifier --config base --config overlay`` reads them).
        accept_iou: mask IoU with an unclaimed true instance at which a proposal is a correct mask,
            and at which a set covers a true instance (learned/examples.py).
        min_score: proposals below this score make no examples.
        max_rejects_per_pair: at most this many rejected proposals per pair (the highest-scored).
        perturb: add ground-truth rows (true masks accepted; shifted, eroded, merged ones rejected;
            true sets complete and less one instance).
        reviewed: add the pairs people changed in earlier rounds' imported reviews.
        seed: seed of the perturbations.
    """

    base_config: str = "configs/verifiers/base.yaml"
    mask_config: str = "configs/verifiers/mv.yaml"
    exhaustivity_config: str = "configs/verifiers/ev.yaml"
    accept_iou: float = 0.5
    min_score: float = 0.05
    max_rejects_per_pair: int = 10
    perturb: bool = True
    reviewed: bool = True
    seed: int = 0

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(kw_only=True)
class DataEngine:
    """Settings of ``tools/data_engine.py`` (docs/data_engine.md); the ``engine:`` section of its config.

    Args:
        work_dir: where rounds live: ``{work_dir}/round-000``, ``round-001``, ... (and ``split/``).
        rounds: pseudo-labelling rounds after round 0 (round 0 trains on the labelled set only).
        labelled: shard pattern of the labelled set (``::``-joined allowed).
        pool: shard pattern of the unlabelled pool.
        labelled_fraction: instead of ``labelled`` / ``pool``: split the data's train split (``data.
            train_shards`` or the shapes train split) into this share of labelled images and a pool
            of the rest with labels stripped (phrases kept as non-exhaustive queries).
        split_seed: seed of that split.
        split_shards: shards per part of the split (at least ranks x workers).
        checkpoint: a ``Sam3LitModule`` checkpoint to use as round 0's model instead of fitting one.
        phrases: what to ask of each pool image: ``queries`` (its own query phrases), ``vocabulary``
            (every phrase of the ``vocabulary`` file), ``labelled`` (every phrase of the labelled set).
        vocabulary: phrase file, one per line, ``#`` comments (``phrases: vocabulary``).
        labelled_weight: share of training samples drawn from the labelled set (normalised with
            ``pseudo_weight``; 0 leaves the source out).
        pseudo_weight: share of training samples drawn from the round's pseudo-labels.
        fit_from: ``base``: every round trains the config's model afresh (the same budget per round);
            ``previous``: every round starts from the previous round's weights.
        flip_tta: also propose on the horizontally flipped image (needed by ``FlipConsistencyVerifier``).
        min_score: score floor of a proposed detection (at most the exhaustivity band's low and the
            miner's fire_low: a detection dropped here can neither make a pair uncertain nor be mined).
        max_detections: detections kept per pair (by score).
        stability_offset: logit offset of the loose (-offset) and tight (+offset) masks.
        batch_size: images per propose forward (each brings all its phrases).
        num_workers: dataloader workers of the propose step.
        verifiers: the chain, in order (None: :func:`default_verifiers`).
        negatives: the hard-negative miner (None: ``HardNegativeMiner()``).
        max_count: samples per pseudo-label shard.
        eval_shards: held-out split evaluated after every fit (None: the data's test split).
        verifier_training: train the learned verifiers in every round k >= 1 (the ``verifiers`` stage,
            between propose and write); the chain's ``LearnedMaskVerifier`` /
            ``LearnedExhaustivityVerifier`` without a checkpoint use them. None: no such stage.
    """

    work_dir: str = "runs/engine"
    rounds: int = 2
    labelled: str | None = None
    pool: str | None = None
    labelled_fraction: float | None = None
    split_seed: int = 0
    split_shards: int = 8
    checkpoint: str | None = None
    phrases: PhraseSource = "queries"
    vocabulary: str | None = None
    labelled_weight: float = 1.0
    pseudo_weight: float = 1.0
    fit_from: Literal["base", "previous"] = "base"
    flip_tta: bool = True
    min_score: float = 0.05
    max_detections: int = 100
    stability_offset: float = STABILITY_OFFSET
    batch_size: int = 4
    num_workers: int = 1
    verifiers: list[Verifier] | None = None
    negatives: HardNegativeMiner | None = None
    max_count: int = 1000
    eval_shards: str | None = None
    verifier_training: VerifierTraining | None = None

    def __post_init__(self) -> None:
        if self.verifiers is None:
            self.verifiers = default_verifiers(flip_tta=self.flip_tta)
        self.verifiers = list(self.verifiers)
        self.negatives = self.negatives or HardNegativeMiner()
        self._check()

    def _check(self) -> None:
        """Settings that contradict each other fail here, before any round starts (no filesystem checks)."""
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
        unbound = [type(v).__name__ for v in self.verifiers if v.uses_context and getattr(v, "checkpoint", "") is None]
        if unbound and self.verifier_training is None:
            raise ValueError(f"DataEngine: {', '.join(unbound)} name no checkpoint: set their checkpoint, or set "
                             "verifier_training so that every round trains them")

    def chain(self) -> VerifierChain:
        return VerifierChain(verifiers=self.verifiers)

    def propose_params(self) -> dict[str, Any]:
        return {"flip_tta": self.flip_tta, "min_score": self.min_score, "max_detections": self.max_detections,
                "stability_offset": self.stability_offset}

    def thresholds(self) -> dict[str, Any]:
        """The manifest's thresholds: every verifier's arguments, the miner's, the propose step's."""
        out = {"verifiers": self.chain().thresholds(), "negatives": self.negatives.params(),
               "propose": self.propose_params()}
        if self.verifier_training is not None:
            out["verifier_training"] = self.verifier_training.params()
        return out


# ------------------------------------------------------------------------------------------ reading
def make_cli(cli_class: type[Sam3CLI], args: list[str], **kwargs: Any) -> Sam3CLI:
    """``cli_class(Sam3LitModule, Sam3DataModule, args=args, run=False)`` as ``sam3-train`` builds it
    (its parser mode), without a saved config. Its warning that ``sys.argv`` holds arguments
    too is silenced: they are the engine front's own."""
    parser_kwargs = kwargs.pop("parser_kwargs", {})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python")
        return cli_class(Sam3LitModule, Sam3DataModule, parser_kwargs=parser_kwargs, args=args, run=False,
                         save_config_callback=None, **kwargs)


class EngineCLI(Sam3CLI):
    """Sam3CLI's parser with an ``engine`` group (:class:`DataEngine`). Builds only the engine's
    settings: the trainer, model and data are built per stage and round, from the round's config."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_class_arguments(DataEngine, "engine")

    def instantiate_classes(self) -> None:
        self.settings = self.parser.instantiate(Namespace(engine=self.config.engine)).engine


def load_config(configs: str | Path | list[str | Path],
                overrides: list[str] | None = None) -> tuple[dict[str, Any], DataEngine]:
    """(the parsed config without its engine section, as a plain dict; the engine's settings).

    ``configs`` are read in order (a later file's values replace an earlier one's; lists are
    replaced whole); ``overrides`` are ``key=value``. A missing file, an unknown key or a value of the
    wrong type raises (``argparse.ArgumentError``, naming it); contradicting settings raise ValueError.
    """
    configs = [configs] if isinstance(configs, (str, Path)) else list(configs)
    for path in configs:
        if not Path(path).is_file():
            raise FileNotFoundError(f"config {path} does not exist")
    args = [a for path in configs for a in ("--config", str(path))]
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        args.append(f"--{item}")
    cli = make_cli(EngineCLI, args, parser_kwargs={"exit_on_error": False})
    cfg = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))
    cfg.pop("engine")
    return cfg, cli.settings


def trainer_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """The trainer settings every engine Trainer shares: where and how the processes run."""
    trainer = cfg.get("trainer", {})
    keys = ("accelerator", "devices", "num_nodes", "strategy", "precision")
    built = {k: trainer[k] for k in keys if trainer.get(k) is not None}
    if isinstance(built.get("strategy"), dict):  # a strategy given by class_path / init_args
        built["strategy"] = instantiate_class((), built["strategy"])
    return built


def round_fit_config(cfg: dict[str, Any], *, round_dir: Path, train_shards: str | None,
                     test_shards: str | None = None, name: str | None = None) -> dict[str, Any]:
    """The config of one round's fit: every written path under ``round_dir/fit``, the round's training
    (None: the config's) and test shards, the W&B run named ``name`` (None: the config's W&B name, or
    ``engine``, then ``-{round_dir.name}``); everything else as the engine config says."""
    out = redirect_outputs(cfg, Path(round_dir) / FIT_DIR)
    for logger in as_list(out["trainer"].get("logger")):
        if isinstance(logger, dict) and logger.get("class_path", "").endswith("WandbLogger"):
            args = logger["init_args"]
            args["name"] = name or f"{args.get('name') or 'engine'}-{Path(round_dir).name}"
    data = out.setdefault("data", {})
    if train_shards is not None:
        data["train_shards"] = train_shards
    if test_shards is not None:
        data["test_shards"] = test_shards
    return out


def write_config(cfg: dict[str, Any], path: Path) -> None:
    """``cfg`` as YAML (keys in their order), written atomically."""
    write_bytes_atomic(path, yaml.safe_dump(cfg, sort_keys=False, width=120).encode())
