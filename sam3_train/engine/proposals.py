"""The propose step: the detector's candidates for every (image, phrase) pair of a pool, per rank.

    trainer = L.Trainer(strategy="ddp", devices=2, callbacks=[ProposalWriter(round_dir=d)], logger=False)
    trainer.predict(ProposeModule(checkpoint=ckpt), datamodule=ProposeData(pool=..., phrases=...),
                    return_predictions=False)

``ProposeData`` streams the pool (``ShardStream``: rank r reads shards r, r + R, ...; an iterable
dataset gets no sampler from Lightning), asking each image the phrase source's phrases.
``ProposeModule`` runs the detector once per batch (every image encoded once for all of its
phrases), and again on the horizontally flipped batch ("left" and "right" swapped in the phrases),
and turns each pair into a :class:`~sam3_train.engine.candidates.Candidate`: detections above a
score floor, boxes in original pixels, masks at logits 0, -offset and +offset, flip masks matched
back. ``ProposalWriter`` writes each rank's records as JSON lines into
``proposals-rankNNN.tmp/``, renames the folder when the rank is done, then waits at a barrier.

A record (one line per image; masks as COCO RLE at the original size)::

    {"key", "height", "width", "pairs": [{"phrase", "presence", "scores": [n], "boxes": [n x xyxy],
     "masks", "loose", "tight": [n RLE], "flip": [n RLE] | null, "dropped": int}]}

``dropped``: detections above the floor beyond ``max_detections`` (such a pair cannot be exhaustive).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from sam3_train.box_ops import cxcywh_to_xyxy
from sam3_train.data import rle as rle_ops
from sam3_train.data.batch import Batch
from sam3_train.data.collate import Collator
from sam3_train.data.phrases import swap_left_right
from sam3_train.data.pipeline import ShardStream, SkipCounter, split_by_rank
from sam3_train.data.shards import expand_urls
from sam3_train.data.transforms import eval_transforms
from sam3_train.engine.candidates import STABILITY_OFFSET, Candidate, candidate_from_logits
from sam3_train.engine.dist import fault_point
from sam3_train.engine.manifest import SUMMARY, TMP_SUFFIX, file_sha256, write_json_atomic
from sam3_train.model.postprocess import detection_scores
from sam3_train.model.tokenizer import Sam3Tokenizer

log = logging.getLogger(__name__)
PROPOSALS = "proposals.jsonl"


def proposals_dir_name(rank: int) -> str:
    return f"proposals-rank{rank:03d}"


# ------------------------------------------------------------------------------------------ data
class PhraseSelector:
    """Per-image queries to ask: ``phrases`` for every image (a vocabulary, the labelled set's
    phrases), or, when None, the image's own query phrases (first occurrence of each). Instances are
    dropped (nothing to decode: the model proposes them); exemplar boxes stay, as prompts."""

    def __init__(self, phrases: list[str] | None = None):
        self.phrases = None if phrases is None else list(dict.fromkeys(phrases))

    def __call__(self, queries: list[dict[str, Any]], rng: Any) -> list[dict[str, Any]]:
        if self.phrases is not None:
            return [{"phrase": p, "exhaustive": False, "instances": [], "exemplars": []} for p in self.phrases]
        seen: dict[str, dict[str, Any]] = {}
        for q in queries:
            seen.setdefault(q["phrase"], {"phrase": q["phrase"], "exhaustive": False, "instances": [],
                                          "exemplars": list(q.get("exemplars", []))})
        return list(seen.values())


class ProposeData(L.LightningDataModule):
    """The pool as predict batches (eval transforms, every phrase of every image).

    Args:
        pool: shard pattern(s) of the pool (brace patterns, ``::``-joined, or a list of files).
        phrases: phrases asked of every image; None: each image's own query phrases.
        image_size: S (the detector's input side).
        batch_size: images per forward; a forward holds images x phrases pairs.
        num_workers: dataloader workers per rank.
        square_resize: SAM 3's square resize (as training); False keeps the aspect ratio.
        tokenizer_path: as ``Sam3DataModule.tokenizer_path``.
    """

    def __init__(self, *, pool: str | list[str], phrases: list[str] | None = None, image_size: int = 224,
                 batch_size: int = 4, num_workers: int = 1, square_resize: bool = True,
                 tokenizer_path: str | None = None):
        super().__init__()
        self.pool, self.phrases = pool, phrases
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.square_resize, self.tokenizer_path = square_resize, tokenizer_path
        self.skip_counter = SkipCounter()
        self.urls: list[str] = []
        self._tokenizer = None

    def setup(self, stage: str | None = None) -> None:
        self.urls = expand_urls(self.pool)  # a pattern that matches nothing fails here, naming it
        if self._tokenizer is None:
            self._tokenizer = Sam3Tokenizer.from_path_or_open_clip(self.tokenizer_path)
        rank, world = self.rank_and_world
        if len(self.urls) < world * max(1, self.num_workers):
            log.warning("pool has %d shards for %d ranks x %d workers: some read nothing",
                        len(self.urls), world, max(1, self.num_workers))

    @property
    def rank_and_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (0, 1) if trainer is None else (int(trainer.global_rank), int(trainer.world_size))

    @property
    def rank_urls(self) -> list[str]:
        """The pool shards this rank reads (the stream's own split: no shuffling in prediction)."""
        rank, world = self.rank_and_world
        return split_by_rank(list(self.urls), rank, world)

    @property
    def skipped_samples(self) -> int:
        return self.skip_counter.value

    def predict_dataloader(self) -> DataLoader:
        rank, world = self.rank_and_world
        stream = ShardStream(
            urls=self.urls, batch_size=self.batch_size,
            transforms=eval_transforms(image_size=self.image_size, square=self.square_resize),
            collate=Collator(tokenizer=self._tokenizer), select=PhraseSelector(self.phrases),
            rank=rank, world_size=world, shuffle=False, skip_counter=self.skip_counter,
            draft_size=self.image_size,
        )
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers)


# ------------------------------------------------------------------------------------------ model
def logits_to_original(logits: torch.Tensor, side: int, content: tuple[int, int],
                       original: tuple[int, int]) -> torch.Tensor:
    """[n, h, w] mask logits -> [n, H, W] float logits at the original size: the mapping of
    ``model.postprocess`` (input frame, crop the content, resize), kept as logits so that one
    upsampling serves the three thresholds."""
    if logits.shape[0] == 0:
        return logits.new_zeros((0, *original), dtype=torch.float32)
    full = F.interpolate(logits[:, None].float(), size=(side, side), mode="bilinear", align_corners=False)
    full = full[:, :, : content[0], : content[1]]
    return F.interpolate(full, size=original, mode="bilinear", align_corners=False)[:, 0]


def flip_batch(batch: Batch, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Batch:
    """The batch mirrored left-right: each image's content (top-left h x w) flipped in place within
    the padding, exemplar boxes mirrored, tokens of the left/right-swapped phrases."""
    images = batch.images.clone()
    side = images.shape[-1]
    for i, (h, w) in enumerate(batch.image_sizes.tolist()):
        images[i, :, :h, :w] = images[i, :, :h, :w].flip(-1)
    boxes = batch.exemplar_boxes
    if boxes is not None and boxes.numel():
        boxes = boxes.clone()
        widths = batch.image_sizes[batch.pair_image, 1].to(boxes) / side  # [P] content width, normalised
        boxes[..., 0] = widths[:, None] - boxes[..., 0]  # cx -> w - cx; padding rows are ignored anyway
    return dataclasses.replace(batch, images=images, input_ids=input_ids, attention_mask=attention_mask,
                               exemplar_boxes=boxes)


def _select(scores: torch.Tensor, min_score: float, max_detections: int) -> tuple[torch.Tensor, int]:
    order = scores.argsort(descending=True, stable=True)
    above = order[scores[order] >= min_score]
    return above[:max_detections], int(max(0, above.numel() - max_detections))


@torch.no_grad()
def batch_candidates(outputs: dict[str, Any], batch: Batch, *, flip_outputs: dict[str, Any] | None = None,
                     min_score: float = 0.05, max_detections: int = 100,
                     stability_offset: float = STABILITY_OFFSET) -> list[tuple[Candidate, int]]:
    """One (Candidate, dropped) per pair of ``batch``, on the CPU.

    ``outputs`` / ``flip_outputs``: detector outputs (``pred_logits [P, Q]``, ``pred_boxes [P, Q, 4]``
    normalised cxcywh of the padded input, ``pred_masks [P, Q, h, w]`` logits, ``presence_logit [P]``)
    of the batch and of ``flip_batch(batch)``. Boxes go to original pixels xyxy as in
    ``model.postprocess``; flip-run masks are flipped back along the width at the original size.
    """
    scores = detection_scores(outputs)  # [P, Q]
    flip_scores = detection_scores(flip_outputs) if flip_outputs is not None else None
    presence = outputs["presence_logit"].sigmoid()
    side = batch.images.shape[-1]
    sizes = batch.original_sizes if batch.original_sizes is not None else batch.image_sizes
    result = []
    for p in range(scores.shape[0]):
        image = int(batch.pair_image[p])
        (h, w), (height, width) = batch.image_sizes[image].tolist(), sizes[image].tolist()
        keep, dropped = _select(scores[p], min_score, max_detections)
        boxes = cxcywh_to_xyxy(outputs["pred_boxes"][p, keep].float()) * side
        boxes = boxes * boxes.new_tensor([width / w, height / h, width / w, height / h])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        logits = logits_to_original(outputs["pred_masks"][p, keep], side, (h, w), (height, width))
        flip_logits = None
        if flip_outputs is not None:
            fkeep, _ = _select(flip_scores[p], min_score, max_detections)
            flip_logits = logits_to_original(flip_outputs["pred_masks"][p, fkeep], side, (h, w), (height, width))
            flip_logits = flip_logits.flip(-1).cpu()
        candidate = candidate_from_logits(
            key=batch.keys[image], phrase=batch.phrases[p], presence=float(presence[p]),
            scores=scores[p, keep].float().cpu(), boxes=boxes.cpu(), mask_logits=logits.cpu(),
            flip_mask_logits=flip_logits, stability_offset=stability_offset,
        )
        result.append((candidate, dropped))
    return result


class ProposeModule(L.LightningModule):
    """Prediction only: the detector of a ``Sam3LitModule`` checkpoint, proposing candidates.

    Args:
        checkpoint: a Lightning checkpoint of ``Sam3LitModule`` (``sam3-train fit``, or a round's).
        flip_tta: also run the horizontally flipped batch (needed by ``FlipConsistencyVerifier``).
        min_score: score floor of a detection (at most the exhaustivity band's low and the miner's
            fire_low: a detection dropped here can neither make a pair uncertain nor be mined).
        max_detections: detections kept per pair (by score).
        stability_offset: logit offset of the loose and tight masks.
        tokenizer_path: as ``Sam3DataModule.tokenizer_path`` (tokens of left/right-swapped phrases).
    """

    def __init__(self, *, checkpoint: str, flip_tta: bool = True, min_score: float = 0.05,
                 max_detections: int = 100, stability_offset: float = STABILITY_OFFSET,
                 tokenizer_path: str | None = None):
        super().__init__()
        from sam3_train.lit import Sam3LitModule

        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
        self.detector = Sam3LitModule.load_from_checkpoint(checkpoint, map_location="cpu").detector
        self.flip_tta, self.min_score, self.max_detections = flip_tta, min_score, max_detections
        self.stability_offset = stability_offset
        self._tokenizer = Sam3Tokenizer.from_path_or_open_clip(tokenizer_path) if flip_tta else None

    @property
    def image_size(self) -> int:
        return self.detector.image_size

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch.to(device) if isinstance(batch, Batch) else super().transfer_batch_to_device(
            batch, device, dataloader_idx)

    def _flip_tokens(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        swapped = [swap_left_right(p) for p in batch.phrases]
        changed = [i for i, (a, b) in enumerate(zip(batch.phrases, swapped)) if a != b]
        ids, mask = batch.input_ids.clone(), batch.attention_mask.clone()
        if changed:
            new_ids, new_mask = self._tokenizer([swapped[i] for i in changed])
            ids[changed], mask[changed] = new_ids.to(ids), new_mask.to(mask)
        return ids, mask

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        outputs = self.detector(batch)
        flip_outputs = self.detector(flip_batch(batch, *self._flip_tokens(batch))) if self.flip_tta else None
        pairs = batch_candidates(outputs, batch, flip_outputs=flip_outputs, min_score=self.min_score,
                                 max_detections=self.max_detections, stability_offset=self.stability_offset)
        sizes = batch.original_sizes if batch.original_sizes is not None else batch.image_sizes
        records = [{"key": key, "height": int(sizes[i][0]), "width": int(sizes[i][1]), "pairs": []}
                   for i, key in enumerate(batch.keys)]
        for p, (candidate, dropped) in enumerate(pairs):
            records[int(batch.pair_image[p])]["pairs"].append(candidate_record(candidate, dropped))
        return records


# ------------------------------------------------------------------------------------------ records
def _rles(masks: torch.Tensor) -> list[dict[str, Any]]:
    return [rle_ops.encode(m) for m in masks.numpy().astype(np.uint8)]


def _masks(rles: list[dict[str, Any]], height: int, width: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rle_ops.decode_many(rles, height, width))).bool()


def candidate_record(c: Candidate, dropped: int = 0) -> dict[str, Any]:
    """A Candidate as JSON (float32 values written exactly: a float32 is a double exactly)."""
    return {"phrase": c.phrase, "presence": c.presence, "scores": c.scores.tolist(), "boxes": c.boxes.tolist(),
            "masks": _rles(c.masks), "loose": _rles(c.masks_loose), "tight": _rles(c.masks_tight),
            "flip": None if c.flip_masks is None else _rles(c.flip_masks), "dropped": int(dropped)}


def record_candidates(record: dict[str, Any]) -> list[tuple[Candidate, int]]:
    """(Candidate, dropped) of every pair of one image record: the inverse of :func:`candidate_record`."""
    key, height, width = record["key"], int(record["height"]), int(record["width"])
    out = []
    for pair in record["pairs"]:
        n = len(pair["scores"])
        flip = None if pair["flip"] is None else _masks(pair["flip"], height, width)
        c = Candidate(key=key, phrase=pair["phrase"], height=height, width=width, presence=float(pair["presence"]),
                      scores=torch.tensor(pair["scores"], dtype=torch.float32).reshape(n),
                      boxes=torch.tensor(pair["boxes"], dtype=torch.float32).reshape(n, 4),
                      masks=_masks(pair["masks"], height, width), masks_loose=_masks(pair["loose"], height, width),
                      masks_tight=_masks(pair["tight"], height, width), flip_masks=flip)
        out.append((c, int(pair.get("dropped", 0))))
    return out


class ProposalIndex:
    """Random access to one rank's proposals file by sample key (an offset per key, records parsed
    on demand: a rank's proposals need not fit in memory)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.offsets: dict[str, int] = {}
        with open(self.path, "rb") as f:
            offset = 0
            for line in f:
                key = json.loads(line)["key"]
                if key in self.offsets:
                    raise ValueError(f"{self.path}: sample {key} proposed twice")
                self.offsets[key] = offset
                offset += len(line)

    def __contains__(self, key: str) -> bool:
        return key in self.offsets

    def __len__(self) -> int:
        return len(self.offsets)

    def get(self, key: str) -> dict[str, Any]:
        with open(self.path, "rb") as f:
            f.seek(self.offsets[key])
            return json.loads(f.readline())


class ProposalWriter(BasePredictionWriter):
    """Each rank writes ``{round_dir}/proposals-rankNNN/`` (``proposals.jsonl`` + ``summary.json``:
    the pool shards it read, counts, the file's sha256) under a ``.tmp`` name, renamed when the rank
    is done; then a barrier. Rank 0 writes the stage marker after it (rounds.py)."""

    def __init__(self, *, round_dir: str | os.PathLike):
        super().__init__(write_interval="batch")
        self.round_dir = Path(round_dir)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        name = proposals_dir_name(trainer.global_rank)
        self.final, self.tmp = self.round_dir / name, self.round_dir / (name + TMP_SUFFIX)
        if self.tmp.exists():  # left by a killed run: incomplete by definition
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self._file = open(self.tmp / PROPOSALS, "w")
        self._keys: set[str] = set()
        self.counts = {"images": 0, "pairs": 0, "candidates": 0, "truncated_pairs": 0}

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        for record in prediction:
            if record["key"] in self._keys:
                raise ValueError(f"sample key {record['key']} read twice by rank {trainer.global_rank}: "
                                 "the pool has duplicate keys")
            self._keys.add(record["key"])
            self._file.write(json.dumps(record, sort_keys=True) + "\n")
            self.counts["images"] += 1
            self.counts["pairs"] += len(record["pairs"])
            self.counts["candidates"] += sum(len(p["scores"]) for p in record["pairs"])
            self.counts["truncated_pairs"] += sum(p["dropped"] > 0 for p in record["pairs"])
        self._file.flush()
        fault_point("propose-batch")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._file.close()
        data = trainer.datamodule
        summary = {"rank": trainer.global_rank, "world_size": trainer.world_size, "urls": data.rank_urls,
                   "counts": {**self.counts, "skipped": data.skipped_samples},
                   "sha256": file_sha256(self.tmp / PROPOSALS)}
        write_json_atomic(self.tmp / SUMMARY, summary)
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)
        trainer.strategy.barrier("proposals written")
