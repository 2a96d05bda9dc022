"""benchmarks/bench_engine_pool.py's memory accounting: the per-process profile of a stage's series
(hand-made samples) and the sampler on a real process tree (this test's own child)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_engine_pool  # noqa: E402

MIB = 2**20


def test_memory_profile_follows_each_process_from_a_minute_in():
    series = [{"t": 0.0, "procs": [{"pid": 1, "ppid": 0, "rss": 500 * MIB, "uss": 400 * MIB}]},
              {"t": 30.0, "procs": [{"pid": 1, "ppid": 0, "rss": 900 * MIB, "uss": 800 * MIB},
                                    {"pid": 2, "ppid": 1, "rss": 700 * MIB, "uss": 300 * MIB}]},
              {"t": 65.0, "procs": [{"pid": 1, "ppid": 0, "rss": 950 * MIB, "uss": 820 * MIB},
                                    {"pid": 2, "ppid": 1, "rss": 720 * MIB, "uss": 310 * MIB}]},
              {"t": 95.0, "procs": [{"pid": 1, "ppid": 0, "rss": 980 * MIB, "uss": 900 * MIB},
                                    {"pid": 2, "ppid": 1, "rss": 760 * MIB, "uss": 350 * MIB}]}]
    profile = bench_engine_pool.memory_profile(series)
    first, second = profile["processes"]
    # pid 1 appeared at 0 s: a minute in is the 65 s sample; pid 2 appeared at 30 s: the 95 s sample
    assert first == {"pid": 1, "ppid": 0, "first_s": 0.0, "peak_rss_mib": 980.0, "peak_uss_mib": 900.0,
                     "uss_after_60s_mib": 820.0, "last_s": 95.0, "uss_last_mib": 900.0}
    assert second["uss_after_60s_mib"] == 350.0 and second["peak_rss_mib"] == 760.0 and second["ppid"] == 1
    assert profile["peak_uss_total_mib"] == 1250.0  # 900 + 350 at 95 s; RSS would count shared pages twice
    assert bench_engine_pool.memory_profile([]) == {"processes": [], "peak_uss_total_mib": 0.0}


def test_the_sampler_sees_the_stage_and_its_children(tmp_path):
    child = "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3)']); " \
            "x = b'1' * (64 * 2**20); time.sleep(2); p.wait()"  # touched pages: resident
    start = time.perf_counter()
    result = bench_engine_pool.run_stage([sys.executable, "-c", child], tmp_path / "log", series_s=0.5)
    assert result["returncode"] == 0 and time.perf_counter() - start >= 3
    processes = result["memory"]["processes"]
    assert len(processes) == 2 and processes[1]["ppid"] == processes[0]["pid"]  # the stage and its child
    assert processes[0]["peak_uss_mib"] >= 64  # the 64 MiB it holds are its own pages
    assert result["peak_rss_largest_mib"] >= processes[0]["peak_uss_mib"]
