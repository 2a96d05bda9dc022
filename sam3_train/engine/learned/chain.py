"""The learned verifiers as checks of the chain (verifiers.py): a trained MV or EV net behind the
:class:`~sam3_train.engine.verifiers.Verifier` interface, how a checkpoint is loaded, how the write
stage binds the ones a round trained, and where the chain gets the pool's images.

    chain = VerifierChain(verifiers=[ScoreVerifier(min_score=0.3), LearnedMaskVerifier(checkpoint="mv.ckpt"),
                                     LearnedExhaustivityVerifier(checkpoint="ev.ckpt")])
    chain(candidate, image=png_bytes)
    chain.images = ShardImages(pool_urls)                  # the write stage: images by sample key
    bind_round_verifiers(chain, round_dir)                 # those without a checkpoint: the round's own
"""

from __future__ import annotations

import inspect
import logging
import os
import tarfile
from typing import Any

import torch
import yaml

from sam3_train.checkpointing import CheckpointError, load_checkpoint_file
from sam3_train.data.schema import IMAGE_EXTENSIONS
from sam3_train.engine.candidates import Candidate
from sam3_train.engine.learned.features import PHRASE_WORDS, candidate_mask_inputs, phrase_tokens, set_inputs
from sam3_train.engine.learned.data import VerifierData
from sam3_train.engine.learned.module import VerifierModule, precision_threshold
from sam3_train.engine.learned.nets import Kind
from sam3_train.engine.manifest import EXAMPLES_FILES, verifier_checkpoint, verifier_config_name
from sam3_train.engine.verifiers import ScoreVerifier, Verdict, Verifier, image_tensor

log = logging.getLogger(__name__)
HINT = ("train one with `sam3-train fit-verifier --config configs/verifiers/base.yaml --config "
        "configs/verifiers/mv.yaml` (ev.yaml for EV) or the engine's verifiers stage")


def load_verifier(checkpoint: str | os.PathLike, kind: Kind, owner: str) -> VerifierModule:
    """A trained verifier in eval mode; one error naming the file and what to do when it cannot be used."""
    try:
        state = load_checkpoint_file(checkpoint)
        hparams = dict(state.get("hyper_parameters") or {})
        if hparams.get("kind") != kind:
            raise CheckpointError(f"it holds no {kind} verifier (hyper-parameters {hparams or 'missing'})")
        names = inspect.signature(VerifierModule).parameters  # LightningCLI adds _class_path, _instantiator
        module = VerifierModule(**{k: v for k, v in hparams.items() if k in names})
        module.load_state_dict(state["state_dict"])
    except (FileNotFoundError, CheckpointError, KeyError, RuntimeError, TypeError) as exn:
        raise ValueError(f"{owner}: cannot load checkpoint {checkpoint}: {exn}; {HINT}") from exn
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
    and flags it for review (``rejects_absent`` False), as the heuristic mask checks.

    ``target_precision`` (with a round-trained verifier, ``checkpoint`` None): instead of ``min_prob``,
    the lowest probability at which the round's MV reaches this precision on its held-out examples
    (the detector's proposals on held-out labelled images; module.precision_threshold), set when the
    engine binds it; ``calibration`` then says the threshold, and the held-out precision and recall."""

    name = "learned_mask"
    kind = "mask"

    def __init__(self, *, checkpoint: str | None = None, min_prob: float = 0.5,
                 target_precision: float | None = None):
        super().__init__(checkpoint=checkpoint, min_prob=min_prob)
        if target_precision is not None and not 0.0 < target_precision <= 1.0:
            raise ValueError(f"LearnedMaskVerifier.target_precision must lie in (0, 1], got {target_precision}")
        if target_precision is not None and checkpoint is not None:
            raise ValueError("LearnedMaskVerifier.target_precision calibrates the verifier a round trains on that "
                             "round's held-out examples: leave checkpoint unset, or set min_prob instead")
        self.target_precision = target_precision
        self._calibration: dict[str, Any] | None = None

    def params(self) -> dict[str, Any]:
        """Constructor arguments (``target_precision`` only when set: the thresholds recorded by rounds
        written before it existed stay the same)."""
        out = super().params()
        if self.target_precision is None:
            out.pop("target_precision")
        return out

    @property
    def calibration(self) -> dict[str, Any] | None:
        return self._calibration

    def calibrate(self, data: VerifierData, min_score: float = 0.0) -> dict[str, Any]:
        """Set the acceptance threshold from ``target_precision`` on the held-out rows of ``data`` (the
        examples the verifier was fitted on) scored at least ``min_score`` (the score check the chain
        runs before this verifier)."""
        self._calibration = precision_threshold(self._net(None), data, self.target_precision, min_score=min_score)
        if self._calibration["min_prob"] is None:
            log.warning("LearnedMaskVerifier: no threshold reaches precision %s on %d held-out proposals of %s: "
                        "it keeps nothing", self.target_precision, self._calibration["rows"], data.examples)
        return self._calibration

    def _threshold(self) -> float:
        if self.target_precision is None:
            return self.min_prob
        if self._calibration is None:
            raise ValueError("LearnedMaskVerifier.target_precision is set but the verifier was not calibrated: the "
                             "engine does it when it binds the round's verifier (bind_round_verifiers)")
        found = self._calibration["min_prob"]
        return float("inf") if found is None else found

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
        return Verdict(keep=self.probabilities(candidate, image=image) >= self._threshold())


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


def bind_round_verifiers(chain: Any, round_dir: str | os.PathLike) -> None:
    """Point the chain's learned verifiers that name no checkpoint at the ones the round trained;
    fails naming the round when it trained none. An MV with ``target_precision`` is calibrated on the
    round's held-out examples behind the chain's score checks that run before it."""
    for i, verifier in enumerate(chain.verifiers):
        if isinstance(verifier, (LearnedMaskVerifier, LearnedExhaustivityVerifier)) and verifier.checkpoint is None:
            path = verifier_checkpoint(round_dir, verifier.kind)
            if not path.is_file():
                raise FileNotFoundError(f"{type(verifier).__name__} has no checkpoint and {path} does not exist: "
                                        "set its checkpoint or engine.verifier_training")
            verifier.bind(path)
            if isinstance(verifier, LearnedMaskVerifier) and verifier.target_precision is not None:
                # the fit's own data settings (its held-out split), its examples found beside the checkpoint
                config = yaml.safe_load((path.parent / verifier_config_name(verifier.kind)).read_text())
                data = VerifierData(**{**config.get("data", {}), "examples": str(path.parent / EXAMPLES_FILES[verifier.kind])})
                gate = max((v.min_score for v in chain.verifiers[:i] if isinstance(v, ScoreVerifier)), default=0.0)
                found = verifier.calibrate(data, min_score=gate)
                log.info("%s: MV threshold %s for held-out precision %s (precision %s, recall %s on %d proposals)",
                         round_dir, found["min_prob"], verifier.target_precision, found["precision"],
                         found["recall"], found["rows"])


class ShardImages:
    """Random access to the images of some shards by sample key, for ``VerifierChain.images`` (the
    write stage's learned verifiers look at the pool images): an offset per key (only tar headers are
    read up front), bytes read and decoded on demand to [3, H, W] uint8, the last one cached (the
    chain asks for an image once per phrase)."""

    def __init__(self, urls: list[str]):
        self.where: dict[str, tuple[str, int, int]] = {}
        for url in urls:
            with tarfile.open(url) as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    if member.isfile() and ext in IMAGE_EXTENSIONS:
                        self.where[key] = (url, member.offset_data, member.size)
        self._last: tuple[str, torch.Tensor] | None = None

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def __getitem__(self, key: str) -> torch.Tensor:
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        if key not in self.where:
            raise KeyError(f"sample {key} has no image in the shards read ({len(self.where)} images)")
        url, offset, size = self.where[key]
        with open(url, "rb") as f:
            f.seek(offset)
            image = image_tensor(f.read(size))
        self._last = (key, image)
        return image


def calibrations(chain: Any) -> dict[str, dict[str, Any]]:
    """``{verifier name: calibration}`` of the chain's calibrated verifiers (for the write stage's marker)."""
    return {v.name: v.calibration for v in chain.verifiers
            if isinstance(v, LearnedMaskVerifier) and v.calibration is not None}
