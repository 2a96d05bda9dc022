"""CPU stand-ins for the two compiled ops transformers' SAM 3 video model fetches from the Hub.

``Sam3VideoModel`` runs mask NMS over each frame's detections (``det_nms_thresh``) and fills small
holes / removes small sprinkles in masklets (``fill_hole_area``) with ``generic_nms`` and ``cc_2d`` of
the Hub kernel ``kernels-community/cv-utils`` (CUDA). Offline or on a CPU the download fails and
transformers *silently skips* both steps (one warning), which changes which objects get tracked.
:func:`install` puts these equivalents in its place, following Meta's own CPU fallbacks
(``sam3/perflib/nms.py``: greedy NMS on the IoU matrix; ``sam3/perflib/connected_components.py``:
8-connected components with their pixel counts).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from transformers.models.sam3_video import modeling_sam3_video

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


class CpuVisionOps:
    """``generic_nms`` and ``cc_2d`` with the Hub kernel's call signatures, in numpy / scipy."""

    @staticmethod
    def generic_nms(ious: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
                    use_iou_matrix: bool = True) -> torch.Tensor:
        """Greedy NMS on an [n, n] IoU matrix: indices [k] int64 of the kept rows, best score first.
        A row is dropped when its IoU with a kept, better-scoring row exceeds ``iou_threshold``."""
        iou = ious.detach().float().cpu().numpy()
        order = np.argsort(-scores.detach().float().cpu().numpy(), kind="stable")
        kept = []
        while order.size:
            best = int(order[0])
            kept.append(best)
            order = order[1:][iou[best, order[1:]] <= iou_threshold]
        return torch.tensor(kept, dtype=torch.int64, device=scores.device)

    @staticmethod
    def cc_2d(masks: torch.Tensor, get_counts: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """8-connected components of [B, 1, H, W] binary masks: labels (0 = background) and, per
        pixel, the pixel count of its component (0 on background), both [B, 1, H, W] int32."""
        binary = masks.detach().cpu().numpy().astype(bool)
        labels = np.zeros(binary.shape, dtype=np.int32)
        counts = np.zeros(binary.shape, dtype=np.int32)
        for b in range(binary.shape[0]):
            lab, num = ndimage.label(binary[b, 0], structure=_EIGHT_CONNECTED)
            labels[b, 0] = lab
            sizes = np.bincount(lab.ravel(), minlength=num + 1).astype(np.int32)
            sizes[0] = 0
            counts[b, 0] = sizes[lab]
        return torch.from_numpy(labels).to(masks.device), torch.from_numpy(counts).to(masks.device)


def install(*, hub_kernels: bool = False) -> None:
    """Use :class:`CpuVisionOps` in ``Sam3VideoModel`` unless ``hub_kernels`` asks for transformers'
    own loader (which downloads ``kernels-community/cv-utils``; CUDA machines with a network)."""
    if hub_kernels:
        if isinstance(modeling_sam3_video.cv_utils_kernel, CpuVisionOps):
            modeling_sam3_video.cv_utils_kernel = None  # let transformers try the Hub on first use
        return
    modeling_sam3_video.cv_utils_kernel = CpuVisionOps()
