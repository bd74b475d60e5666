"""Evaluation planning and server answers as rows (the tables are in test_results_table.py)."""

from __future__ import annotations

import pytest

from nat_ray.config import NatRayConfig, from_dict, load_config
from nat_ray.core import nat_data as columns
from nat_ray.evaluation.run import EvalItem, _remote_episode, _row, decoding, plan_items
from nat_ray.tasks import Question


def test_decoding_is_the_papers_sampling_unless_greedy():
    assert decoding(NatRayConfig()) == (0.2, 0.9)
    assert decoding(from_dict(NatRayConfig, {"eval": {"greedy": True}})) == (0.0, 1.0)


def test_plan_has_one_item_per_task_question_and_seed_with_stable_ids():
    cfg = from_dict(NatRayConfig, {"eval": {"tasks": ["gsm8k", "strategyqa"], "limit": 2, "seeds": [0, 1]}})
    items = plan_items(cfg, "m")
    assert len(items) == 8
    assert len({i.trajectory_id for i in items}) == 8
    assert [i.trajectory_id for i in plan_items(cfg, "m")] == [i.trajectory_id for i in items]
    assert {(i.task, i.seed) for i in items} == {(t, s) for t in ("gsm8k", "strategyqa") for s in (0, 1)}


def test_a_server_answer_becomes_a_scored_trajectory_row():
    cfg = NatRayConfig()
    item = EvalItem("gsm8k", Question(id="q1", task="gsm8k", question="2 + 2?", gold="4"), 1, "t1")
    body = {
        "prompt": [{"role": "user", "content": "Question: 2 + 2?"}],
        "trajectory": [
            {"role": "assistant", "content": "Action: calculate[2+2]"},
            {"role": "user", "content": "Observation: 4"},
            {"role": "assistant", "content": "Action: finish[4]"},
        ],
        "answer": "4",
        "finished": True,
        "failure_reason": None,
        "usage": {"prompt_tokens": 30, "completion_tokens": 12},
    }
    ep = _remote_episode(item, body)
    assert ep.turns == 2 and ep.steps[0].observation == "4" and ep.trajectory() == body["trajectory"]
    row = _row(cfg, item, ep, "served-model", "endpoint", "h", "now")
    assert row[columns.CORRECT_PAPER] and row[columns.CORRECT_ROBUST]
    assert row[columns.PROMPT_TOKENS] == 30 and row[columns.COMPLETION_TOKENS] == 12
    assert row[columns.SEED] == 1 and row[columns.TEMPERATURE] == 0.2 and row[columns.MODEL] == "served-model"


@pytest.mark.parametrize("name", ["eval", "serve"])
def test_shipped_configs_load(name):
    from pathlib import Path

    cfg = load_config(NatRayConfig, Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    assert isinstance(cfg, NatRayConfig)


def test_missing_data_fails_before_the_output_folder_is_made(tmp_path, monkeypatch):
    from nat_ray.config import EvalConfig, NatRayConfig
    from nat_ray.errors import DataError
    from nat_ray.evaluation.run import run_eval

    monkeypatch.setenv("NAT_RAY_DATA_DIR", str(tmp_path / "no-data"))  # ASDiv is not shipped
    out = tmp_path / "eval"
    with pytest.raises(DataError, match="asdiv"):
        run_eval(NatRayConfig(eval=EvalConfig(tasks=["asdiv"], output_dir=str(out))))
    assert not out.exists()
