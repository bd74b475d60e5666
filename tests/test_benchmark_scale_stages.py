"""benchmarks/scale_stages.py: its pure helpers (flatness, windows, the peak-RSS sampler); no Ray."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def stages():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("scale_stages_under_test", BENCH / "scale_stages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flatness_is_small_over_large(stages):
    assert stages.flatness(1.0, 1.0) == 1.0
    assert stages.flatness(0.5, 0.6) == pytest.approx(0.833, abs=1e-3)
    assert stages.flatness(800.0, 1000.0) == 0.8
    assert stages.flatness(None, 1.0) is None
    assert stages.flatness(1.0, 0.0) is None


def test_fraction_and_window(stages):
    assert stages.fraction(70.0, 100.0) == 0.7
    assert stages.fraction(None, 100.0) is None
    assert stages.fraction(1.0, 0.0) is None
    assert stages.window_seconds([10.0, 12.0, 11.0], [15.0, 20.0, 13.0]) == 10.0
    assert stages.window_seconds([], []) == 0.0


def test_peak_rss_sampler_sees_a_transient_peak_and_resets(stages):
    values = iter([100, 100, 500, 200] + [200] * 10_000)
    sampler = stages.PeakRSS(interval=0.001, read=lambda: next(values))
    with sampler:
        time.sleep(0.05)
    assert sampler.start_rss == 100
    assert sampler.peak == 500  # a value seen only between two samples' neighbours still counts
    assert sampler.samples >= 3
    sampler.start()  # reset per size: the old peak is forgotten
    assert sampler.stop() == 200
    assert sampler.start_rss == 200


def test_peak_rss_sampler_reads_this_process(stages):
    import mmap

    sampler = stages.PeakRSS(interval=0.005).start()
    # A fresh anonymous mapping, every page touched: new resident memory. (A bytearray may reuse
    # pages that malloc already holds resident in a process that has run a long suite.)
    block = mmap.mmap(-1, 64 * 2**20)
    for offset in range(0, len(block), mmap.PAGESIZE):
        block[offset] = 1
    time.sleep(0.05)
    peak = sampler.stop()
    block.close()
    assert peak - sampler.start_rss >= 32 * 2**20
