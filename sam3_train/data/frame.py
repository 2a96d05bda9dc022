"""The model's square frame and the original image's pixels.

The eval-time transform resizes each image so that its content (h x w, ``Batch.image_sizes``) sits at
the top-left of the model's S x S input and pads the rest; the detector predicts boxes normalised
to that S x S input and mask logits on a grid over it. :class:`InputFrame` undoes this for one
image: crop the content, scale it to the original H x W (``Batch.original_sizes``; the content's
own h x w when the metric works in the input's pixels). Evaluation, prediction, the data engine
and the video path all map through it, so none maps a box or a mask differently::

    frame = InputFrame.of(batch, image, batch.original_sizes)
    boxes = frame.boxes_to_original(pred_boxes, clamp=True)   # [n, 4] xyxy pixels of the original
    logits = frame.mask_logits_to_original(pred_masks)       # [n, H, W] float32
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sam3_train.box_ops import cxcywh_to_xyxy
from sam3_train.data.batch import Batch


@dataclass(frozen=True)
class InputFrame:
    """One image's place in the model input.

    Attributes:
        side: S, the square input's side in pixels.
        content: (h, w), the image content at the input's top-left, in input pixels.
        original: (H, W), the original image's size in pixels (``content`` to stay in input pixels).
    """

    side: int
    content: tuple[int, int]
    original: tuple[int, int]

    @classmethod
    def of(cls, batch: Batch, image: int, original_sizes: torch.Tensor | None = None) -> InputFrame:
        """Image ``image`` of ``batch``; ``original_sizes`` [B, 2] (H, W), default the content's size."""
        content = tuple(batch.image_sizes[image].tolist())
        original = tuple(original_sizes[image].tolist()) if original_sizes is not None else content
        return cls(side=batch.images.shape[-1], content=content, original=original)

    def boxes_to_original(self, boxes: torch.Tensor, *, clamp: bool = False) -> torch.Tensor:
        """[n, 4] normalised cxcywh over the S x S input -> [n, 4] float xyxy pixels of the original
        image; ``clamp``: clipped to it (predictions; ground truth is kept as the data gives it)."""
        (h, w), (height, width) = self.content, self.original
        boxes = cxcywh_to_xyxy(boxes.float())
        boxes = boxes * (boxes.new_tensor([width / w, height / h, width / w, height / h]) * self.side)
        if clamp:
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        return boxes

    def crop_content(self, masks: torch.Tensor) -> torch.Tensor:
        """[..., S, S] masks at the input's resolution -> [..., h, w] the content (a view)."""
        h, w = self.content
        return masks[..., :h, :w]

    def mask_logits_to_original(self, logits: torch.Tensor) -> torch.Tensor:
        """[n, m, m] mask logits over the input (any grid) -> [n, H, W] float32 logits of the original
        image: bilinear to S x S, crop the content, bilinear to H x W (half-pixel centres)."""
        if logits.shape[0] == 0:
            return torch.zeros(0, *self.original, dtype=torch.float32, device=logits.device)
        full = F.interpolate(logits[:, None].float(), size=(self.side, self.side), mode="bilinear", align_corners=False)
        full = self.crop_content(full)
        return F.interpolate(full, size=self.original, mode="bilinear", align_corners=False)[:, 0]
