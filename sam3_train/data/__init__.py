"""Samples, shards, the built-in dataset, transforms and collation into :class:`Batch`."""

from sam3_train.data.batch import Batch, Target
from sam3_train.data.collate import Collator
from sam3_train.data.convert_coco import convert_coco
from sam3_train.data.convert_images import convert_images
from sam3_train.data.convert_saco import convert_saco
from sam3_train.data.frame import InputFrame
from sam3_train.data.pipeline import ShardStream, SkipCounter
from sam3_train.data.schema import SampleError
from sam3_train.data.shapes import ensure_shapes_shards
from sam3_train.data.shards import ShardSink, expand_urls
from sam3_train.data.transforms import eval_transforms, train_transforms

__all__ = [
    "Batch",
    "Collator",
    "InputFrame",
    "SampleError",
    "Sam3DataModule",
    "ShardSink",
    "ShardStream",
    "SkipCounter",
    "Target",
    "convert_coco",
    "convert_images",
    "convert_saco",
    "ensure_shapes_shards",
    "eval_transforms",
    "expand_urls",
    "train_transforms",
]


def __getattr__(name: str):
    # Lazy: the DataModule pulls in Lightning, which converters and tools/make_shards.py do not need.
    if name == "Sam3DataModule":
        from sam3_train.data.datamodule import Sam3DataModule

        return Sam3DataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
