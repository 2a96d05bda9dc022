"""Weighted training sources (data/mixing.py): weights honoured over a long draw, the mix a function of
(seed, epoch, rank), exact resumption with two sources, and the per-source share logged."""

from __future__ import annotations

import itertools
import math
import random
import types

import pytest
from conftest import SHAPES_SPLITS

from sam3_train.data import Sam3DataModule
from sam3_train.data.loader import StreamLoader
from sam3_train.data.mixing import TrainSource, check_source_specs, mix_samples, source_shares
from sam3_train.finetune import SourceShare

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _within_binomial(count: int, n: int, p: float, sds: float = 4.0) -> bool:
    return abs(count - n * p) <= sds * math.sqrt(n * p * (1 - p))


def test_mix_honours_weights_over_a_long_draw():
    sources = [TrainSource(name="a", urls=("a.tar",), weight=1.0), TrainSource(name="b", urls=("b.tar",), weight=3.0)]
    streams = [({"k": i} for i in itertools.count()) for _ in sources]
    n = 20000
    drawn = [s["__source__"] for s in itertools.islice(mix_samples(streams, sources, random.Random(0)), n)]
    count_a = drawn.count("a")
    assert _within_binomial(count_a, n, 0.25), count_a  # 1:3 -> 0.25 within 4 binomial sd (about 0.012)
    assert not _within_binomial(count_a, n, 0.5)


def test_source_specs_are_checked():
    assert check_source_specs([{"name": "a", "shards": "x.tar"}])[0]["weight"] == 1.0
    for bad, words in [([], "empty"), ([{"name": "a b", "shards": "x"}], "letters"),
                       ([{"name": "a", "shards": "x", "weight": 0}], "positive"),
                       ([{"name": "a", "shards": "x"}, {"name": "a", "shards": "y"}], "twice"),
                       ([{"name": "a", "shards": "x", "wieght": 1}], "unknown keys")]:
        with pytest.raises(ValueError, match=words):
            check_source_specs(bad)


def _shards(shapes_root: str) -> list[str]:
    return [f"{shapes_root}/shards/train/shapes-{i:06d}.tar" for i in range(8)]


def _datamodule(shapes_root: str, weights=(1.0, 3.0), **kw) -> Sam3DataModule:
    shards = _shards(shapes_root)
    sources = [{"name": "first", "shards": shards[:4], "weight": weights[0]},
               {"name": "second", "shards": shards[4:], "weight": weights[1]}]
    args = dict(shapes_root=shapes_root, shapes_splits=SHAPES_SPLITS, image_size=112, batch_size=4, num_workers=0,
                max_phrases_per_image=2, steps_per_epoch=6, shuffle_buffer=8, train_sources=sources)
    dm = Sam3DataModule(**{**args, **kw})
    dm.setup("fit")
    return dm


def _summary(batch) -> tuple:
    return tuple(batch.keys), tuple(batch.sources), tuple(batch.phrases), float(batch.images.sum())


def test_datamodule_mix_follows_weights_and_names_each_image(shapes_root, one_thread):
    dm = _datamodule(shapes_root, steps_per_epoch=40, batch_size=5, max_phrases_per_image=1)
    stream = dm._stream("train", train=True)
    first = {f"{shapes_root}/shards/train/shapes-{i:06d}.tar" for i in range(4)}
    sources = []
    for batch in StreamLoader(stream, epoch_fn=lambda: 0):
        sources += batch.sources
        assert len(batch.sources) == batch.num_images
    n = len(sources)
    assert n == 200
    assert _within_binomial(sources.count("first"), n, 0.25)
    assert dm.source_names == ["first", "second"]
    assert set(stream.sources[0].urls) == first and stream.urls == _shards(shapes_root)


def test_mix_is_a_function_of_seed_epoch_and_rank(shapes_root, one_thread):
    def run(epoch: int, rank: int = 0, seed: int = 0) -> list[tuple]:
        dm = _datamodule(shapes_root, seed=seed)
        stream = dm._stream("train", train=True)
        stream.rank, stream.world_size = rank, 2
        return [_summary(b) for b in StreamLoader(stream, epoch_fn=lambda: epoch)]

    base = run(0)
    assert len(base) == 6 and run(0) == base  # equal steps, same batches
    assert run(1) != base and run(0, rank=1) != base and run(0, seed=1) != base
    assert len(run(0, rank=1)) == 6


def test_two_sources_resume_exactly(shapes_root, one_thread):
    epoch = types.SimpleNamespace(value=1)
    full = [_summary(b) for b in StreamLoader(_datamodule(shapes_root)._stream("train", train=True),
                                              epoch_fn=lambda: epoch.value)]
    assert {s for b in full for s in b[1]} == {"first", "second"}
    first = StreamLoader(_datamodule(shapes_root)._stream("train", train=True), epoch_fn=lambda: epoch.value)
    it = iter(first)
    head = [_summary(next(it)) for _ in range(4)]
    state = first.state_dict()
    second = StreamLoader(_datamodule(shapes_root)._stream("train", train=True), epoch_fn=lambda: epoch.value)
    second.load_state_dict(state)
    assert head + [_summary(b) for b in second] == full


def test_sources_need_resampling_and_exclude_train_shards(shapes_root):
    with pytest.raises(ValueError, match="resampled"):
        _datamodule(shapes_root, resampled=False)._stream("train", train=True)
    with pytest.raises(ValueError, match="both set"):
        Sam3DataModule(train_shards="x.tar", train_sources=[{"name": "a", "shards": "x.tar"}])
    with pytest.raises(ValueError, match="val_sets: 'a/b'"):
        Sam3DataModule(val_sets={"a/b": "x.tar"})
    with pytest.raises(FileNotFoundError, match=r"data.train_sources \(a\)"):
        Sam3DataModule(train_sources=[{"name": "a", "shards": "/nonexistent/x-{0..1}.tar"}]).setup("fit")


def test_source_share_logs_image_weighted_shares():
    assert source_shares(["a", "b", "b", "b"], ["a", "b", "c"]) == {"a": 0.25, "b": 0.75, "c": 0.0}
    logged = []
    module = types.SimpleNamespace(log=lambda name, value, **kw: logged.append((name, value, kw["batch_size"],
                                                                                kw["sync_dist"])))
    SourceShare(names=["a", "b"]).on_train_batch_end(None, module, None, types.SimpleNamespace(sources=["a", "b"]), 0)
    assert logged == [("train/source_share/a", 0.5, 2, True), ("train/source_share/b", 0.5, 2, True)]


@pytest.mark.slow
def test_killed_run_with_two_sources_resumes_bitwise(shapes_root, tmp_path):
    """The real CLI, two weighted sources, two worker processes: a run killed (SIGKILL) mid-epoch and resumed
    with --ckpt_path last logs bitwise the losses of an uninterrupted run."""
    from fault_cli import callback, fit_config, logged, output, run

    shards = _shards(shapes_root)
    data = {"steps_per_epoch": 6, "num_workers": 2,
            "train_sources": [{"name": "a", "shards": shards[:3], "weight": 1}, {"name": "b", "shards": shards[3:],
                                                                                  "weight": 2}]}
    trainer = {"max_steps": 6}
    reference = fit_config(tmp_path / "reference", shapes_root, trainer=trainer, data=data)
    interrupted = fit_config(tmp_path / "interrupted", shapes_root, trainer=trainer, data=data)
    proc = run(["fit", "--config", str(reference)], tmp_path)
    assert proc.returncode == 0, output(proc)[-4000:]
    proc = run(["fit", "--config", str(interrupted), callback("SignalAt", step=3, signal="SIGKILL")], tmp_path)
    assert proc.returncode == -9, output(proc)[-4000:]
    proc = run(["fit", "--config", str(interrupted), "--ckpt_path", "last"], tmp_path)
    assert proc.returncode == 0, output(proc)[-4000:]
    expected = logged(tmp_path / "reference", 0)
    assert [step for step, _ in expected] == [0, 1, 2, 3, 4, 5]
    assert logged(tmp_path / "interrupted", 0) == expected[:3]  # killed at the start of step 4: checkpoint of step 2
    assert logged(tmp_path / "interrupted", 1) == expected[2:]
