"""Per-pair targets packed once per batch, so matchers and loss terms index them as tensors.

``Batch.targets`` is a list of P dicts (one per (image, phrase) pair):
    boxes       [n, 4]     normalised cxcywh float
    masks       [n, H, W]  bool, in the padded input frame (optional: box-only data has none)
    exhaustive  bool       False: unmatched predictions of this pair are not punished
n may be 0 (a negative phrase).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sam3_train.box_ops import cxcywh_to_xyxy


@dataclass
class PackedTargets:
    """The targets of P pairs, flattened and padded.

    Fields (shapes; N = total boxes, T = max boxes in one pair):
        boxes        [N, 4]     cxcywh, pairs concatenated in order
        boxes_xyxy   [N, 4]     the same boxes as xyxy
        num_boxes    [P]        long, boxes per pair
        offsets      [P]        long, index in ``boxes`` of each pair's first box
        padded_boxes [P, T, 4]  cxcywh, zeros past ``num_boxes``
        valid        [P, T]     bool, real (not padding) slots of ``padded_boxes``
        exhaustive   [P]        bool
        masks        P tensors [n, H, W] bool, or None when any pair has no ``masks``
    """

    boxes: torch.Tensor
    boxes_xyxy: torch.Tensor
    num_boxes: torch.Tensor
    offsets: torch.Tensor
    padded_boxes: torch.Tensor
    valid: torch.Tensor
    exhaustive: torch.Tensor
    masks: list[torch.Tensor] | None

    @property
    def num_pairs(self) -> int:
        return self.num_boxes.shape[0]

    @property
    def has_instance(self) -> torch.Tensor:
        """[P] bool: the pair's phrase has at least one instance in its image."""
        return self.num_boxes > 0

    @classmethod
    def from_list(cls, targets: list[dict], *, device: torch.device | None = None) -> PackedTargets:
        """Pack ``Batch.targets``; ``device`` defaults to that of the first pair's boxes."""
        if device is None:
            device = targets[0]["boxes"].device if targets else torch.device("cpu")
        boxes_list = [t["boxes"].to(device=device, dtype=torch.float32).reshape(-1, 4) for t in targets]
        num_boxes = torch.tensor([b.shape[0] for b in boxes_list], dtype=torch.long, device=device)
        offsets = torch.cumsum(num_boxes, 0) - num_boxes
        boxes = torch.cat(boxes_list) if boxes_list else torch.zeros(0, 4, device=device)
        max_boxes = int(num_boxes.max()) if len(boxes_list) else 0
        padded = boxes.new_zeros(len(boxes_list), max_boxes, 4)
        valid = torch.arange(max_boxes, device=device)[None, :] < num_boxes[:, None]
        padded[valid] = boxes
        exhaustive = torch.tensor([bool(t.get("exhaustive", True)) for t in targets], dtype=torch.bool, device=device)
        masks = _masks(targets, num_boxes.tolist(), device)
        return cls(
            boxes=boxes,
            boxes_xyxy=cxcywh_to_xyxy(boxes),
            num_boxes=num_boxes,
            offsets=offsets,
            padded_boxes=padded,
            valid=valid,
            exhaustive=exhaustive,
            masks=masks,
        )

    def gather_masks(self, pair: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Masks of the packed ``target`` indices (belonging to pairs ``pair``): [M, H, W] bool.

        Gathers pair by pair so the batch's masks are never concatenated in full.
        """
        assert self.masks is not None, "these targets carry no masks"
        if target.numel() == 0:
            h, w = self.masks[0].shape[-2:] if self.masks else (0, 0)
            return torch.zeros(0, h, w, dtype=torch.bool, device=target.device)
        local = target - self.offsets[pair]
        out = torch.empty(target.shape[0], *self.masks[0].shape[-2:], dtype=torch.bool, device=target.device)
        for p in torch.unique(pair).tolist():
            rows = (pair == p).nonzero(as_tuple=True)[0]
            out[rows] = self.masks[p][local[rows]].bool()
        return out


def _masks(targets: list[dict], num_boxes: list[int], device: torch.device) -> list[torch.Tensor] | None:
    """Each pair's masks; None for box-only batches. A negative pair may omit its (empty) masks."""
    given = [t.get("masks") for t in targets]
    if all(m is None for m in given):
        return None
    missing = [p for p, (m, n) in enumerate(zip(given, num_boxes)) if m is None and n > 0]
    if missing:
        raise ValueError(
            f"targets of pairs {missing} have boxes but no 'masks' while other pairs have masks: "
            "give every pair with instances its masks, or none (box-only training)"
        )
    size = next(m for m in given if m is not None).shape[-2:]
    return [
        m.to(device) if m is not None else torch.zeros(0, *size, dtype=torch.bool, device=device) for m in given
    ]


def as_packed(targets: list[dict] | PackedTargets, device: torch.device) -> PackedTargets:
    """Accept either form, so matchers can be called alone (tests) or inside the criterion."""
    return targets if isinstance(targets, PackedTargets) else PackedTargets.from_list(targets, device=device)
