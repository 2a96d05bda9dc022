"""Samples, shards, the built-in dataset, transforms and collation into :class:`Batch`."""

from sam3_train.data.batch import Batch, Target

__all__ = ["Batch", "Target"]
