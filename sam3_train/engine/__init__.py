"""The data engine (docs/data_engine.md, issue 6).

Exported here, the pure parts: candidate records, verifiers, hard-negative mining, shard writing,
the round manifest and human review. The round loop lives beside them and imports Lightning:
``proposals`` (the DDP propose step), ``labelling`` (verify + write one proposer's images),
``sources`` (phrase sources, the labelled / pool split, weighted training mixes), ``training``
(a round's fit and evaluation through ``Sam3CLI``), ``rounds`` (``Engine``: stages, markers,
resumption), ``round_review`` (review export / import on a round directory), ``settings`` and
``config`` (the ``DataEngine`` settings inside a ``sam3-train`` config), ``dist`` (the process group).
Front: ``tools/data_engine.py``.
"""

from sam3_train.engine.candidates import Candidate, candidate_from_logits, mask_iou
from sam3_train.engine.manifest import (
    clean_unfinished,
    finalize_round,
    read_manifest,
    round_finished,
    shard_paths,
)
from sam3_train.engine.negatives import HardNegativeMiner
from sam3_train.engine.review import export_review, import_review, read_samples
from sam3_train.engine.verifiers import (
    ExhaustivityVerifier,
    FlipConsistencyVerifier,
    ScoreVerifier,
    StabilityVerifier,
    Verdict,
    Verified,
    Verifier,
    VerifierChain,
)
from sam3_train.engine.writer import RoundWriter, pseudo_sample

__all__ = [
    "Candidate",
    "ExhaustivityVerifier",
    "FlipConsistencyVerifier",
    "HardNegativeMiner",
    "RoundWriter",
    "ScoreVerifier",
    "StabilityVerifier",
    "Verdict",
    "Verified",
    "Verifier",
    "VerifierChain",
    "candidate_from_logits",
    "clean_unfinished",
    "export_review",
    "finalize_round",
    "import_review",
    "mask_iou",
    "pseudo_sample",
    "read_manifest",
    "read_samples",
    "round_finished",
    "shard_paths",
]
