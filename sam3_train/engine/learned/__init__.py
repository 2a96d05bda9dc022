"""Learned verifiers (docs/data_engine.md, "Learned verifiers"): mask verification (MV: is this mask a
correct, complete instance of the phrase?) and exhaustivity verification (EV: do these masks cover
every instance of the phrase in the image?), as small nets trained on decisions the engine makes
itself, and as checks of the verifier chain.

    sam3-train fit-verifier --config configs/verifiers/base.yaml --config configs/verifiers/mv.yaml \\
        --data.examples=ex/mv-examples.pt --save_to=mv.ckpt
    chain = VerifierChain(verifiers=[ScoreVerifier(min_score=0.3), LearnedMaskVerifier(checkpoint="mv.ckpt"),
                                     LearnedExhaustivityVerifier(checkpoint="ev.ckpt")])

One concept per module, in the order the data flows:

    features.py   what the nets see: pixel crops, the set's planes, statistics, hashed phrase words
    examples.py   their training examples (proposals on labelled images matched to the labels,
                  perturbed ground truth, reviewed pairs) and the examples file
    nets.py       VerifierNet, the same small CNN for MV and EV
    module.py     VerifierModule (the LightningModule), score_examples (held-out accuracy) and
                  precision_threshold (the threshold that reaches a held-out precision)
    data.py       VerifierData (the LightningDataModule over one examples file)
    cli.py        ``sam3-train fit-verifier``: VerifierCLI on Sam3CLI; reading a base + overlay config
    chain.py      LearnedMaskVerifier / LearnedExhaustivityVerifier for the chain, loading a trained
                  one, binding a round's own, ShardImages (the pool's images by sample key)
    stage.py      the round's verifiers stage: propose on the labelled set, examples, both fits

Why not the detector's own encoders, as SAM 3's verifiers build on large models: the detector is
retrained every round, so features from round k's ViT would not mean the same to a verifier in round
k + 1, and the write stage holds the image but not the ViT's features (recomputing them would double
the propose step's cost). What the detector knows enters as statistics instead: its score, presence,
mask stability and flip agreement. The honest cost: a small net learns appearance from the labelled
set only, and a phrase word it never saw gets an untrained embedding.

The package sits above the engine's core (candidates, verifiers, manifest, matching, sources): those
never import it; rounds.py, review.py and audit.py use it where a chain holds learned verifiers.
"""

from sam3_train.engine.learned.chain import (
    LearnedExhaustivityVerifier,
    LearnedMaskVerifier,
    ShardImages,
    bind_round_verifiers,
    load_verifier,
)
from sam3_train.engine.learned.cli import VerifierCLI, fit_verifier, read_verifier_config
from sam3_train.engine.learned.data import VerifierData
from sam3_train.engine.learned.examples import Examples, load_examples, make_examples
from sam3_train.engine.learned.module import VerifierModule, precision_threshold, score_examples
from sam3_train.engine.learned.nets import VerifierNet

__all__ = [
    "Examples",
    "LearnedExhaustivityVerifier",
    "LearnedMaskVerifier",
    "ShardImages",
    "VerifierCLI",
    "VerifierData",
    "VerifierModule",
    "VerifierNet",
    "bind_round_verifiers",
    "fit_verifier",
    "load_examples",
    "load_verifier",
    "make_examples",
    "precision_threshold",
    "read_verifier_config",
    "score_examples",
]
