"""benchmarks/bench_memory.py's method: a training step on fake tensors gives the peak that the same
step on real tensors gives (both with the stand-in matchers), and the CPU allocator agrees with it.

Slow lane, for two reasons: each case runs three training steps (~15 s), and the benchmark rests on
torch internals that no public API replaces (its docstring: ``FakeTensorMode``, ``MemTracker``), so a
torch upgrade may break it; CI runs it, the fast lane (``-m "not slow"``) does not. The benchmark is
imported by a fixture, not at the top, so such a break cannot stop the fast lane's collection either.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def bench_memory():
    sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    return importlib.import_module("bench_memory")


@pytest.fixture(scope="module")
def batch(tmp_path_factory, bench_memory):
    (batch,) = bench_memory.make_batches(tmp_path_factory.mktemp("shapes"), image_size=112, images=2, phrases=3,
                                         count=1)
    return batch


@pytest.mark.parametrize("name", ["full_fp32", "full_bf16_ckpt", "lora16_bf16_ckpt_boxes"])
def test_fake_step_peak_equals_the_real_steps(bench_memory, batch, name):
    setting = next(s for s in bench_memory.SETTINGS if s.name == name)
    fake = bench_memory.tracked_peak(setting, "tiny", 112, batch, fake=True)
    real = bench_memory.tracked_peak(setting, "tiny", 112, batch, fake=False, standins=True)
    allocator = bench_memory.allocator_peak(setting, "tiny", 112, batch)
    assert fake["Parameter"] == real["Parameter"] and fake["Optstate"] == real["Optstate"]
    assert fake["Total"] == pytest.approx(real["Total"], rel=0.03)
    assert fake["Total"] == pytest.approx(allocator, rel=0.15)


def test_fits_keeps_the_headroom(bench_memory):
    gib = bench_memory.GIB
    assert bench_memory.fits(int(21.9 * gib)) == "24 / 40 / 80"
    assert bench_memory.fits(int(22.1 * gib)) == "40 / 80"
    assert bench_memory.fits(int(79 * gib)) == "none of 24 / 40 / 80"
