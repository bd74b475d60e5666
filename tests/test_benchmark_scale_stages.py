"""benchmarks/scale*.py: their pure helpers (flatness, marginal costs, windows, the RSS and CPU samplers,
the headline figures); no Ray."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def stages():
    return _load("scale_stages")


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


def test_marginal_costs_leave_the_fixed_cost_out(stages):
    # 10 s fixed + 0.5 s a unit: every added unit costs 0.5 s, whatever the size.
    assert stages.marginal_costs([32, 128, 512], [26.0, 74.0, 266.0]) == [0.5, 0.5]
    assert stages.marginal_flatness([32, 128, 512], [26.0, 74.0, 266.0]) == 1.0


def test_marginal_flatness_of_the_issue_figures(stages):
    # rollout_curve's calls (s) and data_prep's seconds of the run before these keys existed.
    assert stages.marginal_flatness([32, 128, 512], [33.62, 99.75, 302.29]) == pytest.approx(1.306, abs=1e-3)
    assert stages.marginal_flatness([1000, 10000, 100000], [16.11, 19.25, 89.84]) == pytest.approx(
        0.445, abs=1e-3
    )


def test_marginal_flatness_is_none_when_undefined(stages):
    assert stages.marginal_flatness([32, 128], [10.0, 20.0]) is None  # one marginal: nothing to compare
    assert stages.marginal_flatness([32, 128, 512], [10.0, 20.0, 20.0]) is None  # last costs nothing
    assert stages.marginal_costs([8], [1.0]) == []


def test_process_tree_rss_reads_a_process_and_skips_one_that_is_gone(stages):
    import os

    import psutil

    read, processes = stages.process_tree_rss([os.getpid(), 2**31 - 1])  # the second pid cannot exist
    assert processes >= 1
    assert read() >= psutil.Process().memory_info().rss // 2
    sampler = stages.PeakRSS(interval=0.005, read=read)
    with sampler:
        time.sleep(0.02)
    assert sampler.peak >= sampler.start_rss > 0
    assert stages.process_tree_rss([2**31 - 1])[1] == 0


def test_tree_cpu_seconds_counts_a_process_and_the_children_it_reaped():
    """Measured on a process of its own: in the full suite this one's descendants (a local Ray's
    workers) end between two readings and take their CPU with them."""
    import subprocess
    import sys

    import psutil

    scale_data = _load("scale_data")
    burn = "import time\nt = time.process_time() + 0.2\nwhile time.process_time() < t: pass\n"
    script = (
        f"import subprocess, sys\n{burn}"
        f"subprocess.run([sys.executable, '-c', {burn!r}])\n"  # a child that burns and is reaped
        "print('done', flush=True)\nsys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "done"
        # 0.2 s of its own and 0.2 s of its reaped child's, less a margin for clock granularity
        assert scale_data.tree_cpu_seconds(psutil.Process(proc.pid)) >= 0.35
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)


def test_headline_has_the_new_keys_and_tolerates_older_sections():
    scale = _load("scale")
    sections = {
        "index_build": {"index_build_speedup": 1.78, "index_build_over_in_process": 0.93},
        "ann_real": {"ann_recall_at_3_real": 0.97},
        "data_prep": {"data_prep_flatness": 17.9, "data_prep_marginal_flatness": 0.445},
        "rollout_curve": {
            "rollout_time_flatness": 1.73,
            "rollout_rss_flatness": 0.95,
            "rollout_marginal_flatness": 1.306,
            "engine_rss_flatness": 0.98,
        },
    }
    top = scale.headline(sections)
    assert top["index_build_over_in_process"] == 0.93
    assert top["ann_recall_at_3_real"] == 0.97
    assert top["data_prep_marginal_flatness"] == 0.445
    assert top["rollout_marginal_flatness"] == 1.306
    assert top["engine_rss_flatness"] == 0.98
    new = (
        "rollout_marginal_flatness",
        "data_prep_marginal_flatness",
        "engine_rss_flatness",
        "index_build_over_in_process",
        "ann_recall_at_3_real",
    )
    assert all(key in scale.TARGETS for key in new)
    # Sections measured before these keys existed (kept from an earlier run by --only) give None.
    old = scale.headline(
        {
            "index_build": {"index_build_speedup": 1.78},
            "rollout_curve": {"rollout_time_flatness": 1.7, "rollout_rss_flatness": 0.9},
        }
    )
    assert old["index_build_over_in_process"] is None and old["engine_rss_flatness"] is None
