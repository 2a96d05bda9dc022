"""``Sam3DataModule``: shards -> train / val / test / predict dataloaders of :class:`Batch`.

Configured from YAML through LightningCLI (the constructor is the schema)::

    data:
      class_path: sam3_train.data.Sam3DataModule
      init_args:
        shapes_root: datasets/shapes      # build the built-in dataset if missing; default patterns
        image_size: 224
        batch_size: 8
        steps_per_epoch: 250

Fine-tuning (docs/data_format.md, "Several sources and validation sets")::

        train_sources:                    # instead of train_shards: sampled per image by weight
          - {name: domain, shards: datasets/mine/shards/train/mine-000000.tar, weight: 1}
          - {name: general, shards: datasets/saco/shards/train/saco-train-{000000..000099}.tar, weight: 1}
        val_sets:                         # instead of val_shards: logged as val/<name>/cgF1, ...
          domain: datasets/mine/shards/val/mine-000000.tar
          general: datasets/saco/shards/gold_metaclip/gold-metaclip-{000000..000007}.tar

Ranks come from the attached trainer (``global_rank``, ``world_size``), never from the workers.
Skipped bad samples are counted across worker processes; the LightningModule logs
``trainer.datamodule.skipped_samples`` as ``train/skipped_samples``.

The train dataloader is a :class:`~sam3_train.data.loader.StreamLoader`: checkpoints carry its
position, so ``fit --ckpt_path last`` continues an interrupted epoch with the very batches the
interrupted run would have trained on next. No loader draws from the global torch RNG.
"""

from __future__ import annotations

import random
from functools import partial
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from sam3_train.data.collate import Collator, Tokenizer
from sam3_train.data.decode import QuerySelector
from sam3_train.data.loader import StreamLoader
from sam3_train.data.mixing import TrainSource, check_name, check_source_specs
from sam3_train.data.phrases import select_queries
from sam3_train.data.pipeline import ShardStream, SkipCounter
from sam3_train.data.shapes import DEFAULT_SPLITS, ensure_shapes_shards
from sam3_train.data.shards import expand_urls
from sam3_train.data.tokenizer import Sam3Tokenizer
from sam3_train.data.transforms import eval_transforms, train_transforms
from sam3_train.dist import rank_and_world


def _select(queries: list[dict], rng: random.Random, *, max_queries: int | None, negative_share: float) -> list[dict]:
    return select_queries(queries, max_queries=max_queries, negative_share=negative_share, rng=rng)


def query_selector(*, max_queries: int | None, negative_share: float) -> QuerySelector:
    """The training stream's per-image query selection, as ``ShardStream(select=...)`` takes it:
    ``(queries, rng) -> queries``, :func:`~sam3_train.data.phrases.select_queries` with these settings
    (at most ``max_queries`` labelled queries, about ``negative_share`` of them negatives; images left
    with none are skipped and counted by the stream). A ``partial`` of a module function, so that it
    pickles into dataloader workers."""
    return partial(_select, max_queries=max_queries, negative_share=negative_share)


class Sam3DataModule(L.LightningDataModule):
    """WebDataset shards of the sample schema (docs/data_format.md) -> Batches.

    Args:
        train_shards, val_shards, test_shards, predict_shards: brace patterns
            (``dir/train-{000000..000099}.tar``; several joined with ``::``); None: no such stage
            (or the shapes split when ``shapes_root`` is set).
        shapes_root: folder of the built-in shapes dataset; when set it is generated if missing
            (rank 0, in ``prepare_data``) and fills the patterns left None.
        shapes_splits: images per shapes split (None: 2000 / 200 / 200).
        shapes_image_size: side in pixels of generated shapes images.
        image_size: S, the padded square side of ``Batch.images``.
        batch_size: images per training batch; eval_batch_size: per val/test/predict batch (None: same).
        num_workers: dataloader worker processes per rank.
        max_phrases_per_image: training queries kept per image (None: all).
        negative_share: share of negatives among the kept training queries.
        eval_max_phrases: queries per image in val/test (None: all, as cgF1 needs).
        resampled, steps_per_epoch: training draws shards with replacement and every rank runs
            exactly ``steps_per_epoch`` batches per epoch (needed for DDP; see pipeline.py).
        shuffle_buffer: training samples in the shuffle buffer.
        seed: base seed for shard order, buffer, transforms and phrase sampling; None: the run's
            ``seed_everything`` when that is a number (``Sam3CLI`` fills it in), else 0.
        min_scale: smallest training resize as a share of S (SAM 3: 480 / 1008); 1 disables it.
        square_resize: SAM 3's square resize; False keeps the aspect ratio (longest side).
        hflip: flip probability; color_jitter: strength of brightness / contrast / saturation jitter.
        exemplar_box_noise, exemplar_box_noise_max: Meta's training jitter of exemplar boxes (std as a
            fraction of the box side, clipped to max pixels); 0 turns it off.
        tokenizer_path: checkpoint folder with SAM 3's tokenizer files; None: CLIP's BPE vocabulary
            shipped with open_clip_torch (offline).
        pin_memory: pin batches for faster host-to-GPU copies.
    """

    def __init__(
        self,
        *,
        train_shards: str | None = None,
        val_shards: str | None = None,
        test_shards: str | None = None,
        predict_shards: str | None = None,
        train_sources: list[dict[str, Any]] | None = None,
        val_sets: dict[str, str | list[str]] | None = None,
        shapes_root: str | None = None,
        shapes_splits: dict[str, int] | None = None,
        shapes_image_size: int = 256,
        image_size: int = 224,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        max_phrases_per_image: int | None = 8,
        negative_share: float = 0.5,
        eval_max_phrases: int | None = None,
        resampled: bool = True,
        steps_per_epoch: int = 250,
        shuffle_buffer: int = 256,
        seed: int | None = None,
        min_scale: float = 0.5,
        square_resize: bool = True,
        hflip: float = 0.5,
        color_jitter: float = 0.2,
        exemplar_box_noise: float = 0.1,
        exemplar_box_noise_max: float | None = 20.0,
        tokenizer_path: str | None = None,
        pin_memory: bool = False,
    ):
        super().__init__()
        if not 0.0 <= negative_share <= 1.0:
            raise ValueError(f"negative_share must lie in [0, 1], got {negative_share}")
        if train_sources is not None and train_shards is not None:
            raise ValueError("data.train_shards and data.train_sources are both set: use one (train_sources "
                             "lists every training source with its weight; set train_shards: null)")
        if val_sets is not None and val_shards is not None:
            raise ValueError("data.val_shards and data.val_sets are both set: use one (set val_shards: null)")
        if val_sets is not None and not val_sets:
            raise ValueError("data.val_sets is empty: name at least one set, or set it to null")
        for name in val_sets or {}:
            check_name(str(name), "data.val_sets:")
        self.save_hyperparameters()
        self.train_sources = check_source_specs(train_sources) if train_sources is not None else None
        self.val_sets = dict(val_sets) if val_sets is not None else None
        self.sources: list[TrainSource] | None = None
        self.patterns = {"train": train_shards, "val": val_shards, "test": test_shards, "predict": predict_shards}
        self.shapes_root, self.shapes_splits, self.shapes_image_size = shapes_root, shapes_splits, shapes_image_size
        self.image_size, self.batch_size = image_size, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.max_phrases_per_image, self.negative_share = max_phrases_per_image, negative_share
        self.eval_max_phrases = eval_max_phrases
        self.resampled, self.steps_per_epoch, self.shuffle_buffer = resampled, steps_per_epoch, shuffle_buffer
        self.seed, self.min_scale, self.square_resize = 0 if seed is None else seed, min_scale, square_resize
        self.hflip, self.color_jitter = hflip, color_jitter
        self.exemplar_box_noise, self.exemplar_box_noise_max = exemplar_box_noise, exemplar_box_noise_max
        self.tokenizer_path = tokenizer_path
        self.pin_memory = pin_memory
        self.skip_counter = SkipCounter()
        self.urls: dict[str, list[str]] = {}
        self._tokenizer: Tokenizer | None = None

    # ---- setup ---------------------------------------------------------------------------------
    def _shapes_patterns(self) -> dict[str, str]:
        if self.shapes_root is None:
            return {}
        return ensure_shapes_shards(
            self.shapes_root, splits=self.shapes_splits or DEFAULT_SPLITS, image_size=self.shapes_image_size
        )

    def prepare_data(self) -> None:
        self._shapes_patterns()  # generate once per node, before any rank reads

    def setup(self, stage: str | None = None) -> None:
        shapes = self._shapes_patterns()  # cached: instant once prepare_data ran
        for split, pattern in self.patterns.items():
            if pattern is None:
                pattern = shapes.get("val" if split == "predict" else split)
            if pattern is not None:
                try:
                    self.urls[split] = expand_urls(pattern)
                except FileNotFoundError as exn:  # a configuration error: stop before training starts
                    raise FileNotFoundError(
                        f"data.{split}_shards: {exn}. Set data.{split}_shards to a brace pattern of existing "
                        f"shard files (dir/{split}-{{000000..000099}}.tar; several joined with '::'), or build "
                        "them first with tools/make_shards.py."
                    ) from None
        if self.train_sources is not None:
            self.sources = [TrainSource(name=s["name"], urls=tuple(self._expand(s["shards"], f"train_sources ({s['name']})")),
                                        weight=s["weight"]) for s in self.train_sources]
            self.urls["train"] = [url for source in self.sources for url in source.urls]
        if self.val_sets is not None:
            for name, pattern in self.val_sets.items():
                self.urls[f"val/{name}"] = self._expand(pattern, f"val_sets.{name}")
        if self._tokenizer is None:
            self._tokenizer = Sam3Tokenizer.from_path_or_open_clip(self.tokenizer_path)

    @staticmethod
    def _expand(pattern: str | list[str], option: str) -> list[str]:
        try:
            return expand_urls(pattern)
        except FileNotFoundError as exn:  # a configuration error: stop before training starts
            raise FileNotFoundError(
                f"data.{option}: {exn}. Give a brace pattern (or a list) of existing shard files, or build them "
                "first with tools/make_shards.py."
            ) from None

    @property
    def val_set_names(self) -> list[str] | None:
        """Names of the validation sets in dataloader order (``data.val_sets``); None: one unnamed set."""
        return list(self.val_sets) if self.val_sets is not None else None

    @property
    def source_names(self) -> list[str] | None:
        """Names of the weighted training sources (``data.train_sources``); None: unnamed shards."""
        return [s["name"] for s in self.train_sources] if self.train_sources is not None else None

    @property
    def rank_and_world(self) -> tuple[int, int]:
        return rank_and_world(getattr(self, "trainer", None))

    @property
    def skipped_samples(self) -> int:
        """Samples skipped as bad so far, summed over this rank's worker processes."""
        return self.skip_counter.value

    # ---- dataloaders -----------------------------------------------------------------------------
    def _stream(self, split: str, *, train: bool) -> ShardStream:
        if split == "train" and self.train_sources is not None and not self.resampled:
            raise ValueError("data.train_sources needs data.resampled: true (each source is an endless stream)")
        if split not in self.urls:
            raise RuntimeError(
                f"no {split} shards: set `{split}_shards` (or `shapes_root`) and call setup() first"
            )
        rank, world = self.rank_and_world
        max_q = self.max_phrases_per_image if train else self.eval_max_phrases
        select = query_selector(max_queries=max_q, negative_share=self.negative_share) if max_q is not None else None
        if train:
            transforms = train_transforms(
                image_size=self.image_size, min_scale=self.min_scale, square=self.square_resize,
                hflip=self.hflip, color_jitter=self.color_jitter, exemplar_box_noise=self.exemplar_box_noise,
                exemplar_box_noise_max=self.exemplar_box_noise_max,
            )
        else:
            transforms = eval_transforms(image_size=self.image_size, square=self.square_resize)
        return ShardStream(
            urls=self.urls[split],
            batch_size=self.batch_size if train else self.eval_batch_size,
            transforms=transforms,
            collate=Collator(tokenizer=self._tokenizer),
            select=select,
            rank=rank,
            world_size=world,
            shuffle=train,
            shuffle_buffer=self.shuffle_buffer if train else 0,
            seed=self.seed,
            resampled=self.resampled and train,
            steps_per_epoch=self.steps_per_epoch if train else None,
            skip_counter=self.skip_counter,
            draft_size=self.image_size,
            sources=self.sources if split == "train" else None,
        )

    def _loader(self, stream: ShardStream, *, resumable: bool = False) -> DataLoader:
        kwargs: dict[str, Any] = dict(num_workers=self.num_workers, pin_memory=self.pin_memory, persistent_workers=False)
        if resumable:
            trainer = lambda: getattr(self, "trainer", None)  # noqa: E731
            return StreamLoader(stream, epoch_fn=lambda: trainer().current_epoch if trainer() else None, **kwargs)
        # Batches are collated inside the workers; an own generator keeps the global RNG untouched
        # (a validation in the middle of training must not shift the training's random stream).
        return DataLoader(stream, batch_size=None, generator=torch.Generator().manual_seed(self.seed), **kwargs)

    def train_dataloader(self) -> DataLoader:
        _, world = self.rank_and_world
        if world > 1 and not self.resampled:
            raise ValueError(
                f"data.resampled is false under DDP ({world} ranks): each rank would read its own shards once "
                f"({len(self.urls.get('train', []))} shards over {world} ranks) and run a different number of "
                "steps, and the ranks with more would hang at their next collective. Set data.resampled: true "
                "(every rank runs exactly data.steps_per_epoch batches per epoch)."
            )
        return self._loader(self._stream("train", train=True), resumable=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """One loader, or with ``val_sets`` one per named set in ``val_set_names`` order (Lightning's
        ``dataloader_idx``)."""
        if self.val_sets is not None:
            return [self._loader(self._stream(f"val/{name}", train=False)) for name in self.val_sets]
        return self._loader(self._stream("val", train=False))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._stream("test", train=False))

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self._stream("predict", train=False))
