"""``nat-ray eval`` in-process: the session's real vLLM engine, one batched stepper over tasks and seeds."""

from __future__ import annotations

import json

import pytest

from nat_ray.config import NatRayConfig, from_dict
from nat_ray.core import nat_data as columns
from nat_ray.core import records
from nat_ray.evaluation.run import run_eval
from nat_ray.paths import PACKAGE_DATA_DIR

pytestmark = pytest.mark.integration

SAMPLE_CORPUS = str(PACKAGE_DATA_DIR / "hotpotqa" / "corpus_sample.jsonl.gz")


def test_in_process_eval_writes_rows_summary_and_tables(tmp_path, vllm_engine, embedded_path):
    cfg = from_dict(
        NatRayConfig,
        {
            "engine": {"model": embedded_path, "max_model_len": 2048},
            "agent": {"max_turns": 2, "max_new_tokens": 48},
            "tools": {"search_corpus": SAMPLE_CORPUS},
            "eval": {
                "tasks": ["svamp", "strategyqa"],
                "limit": 2,
                "seeds": [0, 1],
                "greedy": True,
                "output_dir": str(tmp_path / "eval"),
            },
        },
    )
    summary = run_eval(cfg, engine=vllm_engine)
    rows = records.read_rows(tmp_path / "eval" / "trajectories")
    assert len(rows) == 8 and len({r[columns.TRAJECTORY_ID] for r in rows}) == 8
    assert all(
        r[columns.TEMPERATURE] == 0.0 and r[columns.ENGINE] == "vllm" and 1 <= r[columns.TURNS] <= 2
        for r in rows
    )
    assert summary.settings["decoding"] == "greedy"
    assert summary.tasks["svamp"]["questions"] == 2 and summary.tasks["svamp"]["seeds"] == [0, 1]
    on_disk = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert on_disk["math_average"]["tasks"] == ["svamp"]
    text = (tmp_path / "eval" / "results.md").read_text()
    assert "| Scoring | SVAMP | Avg (1 of 4) |" in text and "## StrategyQA" in text
