"""Does the top query's box sit on an object? A DDP-safe torchmetrics Metric of box localisation.

cgF1 reads masks, and box cgF1 only the detections scoring >= 0.5; neither says whether the box head
has learned *where* objects are (issue 28: masks that find the right shapes, boxes beside them).
This metric reads, for every exhaustive pair with at least one target instance and whatever its
score, the highest-scoring query (the first on ties, as ``postprocess`` orders them):

- ``top_box_iou``: its box's best IoU with the pair's ground-truth boxes;
- ``top_mask_box_iou``: the best ground-truth IoU of its mask's tight bounding box (does the mask
  localise where the box does not?);
- ``box_mask_iou``: the IoU of its box with its own mask's tight bounding box (do the two heads agree?).

A mask's tight box spans its foreground pixels' edges: columns x0..x1 give [x0, x1 + 1) in the
pixel coordinates that boxes use. An empty mask has no box: both mask-box IoUs count 0. IoUs are
pycocotools' (``box_iou_coco``), as box cgF1 computes them.

States are sums (DDP ranks may see any number of pairs): per measure a histogram of 100 bins of
width 0.01 over [0, 1] (bin k holds k/100 <= IoU < (k+1)/100; IoU 1 joins the last bin) and the
exact IoU sum. The median is read from the histogram with every IoU rounded down to its bin's lower
edge: it lies at most 0.01 below the exact median, and ``median >= t`` holds exactly as the exact
median's for every t on the 0.01 grid (such as the aim's 0.7). The shares ``@50`` and ``@75`` are
exact, since 0.5 and 0.75 are bin edges.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

from sam3_train.metrics.iou import box_iou_coco

BINS = 100  # histogram bins over [0, 1]: the median's resolution is 1 / BINS = 0.01
MEASURES = ("top_box_iou", "top_mask_box_iou", "box_mask_iou")
_EDGES = torch.arange(BINS + 1, dtype=torch.float64) / BINS  # k / 100, the nearest double to each grid value


def mask_box(mask: torch.Tensor) -> torch.Tensor | None:
    """[H, W] bool mask -> [4] float64 xyxy pixels of its tight box (pixel edges), None when empty."""
    rows = torch.nonzero(mask.any(1)).flatten()
    cols = torch.nonzero(mask.any(0)).flatten()
    if len(rows) == 0:
        return None
    return torch.stack([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]).to(torch.float64)


def iou_bins(ious: torch.Tensor) -> torch.Tensor:
    """[n] IoU in [0, 1] -> [n] int64 histogram bin (k / 100 <= IoU < (k + 1) / 100; 1.0 in the last)."""
    index = torch.bucketize(ious.to(torch.float64), _EDGES.to(ious.device), right=True) - 1
    return index.clamp(0, BINS - 1)


def histogram_median(hist: torch.Tensor) -> float:
    """Median of the values a [BINS] count histogram holds, each read as its bin's lower edge (the
    mean of the two middle values for an even count); -1.0 when it holds none."""
    n = int(hist.sum())
    if n == 0:
        return -1.0
    cumulative = hist.cumsum(0)
    # Bins of the ceil(n/2)-th and the (n//2 + 1)-th smallest values (1-based): the same one for odd n.
    middle = torch.searchsorted(cumulative, torch.tensor([(n + 1) // 2, n // 2 + 1], device=hist.device))
    return float(_EDGES[middle.cpu()].mean())


class TopQueryLocalisation(Metric):
    """Box localisation of each pair's top query (module docstring), from sum states.

    ``update(preds, targets)`` takes one entry per (image, phrase) pair, every query's detection or at
    least the top-scoring one (``postprocess(..., score_threshold=0.0, max_detections=1)``):
        preds[i]    {"scores": [n] float, "boxes": [n, 4] xyxy pixels, "masks": [n, H, W] bool}, n >= 1
        targets[i]  {"boxes": [m, 4] xyxy pixels, "exhaustive": bool}
    in one pixel frame. Pairs without instances (m = 0) are not read; non-exhaustive pairs are skipped
    (the top query may sit on an unlabelled instance) and counted.

    ``compute()`` returns 0-d float64 tensors, for each measure M of ``MEASURES``:
        M_median     median IoU to 0.01 (rounded down, module docstring); -1 without pairs
        M_mean       exact mean IoU; -1 without pairs
        M@50, M@75   share of pairs with IoU >= 0.5, >= 0.75 (fractions); -1 without pairs
    and ``localisation_num_pairs`` (pairs read), ``localisation_num_skipped`` (non-exhaustive pairs
    with instances).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        """
        Args:
            kwargs: torchmetrics ``Metric`` options (``process_group``, ``sync_on_compute``, ...).
        """
        super().__init__(**kwargs)
        for name in MEASURES:
            self.add_state(f"{name}_hist", default=torch.zeros(BINS, dtype=torch.int64), dist_reduce_fx="sum")
            self.add_state(f"{name}_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_skipped", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, preds: Sequence[dict[str, torch.Tensor]], targets: Sequence[dict[str, Any]]) -> None:
        """Add a batch of pairs; see the class docstring for the dict keys and shapes."""
        if len(preds) != len(targets):
            raise ValueError(f"TopQueryLocalisation.update got {len(preds)} predictions for {len(targets)} targets")
        values: dict[str, list[float]] = {name: [] for name in MEASURES}
        skipped = 0
        for pred, target in zip(preds, targets):
            gt = target["boxes"]
            if len(gt) == 0:
                continue
            if not bool(target["exhaustive"]):
                skipped += 1
                continue
            if len(pred["scores"]) == 0:
                raise ValueError(
                    "TopQueryLocalisation needs each pair's top query whatever its score; got a pair with "
                    "no detection: postprocess with score_threshold=0.0"
                )
            top = int(torch.argmax(pred["scores"]))  # the first of equal maxima, as postprocess orders them
            box = pred["boxes"][top].to(torch.float64)  # (4,)
            gt = gt.to(device=box.device, dtype=torch.float64)  # (m, 4)
            own = mask_box(pred["masks"][top])
            values["top_box_iou"].append(float(box_iou_coco(box[None], gt).max()))
            values["top_mask_box_iou"].append(float(box_iou_coco(own[None], gt).max()) if own is not None else 0.0)
            values["box_mask_iou"].append(float(box_iou_coco(box[None], own[None])[0, 0]) if own is not None else 0.0)
        self.num_skipped.add_(skipped)
        for name, ious in values.items():
            if ious:
                ious_t = torch.tensor(ious, dtype=torch.float64, device=self.num_skipped.device)
                getattr(self, f"{name}_hist").add_(torch.bincount(iou_bins(ious_t), minlength=BINS))
                getattr(self, f"{name}_sum").add_(ious_t.sum())

    def compute(self) -> dict[str, torch.Tensor]:
        """The named values of the class docstring."""
        out: dict[str, float] = {}
        for name in MEASURES:
            hist = getattr(self, f"{name}_hist")
            n = int(hist.sum())
            out[f"{name}_median"] = histogram_median(hist)
            out[f"{name}_mean"] = float(getattr(self, f"{name}_sum")) / n if n else -1.0
            for threshold in (50, 75):  # bins 50 and 75 start at 0.5 and 0.75: exact shares
                out[f"{name}@{threshold}"] = int(hist[threshold * BINS // 100:].sum()) / n if n else -1.0
        out["localisation_num_pairs"] = float(self.top_box_iou_hist.sum())
        out["localisation_num_skipped"] = float(self.num_skipped)
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}
