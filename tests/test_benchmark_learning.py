"""benchmarks/learning.py's statistics: the difference of two accuracies and its interval."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def learning():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports machine_info beside it
    try:
        spec = importlib.util.spec_from_file_location("learning_benchmark", BENCHMARKS / "learning.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def test_the_difference_interval_is_newcombes_hybrid_score_interval(learning):
    """Newcombe (1998), Statistics in Medicine 17, 873-890, table II example: 56/70 vs 48/80 gives
    a difference of 0.2000 with the hybrid score interval [0.0524, 0.3339]."""
    got = learning.newcombe(learning.cell(56, 70), learning.cell(48, 80))
    assert got["difference"] == pytest.approx(20.0)
    assert got["ci95"] == pytest.approx([5.24, 33.39], abs=0.01)
    assert got["outside_noise"] is True
    same = learning.newcombe(learning.cell(10, 20), learning.cell(11, 20))
    assert same["ci95"][0] < 0 < same["ci95"][1] and same["outside_noise"] is False


def test_pooled_cells_add_counts_over_seeds(learning):
    pooled = learning.pooled([learning.cell(90, 100), learning.cell(80, 100)])
    assert (pooled["correct"], pooled["n"], pooled["accuracy"]) == (170, 200, 85.0)
