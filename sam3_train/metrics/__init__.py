"""Evaluation metrics as torchmetrics Metrics (no lightning imports).

- :class:`CGF1`: SAM 3's SA-Co cgF1 (with pmF1, IL_MCC, @50/@75, masks and boxes), sum states.
- :class:`CocoMeanAveragePrecision`: COCO mask and box mAP, one COCO image per (image, phrase) pair,
  gathered with ``all_gather_object`` so DDP ranks may see different numbers of pairs.
- :class:`PresenceAccuracy`: the presence head's image-level decision, sum states.
- :class:`TopQueryLocalisation`: the top query's box IoU with the ground truth and with its own mask's
  box, whatever its score (medians from a 0.01-bin histogram), sum states.

All take one entry per (image, phrase) pair: preds ``{"scores" [n], "masks" [n, H, W] bool,
"boxes" [n, 4] xyxy pixels}``, targets ``{"masks" [m, H, W] bool, "boxes" [m, 4] xyxy pixels,
"exhaustive" bool}``; :class:`CGF1` also reads ``"crowd"`` [m] bool (ignored ground truth) and
``"extra_sets"`` (other annotators' sets, scored best-of as SA-Co Gold); :class:`PresenceAccuracy`
takes presence probabilities [P] instead of preds.
"""

from sam3_train.metrics.cgf1 import CGF1, IOU_THRESHOLDS
from sam3_train.metrics.coco_map import CocoMeanAveragePrecision
from sam3_train.metrics.iou import box_iou_coco, mask_iou
from sam3_train.metrics.localisation import TopQueryLocalisation
from sam3_train.metrics.presence import PresenceAccuracy

__all__ = ["CGF1", "IOU_THRESHOLDS", "CocoMeanAveragePrecision", "PresenceAccuracy", "TopQueryLocalisation",
           "box_iou_coco", "mask_iou"]
