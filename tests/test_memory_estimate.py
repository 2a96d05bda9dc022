"""benchmarks/bench_memory.py's method: a training step on fake tensors gives the peak that the same
step on real tensors gives (both with the stand-in matchers), and the CPU allocator agrees with it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_memory  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    (batch,) = bench_memory.make_batches(tmp_path_factory.mktemp("shapes"), image_size=112, images=2, phrases=3,
                                         count=1)
    return batch


@pytest.mark.parametrize("name", ["full_fp32", "full_bf16_ckpt", "lora16_bf16_ckpt_boxes"])
def test_fake_step_peak_equals_the_real_steps(batch, name):
    setting = next(s for s in bench_memory.SETTINGS if s.name == name)
    fake = bench_memory.tracked_peak(setting, "tiny", 112, batch, fake=True)
    real = bench_memory.tracked_peak(setting, "tiny", 112, batch, fake=False, standins=True)
    allocator = bench_memory.allocator_peak(setting, "tiny", 112, batch)
    assert fake["Parameter"] == real["Parameter"] and fake["Optstate"] == real["Optstate"]
    assert fake["Total"] == pytest.approx(real["Total"], rel=0.03)
    assert fake["Total"] == pytest.approx(allocator, rel=0.15)


def test_fits_keeps_the_headroom():
    gib = bench_memory.GIB
    assert bench_memory.fits(int(21.9 * gib)) == "24 / 40 / 80"
    assert bench_memory.fits(int(22.1 * gib)) == "40 / 80"
    assert bench_memory.fits(int(79 * gib)) == "none of 24 / 40 / 80"
