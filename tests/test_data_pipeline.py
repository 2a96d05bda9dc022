"""Reading shards across ranks and workers: exact coverage, equal step counts, epoch-seeded order."""

from __future__ import annotations

import io
import types

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sam3_train.data import pipeline
from sam3_train.data import rle as rle_ops
from sam3_train.data.collate import Collator
from sam3_train.data.pipeline import ShardStream
from sam3_train.data.schema import make_key, query
from sam3_train.data.shards import ShardSink, expand_urls
from sam3_train.data.transforms import eval_transforms, train_transforms
from sam3_train.data.tokenizer import Sam3Tokenizer

SHARD_SIZES = [5, 5, 3, 7, 5, 1, 6, 4]  # uneven on purpose; 36 samples


# Two shared cores: torch's intra-op threads only contend in these data tests.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def collate():
    return Collator(tokenizer=Sam3Tokenizer.from_open_clip())


def tiny_sample(i: int) -> tuple[bytes, dict]:
    img = np.full((16, 16, 3), i % 256, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    mask = np.zeros((16, 16), dtype=bool)
    mask[2:6, 3:9] = True
    rle = rle_ops.encode(mask)
    meta = {"image_id": i, "width": 16, "height": 16, "source": {},
            "queries": [query("left box", [{"box": rle_ops.to_xywh(rle), "rle": rle}]), query("circle")]}
    return buf.getvalue(), meta


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    keys, i = [], 0
    for s, n in enumerate(SHARD_SIZES):
        with ShardSink(out_dir=root, prefix=f"part{s}", max_count=100) as sink:
            for _ in range(n):
                data, meta = tiny_sample(i)
                sink.write(make_key(i), data, "png", meta)
                keys.append(make_key(i))
                i += 1
    return {"pattern": f"{root}/part{{0..{len(SHARD_SIZES) - 1}}}-000000.tar", "keys": keys}


def _stream(shards, collate, **kw) -> ShardStream:
    defaults = dict(urls=expand_urls(shards["pattern"]), batch_size=2, collate=collate,
                    transforms=eval_transforms(image_size=16))
    return ShardStream(**{**defaults, **kw})


def _as_worker(monkeypatch, worker: int, num_workers: int) -> None:
    info = types.SimpleNamespace(id=worker, num_workers=num_workers)
    monkeypatch.setattr(pipeline, "get_worker_info", lambda: info)


def test_two_ranks_two_workers_cover_every_sample_once(shards, collate, monkeypatch):
    orders = []
    for epoch in (0, 1):
        seen: list[str] = []
        for rank in (0, 1):
            for worker in (0, 1):
                _as_worker(monkeypatch, worker, 2)
                stream = _stream(shards, collate, rank=rank, world_size=2, shuffle=True, shuffle_buffer=4, seed=3)
                stream.set_epoch(epoch)
                part = [k for batch in stream for k in batch.keys]
                assert part, f"rank {rank} worker {worker} read nothing"
                seen += part
        assert sorted(seen) == sorted(shards["keys"])  # disjoint, and together complete
        orders.append(seen)
    assert orders[0] != orders[1]


def test_shard_order_depends_on_seed_and_epoch_only(shards, collate):
    a = _stream(shards, collate, shuffle=True, seed=5)
    b = _stream(shards, collate, shuffle=True, seed=5, rank=1, world_size=2)
    assert a.shard_order(0) == b.shard_order(0)  # every rank agrees on the permutation
    assert a.shard_order(0) != a.shard_order(1)
    assert a.shard_order(0) != _stream(shards, collate, shuffle=True, seed=6).shard_order(0)
    assert sorted(a.shard_order(1)) == sorted(a.urls)


def test_resampled_ranks_run_the_same_number_of_steps(shards, collate, monkeypatch):
    counts = {}
    for rank in (0, 1):
        total = 0
        for worker in (0, 1):
            _as_worker(monkeypatch, worker, 2)
            stream = _stream(shards, collate, rank=rank, world_size=2, resampled=True, steps_per_epoch=7,
                             shuffle=True, shuffle_buffer=4, transforms=train_transforms(image_size=16, min_scale=0.5, step=4))
            total += sum(1 for _ in stream)
        counts[rank] = total
    assert counts == {0: 7, 1: 7}


def test_real_worker_processes(shards, collate):
    stream = _stream(shards, collate)
    keys = [k for batch in DataLoader(stream, batch_size=None, num_workers=2) for k in batch.keys]
    assert sorted(keys) == sorted(shards["keys"])
    stream = _stream(shards, collate, resampled=True, steps_per_epoch=5)
    loader = DataLoader(stream, batch_size=None, num_workers=2)
    assert len(loader) == 5 and sum(1 for _ in loader) == 5


def test_flip_swaps_left_right_in_phrases(shards, collate):
    stream = _stream(shards, collate, transforms=train_transforms(image_size=16, min_scale=1.0, hflip=1.0, color_jitter=0))
    batch = next(iter(stream))
    assert batch.phrases[:2] == ["right box", "circle"]
    # mask columns 3..8 of 16 mirror to 7..12; the box follows.
    box = batch.targets[0]["boxes"][0] * 16
    assert torch.allclose(box, torch.tensor([10.0, 4.0, 6.0, 4.0]))
    assert batch.targets[0]["masks"][0, 2:6, 7:13].all() and batch.targets[0]["masks"][0].sum() == 24


def test_resampled_stream_of_unreadable_shards_fails_instead_of_spinning(tmp_path, collate, caplog):
    (tmp_path / "empty.tar").write_bytes(b"")
    stream = ShardStream(urls=[str(tmp_path / "empty.tar")], batch_size=2, collate=collate,
                         transforms=eval_transforms(image_size=16), resampled=True, steps_per_epoch=3)
    with pytest.raises(RuntimeError, match="no readable sample"):
        list(stream)
    assert stream.skip_counter.value > 0


def test_training_skips_images_with_no_query_to_train_on(tmp_path, collate, caplog):
    """Images whose queries are all unlabelled (non-exhaustive, no instances) or absent give no training
    pair: the training stream skips, counts and names them; evaluation (no selection) keeps them."""
    from sam3_train.data.datamodule import query_selector

    with ShardSink(out_dir=tmp_path, prefix="mixed", max_count=100) as sink:
        for i in range(6):
            data, meta = tiny_sample(i)
            if i % 3 == 1:
                meta["queries"] = [query("circle", exhaustive=False), query("box", exhaustive=False)]
            if i % 3 == 2:
                meta["queries"] = []
            sink.write(make_key(i), data, "png", meta)
    urls = expand_urls(f"{tmp_path}/mixed-000000.tar")
    train = ShardStream(urls=urls, batch_size=1, collate=collate, transforms=eval_transforms(image_size=16),
                        select=query_selector(max_queries=4, negative_share=0.5))
    with caplog.at_level("WARNING"):
        keys = [k for batch in train for k in batch.keys]
    assert keys == [make_key(0), make_key(3)] and train.skip_counter.value == 4
    assert f"key {make_key(1)}: no query to train on" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert [k for batch in train for k in batch.keys] == [make_key(0), make_key(3)]  # a second pass
    assert train.skip_counter.value == 8 and "skipped sample" not in caplog.text  # counted again, named once
    evaluation = ShardStream(urls=urls, batch_size=1, collate=collate, transforms=eval_transforms(image_size=16))
    assert [k for batch in evaluation for k in batch.keys] == [make_key(i) for i in range(6)]
