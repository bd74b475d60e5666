"""Evaluation planning and server answers as rows (the tables are in test_results_table.py)."""

from __future__ import annotations

import pytest

from nat_ray.config import NatRayConfig, from_dict, load_config
from nat_ray.core import nat_data as columns
from nat_ray.evaluation.run import _remote_episode, _row, decoding, plan_items
from nat_ray.rollout.run import plan_rows
from nat_ray.tasks.episodes import PlannedEpisode


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
    item = PlannedEpisode("t1", "gsm8k", "q1", "2 + 2?", "4", "4", 0.2, 0, 1)
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
    row = _row(item, ep, "served-model", "endpoint", "h", "now")
    assert row[columns.CORRECT_PAPER] and row[columns.CORRECT_ROBUST]
    assert row[columns.PROMPT_TOKENS] == 30 and row[columns.COMPLETION_TOKENS] == 12
    assert row[columns.SEED] == 1 and row[columns.TEMPERATURE] == 0.2 and row[columns.MODEL] == "served-model"


def test_rollout_and_evaluation_plan_the_same_question_alike():
    """One planned-episode type for both stages: the same gold for the scorer, rows that round-trip."""
    tasks = ["gsm8k", "strategyqa", "hotpotqa"]
    rollout = plan_rows(
        from_dict(
            NatRayConfig,
            {"rollout": {"tasks": tasks, "split": "test", "limit": 2, "temperatures": [0.2], "seed": 3}},
        ),
        "m",
    )
    evaluation = plan_items(
        from_dict(NatRayConfig, {"eval": {"tasks": tasks, "limit": 2, "seeds": [3]}}), "m"
    )
    assert rollout == evaluation  # same ids, same gold: the rows of either stage are scored alike
    assert [PlannedEpisode.from_row(p.to_row()) for p in rollout] == rollout
    assert {p.gold_scored for p in rollout if p.task == "strategyqa"} <= {"yes", "no"}
    assert len(rollout) == 6 and all(p.temperature == 0.2 and p.sample_index == 0 for p in rollout)


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
