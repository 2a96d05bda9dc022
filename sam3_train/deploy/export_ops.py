"""Export-only replacements: where transformers' SAM 3 does not go through ``torch.onnx.export``, an
equal formulation that does, switched on only on the copy of the detector being exported.

Each replacement computes what the original computes (tests/test_deploy.py checks that the two agree
on the same inputs); none is ever used for training or PyTorch prediction.

- **Attention.** transformers' SDPA path decomposes, in torch.onnx's decomposition step, into a
  ``view`` of a transposed tensor that fails ("Cannot view a tensor with shape ... and strides ...").
  transformers' own ``eager`` attention (matmul, softmax, matmul) exports: the same arithmetic.
- **Exemplar boxes' RoI pooling.** ``Sam3GeometryEncoder._encode_boxes`` calls
  ``torchvision.ops.roi_align`` with ``boxes.unbind(0)``, one tensor per pair: a Python list whose
  length fixes the number of pairs in the graph. torchvision's other documented box format, one
  ``[K, 5]`` tensor of (pair index, x0, y0, x1, y1), is the same operator on the same boxes and keeps
  the number of pairs (and of boxes, 0 included) dynamic.
- **Prompt encoding.** ``Sam3Detector.encode_prompt`` asks ``bool((box_labels >= 0).any())`` to skip
  the exemplar encoder when no pair has a box and ``encode_empty_geometry`` is off: a branch on data,
  which torch.export refuses. With ``encode_empty_geometry`` on (the default, Meta's behaviour) the
  encoder always runs and the answer is never used: the replacement runs it without asking. A
  detector with it off is refused (its graph would depend on the data).
"""

from __future__ import annotations

import copy
import types

import torch
import torchvision
from transformers.models.sam3.modeling_sam3 import Sam3GeometryEncoder, box_cxcywh_to_xyxy

from sam3_train.model import Sam3Detector


def encode_boxes_with_roi_tensor(
    self: Sam3GeometryEncoder,
    boxes: torch.Tensor,  # [P, E, 4] normalised cxcywh
    boxes_mask: torch.Tensor,  # [P, E] bool, True = a box
    boxes_labels: torch.Tensor,  # [P, E] long
    vision_features: torch.Tensor,  # [P, C, h, w]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Sam3GeometryEncoder._encode_boxes`` (transformers 5.x) with one ``[P * E, 5]`` RoI tensor in
    place of ``unbind(0)``'s list; everything else as there (float32 features: no bf16 cast)."""
    num_pairs, num_boxes = boxes.shape[:2]
    height, width = vision_features.shape[-2:]
    boxes_embed = self.boxes_direct_project(boxes)
    scale = torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
    boxes_xyxy = box_cxcywh_to_xyxy(boxes) * scale.view(1, 1, 4)  # [P, E, 4] feature-map pixels
    pair_index = torch.arange(num_pairs, device=boxes.device, dtype=boxes.dtype)
    pair_index = pair_index[:, None, None].expand(num_pairs, num_boxes, 1)
    rois = torch.cat([pair_index, boxes_xyxy], dim=-1).reshape(-1, 5)  # [P * E, 5], pairs in order, as the list
    sampled = torchvision.ops.roi_align(vision_features, rois, self.roi_size)
    pooled = self.boxes_pool_project(sampled).view(num_pairs, num_boxes, self.hidden_size)
    boxes_embed = boxes_embed + pooled
    center_x, center_y, box_width, box_height = boxes.unbind(-1)
    pos_enc = self._encode_box_coordinates(center_x.flatten(), center_y.flatten(), box_width.flatten(),
                                           box_height.flatten())
    boxes_embed = boxes_embed + self.boxes_pos_enc_project(pos_enc.view(num_pairs, num_boxes, pos_enc.shape[-1]))
    return self.label_embed(boxes_labels.long()) + boxes_embed, boxes_mask


def encode_prompt_always_with_geometry(
    self: Sam3Detector,
    text: torch.Tensor,  # [P, L, C] projected text
    text_mask: torch.Tensor,  # [P, L] bool
    boxes: torch.Tensor,  # [P, E, 4] normalised cxcywh (E may be 0)
    box_labels: torch.Tensor,  # [P, E] long: 1 positive, 0 negative, -1 padding
    image_levels: list[torch.Tensor],
    image_pos: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Sam3Detector.encode_prompt`` for ``encode_empty_geometry=True`` in float32, without its branch
    on the box labels: [P, L + E + 1, C] and its mask [P, L + E + 1] bool."""
    return self.append_geometry(text, text_mask, boxes.to(text.dtype), box_labels, image_levels, image_pos)


def exportable_copy(detector: Sam3Detector, *, in_place: bool = False) -> Sam3Detector:
    """A deep copy of ``detector`` in eval mode with the replacements above switched on (the original
    is left as it is). ``in_place``: switch them on in ``detector`` itself and return it (one copy of
    the weights less at the export's peak, for the released size on a small machine; the replacements
    compute what the originals do, tested). Raises ValueError for ``encode_empty_geometry=False``."""
    if not detector.encode_empty_geometry:
        raise ValueError(
            "ONNX export needs encode_empty_geometry=True (the default, Meta's behaviour): with it off the "
            "exemplar encoder runs or not depending on the batch's boxes, which one graph cannot express."
        )
    copied = detector.eval() if in_place else copy.deepcopy(detector).eval()
    copied.set_attn_implementation("eager")
    copied.encode_prompt = types.MethodType(encode_prompt_always_with_geometry, copied)
    geometry = copied.geometry_encoder
    geometry._encode_boxes = types.MethodType(encode_boxes_with_roi_tensor, geometry)
    return copied
