"""Bad data never stops reading: every kind of bad sample is skipped, counted and named; good ones all arrive."""

from __future__ import annotations

import io
import json
import logging
import random

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from sam3_train.data import rle as rle_ops
from sam3_train.data.collate import Collator
from sam3_train.data.datamodule import Sam3DataModule
from sam3_train.data.pipeline import ShardStream, SkipCounter
from sam3_train.data.schema import make_key, query
from sam3_train.data.shards import expand_urls
from sam3_train.data.transforms import eval_transforms
from sam3_train.data.tokenizer import Sam3Tokenizer

KINDS = ["corrupt_image", "invalid_json", "bad_rle", "box_outside", "json_missing_field", "no_image", "no_json"]


# Two shared cores: torch's intra-op threads only contend in these data tests.
pytestmark = pytest.mark.usefixtures("one_thread")


def _good(i: int) -> dict:
    buf = io.BytesIO()
    Image.fromarray(np.full((12, 12, 3), 40 + i, dtype=np.uint8)).save(buf, format="JPEG")
    mask = np.zeros((12, 12), dtype=bool)
    mask[1:5, 1:5] = True
    rle = rle_ops.encode(mask)
    meta = {"width": 12, "height": 12, "queries": [query("dot", [{"box": [1, 1, 4, 4], "rle": rle}]), query("cat")]}
    return {"jpg": buf.getvalue(), "json": json.dumps(meta).encode()}


def _spoil(sample: dict, kind: str) -> dict:
    meta = json.loads(sample["json"])
    if kind == "corrupt_image":
        sample["jpg"] = sample["jpg"][:40] + b"\x00" * 30
    elif kind == "invalid_json":
        sample["json"] = sample["json"][:-7]
    elif kind == "bad_rle":
        meta["queries"][0]["instances"][0]["rle"]["counts"] = "0a"
    elif kind == "box_outside":
        meta["queries"][0]["instances"][0]["box"] = [8, 8, 10, 10]
    elif kind == "json_missing_field":
        del meta["height"]
    elif kind == "no_image":
        del sample["jpg"]
    elif kind == "no_json":
        del sample["json"]
    if "json" in sample and kind not in ("invalid_json", "no_json"):
        sample["json"] = json.dumps(meta).encode()
    return sample


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory):
    """One shard per kind (19 good + 1 bad at a random place), an empty shard, a truncated shard."""
    root = tmp_path_factory.mktemp("corrupt")
    rng = random.Random(0)
    good, bad, i = [], {}, 0
    for s, kind in enumerate(KINDS):
        bad_at = rng.randrange(20)
        with wds.TarWriter(str(root / f"s{s}.tar")) as tar:
            for j in range(20):
                key = make_key(i)
                sample = _good(i)
                if j == bad_at:
                    sample = _spoil(sample, kind)
                    bad[kind] = key
                else:
                    good.append(key)
                tar.write({"__key__": key, **sample})
                i += 1
    (root / f"s{len(KINDS)}.tar").write_bytes(b"")  # empty shard
    truncated = root / f"s{len(KINDS) + 1}.tar"
    with wds.TarWriter(str(truncated)) as tar:
        for j in range(20):
            tar.write({"__key__": make_key(i + j), **_good(i + j)})
    raw = truncated.read_bytes()
    cut = raw.index(make_key(i + 10).encode()) + 700  # inside sample 10's first member
    truncated.write_bytes(raw[:cut])
    good += [make_key(i + j) for j in range(10)]  # the samples before the cut
    return {"pattern": f"{root}/s{{0..{len(KINDS) + 1}}}.tar", "good": good, "bad": bad,
            "empty": f"s{len(KINDS)}.tar", "truncated": truncated.name}


def _stream(corrupt, counter, tokenizer):
    return ShardStream(urls=expand_urls(corrupt["pattern"]), batch_size=3, transforms=eval_transforms(image_size=12),
                       collate=Collator(tokenizer=tokenizer), skip_counter=counter)


@pytest.fixture(scope="module")
def tokenizer():
    return Sam3Tokenizer.from_open_clip()


def test_bad_samples_are_skipped_counted_and_named(corrupt, tokenizer, caplog):
    counter = SkipCounter()
    with caplog.at_level(logging.WARNING, logger="sam3_train.data.pipeline"):
        keys = [k for batch in _stream(corrupt, counter, tokenizer) for k in batch.keys]
    assert sorted(keys) == sorted(corrupt["good"])
    log = "\n".join(r.getMessage() for r in caplog.records)
    for kind, key in corrupt["bad"].items():
        assert key in log, f"no warning names the {kind} sample {key}"
    assert corrupt["empty"] in log and corrupt["truncated"] in log
    assert counter.value >= len(KINDS) + 2
    assert counter.value == len(caplog.records)


@pytest.mark.parametrize("context, workers", [("fork", 2), ("spawn", 1)])  # spawn: slow to start, one worker
def test_counts_reach_the_main_process_from_workers(corrupt, tokenizer, context, workers):
    counter = SkipCounter()
    loader = DataLoader(_stream(corrupt, counter, tokenizer), batch_size=None, num_workers=workers,
                        multiprocessing_context=context)
    keys = [k for batch in loader for k in batch.keys]
    assert sorted(keys) == sorted(corrupt["good"])
    assert counter.value >= len(KINDS) + 2


def test_missing_shards_fail_before_training(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no file|does not exist"):
        expand_urls(str(tmp_path / "nothing-{000..003}.tar"))
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        expand_urls(str(tmp_path / "no_such_folder" / "a.tar"))
    dm = Sam3DataModule(train_shards=str(tmp_path / "none-{0..1}.tar"), num_workers=0)
    with pytest.raises(FileNotFoundError, match="none-"):
        dm.setup("fit")
