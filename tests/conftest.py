"""Shared fixtures: a small built-in shapes dataset (real shards) and one batch of it."""

from __future__ import annotations

import os

import pytest

# W&B never talks to a server in tests, and nothing leaks WANDB_MODE between tests.
os.environ.setdefault("WANDB_SILENT", "true")

SHAPES_SPLITS = {"train": 64, "val": 16, "test": 16}


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> str:
    from sam3_train.data import ensure_shapes_shards

    root = tmp_path_factory.mktemp("shapes")
    ensure_shapes_shards(root, splits=SHAPES_SPLITS, max_count=8)
    return str(root)


@pytest.fixture(scope="session")
def shapes_batch(shapes_root):
    """The first 8 validation images with up to 3 phrases each, as a Batch (eval transforms)."""
    from sam3_train.data import Sam3DataModule

    dm = Sam3DataModule(shapes_root=shapes_root, shapes_splits=SHAPES_SPLITS, image_size=224, eval_batch_size=8,
                        num_workers=0, eval_max_phrases=3)
    dm.prepare_data()
    dm.setup("validate")
    return next(iter(dm.val_dataloader()))


@pytest.fixture
def one_thread():
    """Torch on one intra-op thread for the test (restored after)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def wandb_disabled(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
