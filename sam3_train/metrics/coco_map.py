"""COCO mask and box mAP over (image, phrase) pairs, safe under DDP with uneven ranks.

Each pair is one COCO "image" with a single category (as SA-Co's evaluation does), so phrases never
compete with each other. Ranks keep their pairs in a plain list (masks RLE-encoded, only the top
``max(max_detections)`` predictions per pair, which is all COCOeval reads); ``compute`` gathers the
lists with ``torch.distributed.all_gather_object`` (lists of any length) and runs pycocotools'
COCOeval on every rank, so every rank returns the same numbers.

Why not torchmetrics' MeanAveragePrecision: its list states abort ``compute`` under DDP when ranks saw
different numbers of images. Compromise: this metric holds ragged per-rank lists (mAP needs every
detection), so ``forward`` and ``merge_state`` are not supported; use ``update`` and ``compute``.
COCO breaks exact score ties across images by image order, and ranks see the pairs in a different
order than one process does: with tied scores the result can move in the last digits.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchmetrics import Metric

from sam3_train.metrics.iou import METRIC_PREFIX, IouType, box_xyxy_to_coco, checked_iou_types

_CATEGORY = 1  # the single category of every pair


def encode_masks(masks: torch.Tensor) -> list[dict[str, Any]]:
    """[n, H, W] bool masks -> n COCO RLEs (``{"size": [H, W], "counts": bytes}``)."""
    if len(masks) == 0:
        return []
    # pycocotools wants Fortran-ordered uint8 (H, W, n).
    array = np.asfortranarray(masks.detach().to("cpu", torch.uint8).permute(1, 2, 0).numpy())
    return mask_utils.encode(array)


class CocoMeanAveragePrecision(Metric):
    """COCO mAP, mAP@50 and mAP@75 on masks and boxes, one COCO image per (image, phrase) pair.

    ``update(preds, targets)`` takes one entry per pair:
        preds[i]    {"scores": [n] float, "masks": [n, H, W] bool, "boxes": [n, 4] xyxy pixels}
        targets[i]  {"masks": [m, H, W] bool, "boxes": [m, 4] xyxy pixels, "exhaustive": bool}
    Masks are needed for ``segm`` and boxes for ``bbox`` only. All predictions are used (no score
    threshold), the top ``max(max_detections)`` by score per pair, as COCO does.

    ``compute()`` returns 0-d float64 tensors, COCO's -1 where undefined (no targets at all):
        mAP, mAP@50, mAP@75              segm: AP over IoU 0.50:0.95, at 0.50, at 0.75 (fractions)
        box_mAP, box_mAP@50, box_mAP@75  the same on boxes
        map_num_pairs, map_num_skipped   pairs evaluated, non-exhaustive pairs skipped
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        *,
        iou_types: Sequence[IouType] = ("segm", "bbox"),
        max_detections: Sequence[int] = (1, 10, 100),
        exhaustive_only: bool = True,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            iou_types: "segm", "bbox" or both.
            max_detections: COCO's three maxDets; mAP is read at the last (100 as in COCO and Meta's
                evaluator; SAM 3 has 200 queries).
            exhaustive_only: skip non-exhaustive pairs, whose unlabelled instances would count as false
                positives (Meta's ``exhaustive_only`` option; its default is False).
            kwargs: torchmetrics ``Metric`` options (``process_group`` is used for the gather).
        """
        super().__init__(**kwargs)
        self.iou_types = checked_iou_types(iou_types)
        if len(max_detections) != 3:
            raise ValueError(f"max_detections needs COCO's three values, e.g. (1, 10, 100); got {max_detections!r}")
        self.max_detections = sorted(int(d) for d in max_detections)
        self.exhaustive_only = exhaustive_only
        self._pairs: list[dict[str, Any]] = []
        self._skipped = 0

    def update(self, preds: Sequence[dict[str, torch.Tensor]], targets: Sequence[dict[str, Any]]) -> None:
        """Store a batch of pairs (RLE masks, float64 xywh boxes, scores) on the CPU."""
        if len(preds) != len(targets):
            raise ValueError(f"{type(self).__name__}.update got {len(preds)} predictions for {len(targets)} targets")
        segm, bbox = "segm" in self.iou_types, "bbox" in self.iou_types
        for pred, target in zip(preds, targets):
            if self.exhaustive_only and not bool(target["exhaustive"]):
                self._skipped += 1
                continue
            scores = pred["scores"].detach().to("cpu", torch.float64).numpy()
            # COCOeval keeps the top maxDets by a stable sort on -score: the same cut here saves memory.
            order = np.argsort(-scores, kind="mergesort")[: self.max_detections[-1]]
            index = torch.as_tensor(order, dtype=torch.long)
            pair: dict[str, Any] = {"dt_scores": scores[order].tolist()}
            if segm:
                height, width = target["masks"].shape[-2:]
                pair["size"] = (int(height), int(width))
                pair["gt_rles"] = encode_masks(target["masks"].bool())
                pair["dt_rles"] = encode_masks(pred["masks"][index.to(pred["masks"].device)].bool())
            if bbox:
                pair["gt_boxes"] = box_xyxy_to_coco(target["boxes"].detach().cpu()).tolist()
                pair["dt_boxes"] = box_xyxy_to_coco(pred["boxes"].detach().cpu()[index]).tolist()
            self._pairs.append(pair)

    def reset(self) -> None:
        super().reset()
        self._pairs = []
        self._skipped = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} supports update() and compute() only, not forward()")

    def merge_state(self, incoming_state: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__} gathers its pairs across ranks in compute()")

    def _gather(self) -> tuple[list[dict[str, Any]], int]:
        local = (self._pairs, self._skipped)
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(self.process_group) == 1:
            return local
        gathered: list[Any] = [None] * dist.get_world_size(self.process_group)
        dist.all_gather_object(gathered, local, group=self.process_group)
        return [p for pairs, _ in gathered for p in pairs], sum(s for _, s in gathered)

    def compute(self) -> dict[str, torch.Tensor]:
        """Gather every rank's pairs and run COCOeval; see the class docstring for the keys."""
        pairs, skipped = self._gather()
        out: dict[str, float] = {"map_num_pairs": float(len(pairs)), "map_num_skipped": float(skipped)}
        for t in self.iou_types:
            stats = self._evaluate(pairs, t) if pairs else [-1.0] * 3
            p = METRIC_PREFIX[t]
            out[f"{p}mAP"], out[f"{p}mAP@50"], out[f"{p}mAP@75"] = (float(s) for s in stats[:3])
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}

    def _evaluate(self, pairs: list[dict[str, Any]], iou_type: IouType) -> list[float]:
        images, gts, dts = [], [], []
        for image_id, pair in enumerate(pairs, start=1):
            segm = iou_type == "segm"
            height, width = pair["size"] if "size" in pair else (1, 1)  # boxes do not read the size
            images.append({"id": image_id, "height": height, "width": width})
            n_gt = len(pair["gt_rles"] if segm else pair["gt_boxes"])
            for k in range(n_gt):
                ann = {"image_id": image_id, "category_id": _CATEGORY, "iscrowd": 0}
                if "gt_rles" in pair:  # COCO's gt area is the mask area, for boxes too
                    ann["area"] = float(mask_utils.area(pair["gt_rles"][k]))
                if segm:
                    ann["segmentation"] = pair["gt_rles"][k]
                else:
                    ann["bbox"] = pair["gt_boxes"][k]
                    ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
                gts.append(ann)
            for k, score in enumerate(pair["dt_scores"]):
                ann = {"image_id": image_id, "category_id": _CATEGORY, "iscrowd": 0, "score": score}
                if segm:
                    ann["segmentation"] = pair["dt_rles"][k]
                    ann["area"] = float(mask_utils.area(ann["segmentation"]))
                else:  # as COCO's loadRes sets them for box results
                    ann["bbox"] = pair["dt_boxes"][k]
                    ann["area"] = ann["bbox"][2] * ann["bbox"][3]
                dts.append(ann)
        categories = [{"id": _CATEGORY, "name": "concept"}]
        coco_gt, coco_dt = _coco(images, categories, gts), _coco(images, categories, dts)
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        evaluator.params.maxDets = list(self.max_detections)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            evaluator.evaluate()
            evaluator.accumulate()
        return [_average_precision(evaluator, iou) for iou in (None, 0.5, 0.75)]


def _average_precision(evaluator: COCOeval, iou: float | None) -> float:
    """COCO's ``summarize`` AP, all areas, at the last maxDets. (``summarize`` itself reads mAP at a
    hard-coded maxDets of 100, and -1 whenever 100 is not among the maxDets.)"""
    p = evaluator.params
    precision = evaluator.eval["precision"]  # (iou thresholds, recall points, categories, areas, maxDets)
    if iou is not None:
        precision = precision[np.flatnonzero(p.iouThrs == iou)]
    precision = precision[:, :, :, p.areaRngLbl.index("all"), len(p.maxDets) - 1]
    valid = precision[precision > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def _coco(images: list[dict], categories: list[dict], annotations: list[dict]) -> COCO:
    for ann_id, ann in enumerate(annotations, start=1):
        ann["id"] = ann_id
    coco = COCO()
    coco.dataset = {"images": images, "categories": categories, "annotations": annotations}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
