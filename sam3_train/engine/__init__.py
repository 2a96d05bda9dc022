"""The data engine's pure parts: candidate records, verifiers, hard-negative mining, shard writing,
the round manifest and human review (see docs and issue 6). The round loop that runs the detector
(propose with ``trainer.predict``, then fit) composes these."""

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
