"""The data engine (docs/data_engine.md): pseudo-labelling rounds that grow a training set.

One module per concept, in the order a round uses them:

    settings.py       DataEngine (the engine's settings block) and reading an engine config through
                      the sam3-train CLI's parser; each round's fit config (paths under the round)
    sources.py        reading shard samples; phrase sources; the labelled / pool split; weighted mixes
    proposals.py      the propose step under DDP: pool batches, detector + flip TTA through
                      model.postprocess, each rank's proposals file
    candidates.py     Candidate (one pair's proposals in original pixels, masks decoded when first read)
                      and its JSON record
    proposal_files.py a rank's proposals file (gzip'd JSON lines, one member per image) and its index
    verifiers.py      the verifier chain, its verdicts, hard-negative mining
    matching.py       the greedy mask matcher (proposals claim true instances in score order)
    learned/          the learned verifiers (a package, its __init__ maps it): MV and EV nets, their
                      LightningModule, data and examples, ``sam3-train fit-verifier``, the round's
                      verifiers stage, LearnedMaskVerifier / LearnedExhaustivityVerifier for the chain
    pseudo_labels.py  verified candidates -> pseudo-labelled samples -> a rank's shards
    review.py         human review: COCO export of flagged pairs, import of the corrections
    label_studio/     the same review in a Label Studio server (review.json <-> tasks, the decisions back
                      as an edited review.json for review.py's import) and a SAM 3 concept ML backend;
                      needs the ``review`` extra, so nothing here imports it
    training.py       a round's fit and held-out evaluation through Sam3CLI
    manifest.py       the round directory: every file and folder name, stage markers, kill points, the manifest
    rounds.py         Engine: the round loop, stages, resumption
    audit.py          pseudo-label quality and the verifiers' own precision / recall against withheld labels

Mask IoU lives in ``sam3_train.metrics.iou``, rank and world size and the collectives in
``sam3_train.dist``, atomic file writes in ``sam3_train.atomic``. No core module (candidates,
proposal_files, verifiers, matching, manifest, sources, pseudo_labels) imports ``learned/``; rounds.py,
review.py and audit.py use it where a chain holds learned verifiers. Exported here, the parts that
need no Lightning: candidates, verifiers, shard writing, the manifest, review and the sample reader.
Front: ``tools/data_engine.py``.
"""

from sam3_train.engine.candidates import Candidate, candidate_from_logits
from sam3_train.engine.manifest import (
    clean_unfinished,
    finalize_round,
    read_manifest,
    round_finished,
    shard_paths,
)
from sam3_train.engine.pseudo_labels import RoundWriter, pseudo_sample
from sam3_train.engine.review import export_review, import_review
from sam3_train.engine.sources import read_samples
from sam3_train.engine.verifiers import (
    BoxMaskVerifier,
    ExhaustivityVerifier,
    FlipConsistencyVerifier,
    HardNegativeMiner,
    InstancesOnly,
    ScoreVerifier,
    StabilityVerifier,
    Verdict,
    Verified,
    Verifier,
    VerifierChain,
)

__all__ = [
    "BoxMaskVerifier",
    "Candidate",
    "ExhaustivityVerifier",
    "FlipConsistencyVerifier",
    "HardNegativeMiner",
    "InstancesOnly",
    "RoundWriter",
    "ScoreVerifier",
    "StabilityVerifier",
    "Verdict",
    "Verified",
    "Verifier",
    "VerifierChain",
    "candidate_from_logits",
    "clean_unfinished",
    "finalize_round",
    "export_review",
    "import_review",
    "pseudo_sample",
    "read_manifest",
    "read_samples",
    "round_finished",
    "shard_paths",
]
