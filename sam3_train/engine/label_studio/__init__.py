"""Human review in Label Studio, and a SAM 3 concept backend for it (docs/label_studio.md).

    config.py   the labelling configs: the review project's, the concept backend's
    tasks.py    review.json <-> tasks (brush masks, scores kept); annotations -> an edited review.json
    client.py   the round trip through a running server (label_studio_sdk): export_project, import_project
    backend.py  the ML backend: a typed phrase / exemplar boxes -> every instance's mask

An import ends in :func:`sam3_train.engine.review.import_round`, the COCO review's own import: there is
one import path. Needs the ``review`` extra (label-studio-sdk); the server runs from its own venv
(tools/setup_label_studio.sh).
"""

from sam3_train.engine.label_studio.config import concept_config, control_names, review_config
from sam3_train.engine.label_studio.tasks import brush_to_mask, mask_to_brush, review_tasks, reviewed_coco

__all__ = ["brush_to_mask", "concept_config", "control_names", "mask_to_brush", "review_config", "review_tasks",
           "reviewed_coco"]
