"""The propose step: the detector's candidates for every (image, phrase) pair of a pool, per rank.

    trainer = L.Trainer(strategy="ddp", devices=2, callbacks=[ProposalWriter(round_dir=d)], logger=False)
    trainer.predict(ProposeModule(checkpoint=ckpt), datamodule=ProposeData(pool=..., phrases=...),
                    return_predictions=False)

``ProposeData`` streams the pool (``ShardStream``: rank r reads shards r, r + R, ...; an iterable
dataset gets no sampler from Lightning), asking each image the phrase source's phrases.
``ProposeModule`` runs the detector once per batch (every image encoded once for all of its
phrases), and again on the horizontally flipped batch ("left" and "right" swapped in the phrases),
and turns each pair into a :class:`~sam3_train.engine.candidates.Candidate` through
``model.postprocess`` (the path evaluation and prediction take): detections above a score floor,
boxes in original pixels, masks at logits 0, -offset and +offset, flip masks matched back.
``ProposalWriter`` writes each rank's records into ``proposals-rankNNN.tmp/proposals.jsonl.gz`` (one
gzip member per image: proposal_files.py), renames the folder when the rank is done, then waits at a
barrier (``proposal_files.ProposalIndex`` reads them).

A record (one JSON line per image; masks as COCO RLE at the original size)::

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
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from sam3_train.data.batch import Batch
from sam3_train.data.collate import Collator
from sam3_train.data.phrases import swap_left_right
from sam3_train.data.pipeline import ShardStream, SkipCounter, split_by_rank
from sam3_train.data.shards import expand_urls
from sam3_train.data.tokenizer import Sam3Tokenizer
from sam3_train.data.transforms import eval_transforms
from sam3_train.atomic import replace_dir, write_json_atomic
from sam3_train.dist import rank_and_world
from sam3_train.engine.candidates import STABILITY_OFFSET, Candidate, candidate_from_logits, candidate_record
from sam3_train.engine.manifest import (
    PROPOSALS,
    START,
    SUMMARY,
    TMP_SUFFIX,
    fault_point,
    file_sha256,
    proposals_dir_name,
    read_json,
)
from sam3_train.engine.proposal_files import ProposalFileWriter, complete_records
from sam3_train.model.postprocess import detection_scores, postprocess

log = logging.getLogger(__name__)


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
        self.pool = pool
        self.phrases = phrases
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.square_resize = square_resize
        self.tokenizer_path = tokenizer_path
        self.skip_counter = SkipCounter()
        self.urls: list[str] = []
        self.exclude_keys: frozenset[str] = frozenset()  # set by ProposalWriter.setup on a resumed rank
        self._tokenizer = None

    def setup(self, stage: str | None = None) -> None:
        self.urls = expand_urls(self.pool)  # a pattern that matches nothing fails here, naming it
        if self._tokenizer is None:
            self._tokenizer = Sam3Tokenizer.from_path_or_open_clip(self.tokenizer_path)
        _, world = rank_and_world(self.trainer)
        if len(self.urls) < world * max(1, self.num_workers):
            log.warning("pool has %d shards for %d ranks x %d workers: some read nothing",
                        len(self.urls), world, max(1, self.num_workers))

    @property
    def rank_urls(self) -> list[str]:
        """The pool shards this rank reads (the stream's own split: no shuffling in prediction)."""
        rank, world = rank_and_world(self.trainer)
        return split_by_rank(list(self.urls), rank, world)

    @property
    def skipped_samples(self) -> int:
        return self.skip_counter.value

    def predict_dataloader(self) -> DataLoader:
        rank, world = rank_and_world(self.trainer)
        stream = ShardStream(
            urls=self.urls, batch_size=self.batch_size,
            transforms=eval_transforms(image_size=self.image_size, square=self.square_resize),
            collate=Collator(tokenizer=self._tokenizer), select=PhraseSelector(self.phrases),
            rank=rank, world_size=world, shuffle=False, skip_counter=self.skip_counter,
            draft_size=self.image_size, exclude_keys=self.exclude_keys,
        )
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers)


# ------------------------------------------------------------------------------------------ model
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


@torch.no_grad()
def batch_candidates(outputs: dict[str, Any], batch: Batch, *, flip_outputs: dict[str, Any] | None = None,
                     min_score: float = 0.05, max_detections: int = 100,
                     stability_offset: float = STABILITY_OFFSET) -> list[tuple[Candidate, int]]:
    """One (Candidate, dropped) per pair of ``batch``, on the CPU.

    ``outputs`` / ``flip_outputs``: detector outputs (``pred_logits [P, Q]``, ``pred_boxes [P, Q, 4]``
    normalised cxcywh of the padded input, ``pred_masks [P, Q, h, w]`` logits, ``presence_logit [P]``)
    of the batch and of ``flip_batch(batch)``, both through ``model.postprocess``; flip-run mask
    logits are flipped back along the width at the original size.
    """
    settings = dict(original_sizes=batch.original_sizes, score_threshold=min_score, max_detections=max_detections,
                    mask_logits=True)
    detections = postprocess(outputs, batch, **settings)
    flips = postprocess(flip_outputs, batch, **settings) if flip_outputs is not None else None
    above = (detection_scores(outputs) >= min_score).sum(1).tolist()  # [P] detections above the floor
    result = []
    for p, found in enumerate(detections):
        image = int(batch.pair_image[p])
        flip_logits = None if flips is None else flips[p]["mask_logits"].flip(-1).cpu()
        candidate = candidate_from_logits(
            key=batch.keys[image], phrase=batch.phrases[p], presence=float(found["presence"]),
            scores=found["scores"].float().cpu(), boxes=found["boxes"].cpu(), mask_logits=found["mask_logits"].cpu(),
            flip_mask_logits=flip_logits, stability_offset=stability_offset,
        )
        result.append((candidate, above[p] - candidate.num_instances))
    return result


class ProposeModule(L.LightningModule):
    """Prediction only: the detector of a ``Sam3LitModule`` checkpoint, proposing candidates.

    Args:
        checkpoint: a ``sam3-train fit`` checkpoint (a round's, LoRA adapters merged) or an HF-layout
            folder: :func:`sam3_train.loading.load_detector`.
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
        from sam3_train.loading import load_detector

        self.detector = load_detector(checkpoint)
        self.flip_tta = flip_tta
        self.min_score = min_score
        self.max_detections = max_detections
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


# ------------------------------------------------------------------------------------------ files
class ProposalWriter(BasePredictionWriter):
    """Each rank writes ``{round_dir}/proposals-rankNNN/`` (``proposals.jsonl.gz`` + ``summary.json``:
    the pool shards it read, counts, the file's sha256) under a ``.tmp`` name, renamed when the rank
    is done; then a barrier. Rank 0 writes the stage marker after it (rounds.py).

    A rank killed in the middle resumes: its folder's ``start.json`` names what it proposes from
    (``inputs``: the checkpoint and pool, as the stage marker; its rank, the world size and its pool
    shards). When the rerun's are the same, the whole records of its file are kept, the pool images
    they hold are read past and not proposed again (``ProposeData.exclude_keys``), and the file goes
    on after them. A batch's records are appended in one write, so a kill leaves whole batches and,
    with one loader worker, the rest is batched as an uninterrupted rank batches it: the finished file
    has its bytes (tests/test_engine_rounds.py). With several workers the interleaving of their
    batches may differ: the same records, in another order. Otherwise the folder starts afresh.
    """

    def __init__(self, *, round_dir: str | os.PathLike, inputs: dict[str, Any] | None = None):
        super().__init__(write_interval="batch")
        self.round_dir = Path(round_dir)
        self.inputs = inputs

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # here, not in on_predict_start: the data module's loader (built between the two) must know
        # which images to pass over before its workers start
        super().setup(trainer, pl_module, stage)
        data = trainer.datamodule
        name = proposals_dir_name(trainer.global_rank)
        self.final, self.tmp = self.round_dir / name, self.round_dir / (name + TMP_SUFFIX)
        # the batching too: the resumed rank must batch the rest as the killed one would have
        start = json.loads(json.dumps({"inputs": self.inputs, "rank": trainer.global_rank,
                                       "world_size": trainer.world_size, "urls": data.rank_urls,
                                       "batch_size": data.batch_size, "num_workers": data.num_workers}))
        self.counts = {"images": 0, "pairs": 0, "candidates": 0, "truncated_pairs": 0}
        self._keys: set[str] = set()
        if read_json(self.final / START) == start and not self.tmp.exists():
            self.final.rename(self.tmp)  # finished before another rank was killed: read past all of it
        elif self.final.exists():
            shutil.rmtree(self.final)
        end = None  # a new file
        if read_json(self.tmp / START) == start and (self.tmp / PROPOSALS).is_file():
            end = 0
            for end, record in complete_records(self.tmp / PROPOSALS):
                self._count(record)
        else:
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir(parents=True)
            write_json_atomic(self.tmp / START, start)
        self._file = ProposalFileWriter(self.tmp / PROPOSALS, append_at=end)
        data.exclude_keys = frozenset(self._keys)
        if self._keys:
            print(f"[data engine] rank {trainer.global_rank}: {len(self._keys)} images proposed before, resumed "
                  "after them", flush=True)

    def _count(self, record: dict[str, Any]) -> None:
        if record["key"] in self._keys:
            raise ValueError(f"sample key {record['key']} read twice by rank {self.final.name}: "
                             "the pool has duplicate keys")
        self._keys.add(record["key"])
        self.counts["images"] += 1
        self.counts["pairs"] += len(record["pairs"])
        self.counts["candidates"] += sum(len(p["scores"]) for p in record["pairs"])
        self.counts["truncated_pairs"] += sum(p["dropped"] > 0 for p in record["pairs"])

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        for record in prediction:
            self._count(record)
        self._file.write(*prediction)
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
        replace_dir(self.tmp, self.final)
        trainer.strategy.barrier("proposals written")
