"""Collation of transformed samples into a :class:`~sam3_train.data.batch.Batch`.

Each sample is ``(image [3, S, S] float, target)`` after :mod:`sam3_train.data.transforms`; every
query of every image becomes one (image, phrase) pair, images in order, queries in order.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from sam3_train.box_ops import xyxy_to_cxcywh
from sam3_train.data.batch import Batch
from sam3_train.data.transforms import as_mask_tensor

Tokenizer = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]  # phrases -> ids, mask [N, L]


class Collator:
    """Samples -> Batch. Boxes and exemplar boxes become normalised cxcywh (divided by S).

    Tokenising is the slow part of collation; phrases repeat a lot, so their token rows are cached
    (``cache_size`` distinct phrases, then the cache is cleared).
    """

    def __init__(self, *, tokenizer: Tokenizer, cache_size: int = 65536):
        self.tokenizer = tokenizer
        self.cache_size = cache_size
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def tokenize(self, phrases: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """phrases -> (input_ids [P, L], attention_mask [P, L]) through the cache."""
        missing = sorted({p for p in phrases if p not in self._cache})
        if missing:
            if len(self._cache) + len(missing) > self.cache_size:
                self._cache.clear()
            ids, mask = self.tokenizer(missing)
            for i, p in enumerate(missing):
                self._cache[p] = (ids[i], mask[i])
        if not phrases:
            ids, mask = self.tokenizer(["x"])  # only for the context length
            return ids.new_zeros((0, ids.shape[1])), mask.new_zeros((0, mask.shape[1]))
        rows = [self._cache[p] for p in phrases]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def __call__(self, samples: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> Batch:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        images = torch.stack([img for img, _ in samples])  # [B, 3, S, S]
        side = images.shape[-1]
        pair_image, phrases, targets, exemplars = [], [], [], []  # exemplars: (pair, boxes [e, 4], labels [e])
        for b, (_, t) in enumerate(samples):
            boxes = xyxy_to_cxcywh(t["boxes"]) / side  # [N, 4]
            masks = as_mask_tensor(t["masks"]).bool()  # [N, S, S]
            ex_all = xyxy_to_cxcywh(t["exemplar_boxes"]) / side if len(t["exemplar_boxes"]) else None  # [M, 4]
            for q in t["queries"]:
                idx = torch.as_tensor(q["instances"], dtype=torch.long)
                if q["exemplars"]:
                    exemplars.append((len(phrases), ex_all[torch.as_tensor(q["exemplars"])],
                                      torch.as_tensor(q["exemplar_labels"], dtype=torch.long)))
                pair_image.append(b)
                phrases.append(q["phrase"])
                target = {"boxes": boxes[idx], "masks": masks[idx], "exhaustive": bool(q["exhaustive"]),
                          "eval_exhaustive": bool(q.get("eval_exhaustive", q["exhaustive"]))}
                if q.get("extra_sets"):  # other annotators' sets (SA-Co Gold), for evaluation
                    target["extra_sets"] = [
                        {"boxes": boxes[rows], "masks": masks[rows], "exhaustive": bool(s["exhaustive"])}
                        for s in q["extra_sets"] for rows in [torch.as_tensor(s["instances"], dtype=torch.long)]
                    ]
                targets.append(target)
        num_ex = max((len(e[1]) for e in exemplars), default=0)
        exemplar_boxes = torch.zeros((len(phrases), num_ex, 4))
        exemplar_labels = torch.full((len(phrases), num_ex), -1, dtype=torch.long)
        for p, eb, el in exemplars:
            exemplar_boxes[p, : len(eb)] = eb
            exemplar_labels[p, : len(el)] = el
        input_ids, attention_mask = self.tokenize(phrases)
        return Batch(
            images=images,
            image_sizes=torch.tensor([t["size"] for _, t in samples], dtype=torch.long).reshape(-1, 2),
            pair_image=torch.tensor(pair_image, dtype=torch.long),
            input_ids=input_ids,
            attention_mask=attention_mask,
            exemplar_boxes=exemplar_boxes,
            exemplar_labels=exemplar_labels,
            targets=targets,
            phrases=phrases,
            keys=[t["key"] for _, t in samples],
            image_ids=[t.get("image_id", t["key"]) for _, t in samples],
            original_sizes=torch.tensor([t["original_size"] for _, t in samples], dtype=torch.long).reshape(-1, 2),
            sources=[t["source"] for _, t in samples] if all("source" in t for _, t in samples) else [],
        )
