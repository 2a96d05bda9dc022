"""From detector outputs to per-pair detections in the original image's pixels.

Score = sigmoid(class logit) x sigmoid(presence logit). The model sees the image resized so that its
content (``image_sizes``, h x w) sits at the top-left of an S x S input (the eval-time transform);
boxes and masks are mapped from that frame back to each image's original size by
:class:`sam3_train.data.frame.InputFrame`. Evaluation, prediction and the data engine's propose step
all go through :func:`postprocess`, so they cannot map a box or a mask differently.
"""

from __future__ import annotations

import torch

from sam3_train.data.batch import Batch
from sam3_train.data.frame import InputFrame


def detection_scores(outputs: dict) -> torch.Tensor:
    """[P, Q] scores in [0, 1]: the query's class probability times the pair's presence probability."""
    return outputs["pred_logits"].sigmoid() * outputs["presence_logit"].sigmoid().unsqueeze(-1)


@torch.no_grad()
def postprocess(
    outputs: dict,
    batch: Batch,
    *,
    original_sizes: torch.Tensor | None = None,  # [B, 2] (H, W); default: the content size in the input
    score_threshold: float = 0.5,
    mask_threshold: float = 0.0,
    max_detections: int | None = None,
    keep_above: float | None = None,
    mask_logits: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """One dict per pair: ``scores`` [n], ``boxes`` [n, 4] xyxy pixels, ``masks`` [n, H, W] bool,
    ``presence`` [] probability; with ``mask_logits`` also ``mask_logits`` [n, H, W] float32 (the
    logits at the original size, for thresholds other than ``mask_threshold``). Detections are
    sorted by score (ties by query index), those below ``score_threshold`` dropped, at most
    ``max_detections`` kept, except that every detection scoring at least ``keep_above`` is kept
    (SA-Co scoring reads every query above its 0.5 threshold, uncapped, as Meta's evaluator).

    ``batch.image_sizes`` gives the (h, w) of each image's content inside the S x S input.
    """
    scores = detection_scores(outputs)
    presence = outputs["presence_logit"].sigmoid()
    masks = outputs.get("pred_masks")
    results = []
    for p in range(scores.shape[0]):
        frame = InputFrame.of(batch, int(batch.pair_image[p]), original_sizes)
        order = scores[p].argsort(descending=True, stable=True)
        order = order[scores[p, order] >= score_threshold]
        if max_detections is not None:
            above = int((scores[p, order] >= keep_above).sum()) if keep_above is not None else 0
            order = order[: max(max_detections, above)]
        boxes = frame.boxes_to_original(outputs["pred_boxes"][p, order], clamp=True)
        result = {"scores": scores[p, order], "boxes": boxes, "presence": presence[p]}
        if masks is not None:
            logits = frame.mask_logits_to_original(masks[p, order])
            result["masks"] = logits > mask_threshold
            if mask_logits:
                result["mask_logits"] = logits
        results.append(result)
    return results

