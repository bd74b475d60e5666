"""Evaluation tables and summaries: hand-worked accuracies, math averages, mean ± std over seeds."""

from __future__ import annotations

import statistics

import pytest

from nat_ray import nat_data as nd
from nat_ray.config import NatRayConfig, from_dict, load_config
from nat_ray.evaluate import (
    EvalItem,
    _remote_episode,
    _row,
    decoding,
    format_results,
    mean_std,
    plan_items,
    seed_metrics,
    summarize,
)
from nat_ray.tasks import Question


def _rows(task: str, family: str, seed: int, paper: list[bool], robust: list[bool], f1=None) -> list[dict]:
    return [
        {
            nd.TASK: task,
            nd.FAMILY: family,
            nd.SEED: seed,
            nd.CORRECT_PAPER: p,
            nd.CORRECT_ROBUST: r,
            nd.FINISHED: r,
            nd.TURNS: 2,
            nd.FAILURE_REASON: None if r else "turn_cap",
            nd.F1: None if f1 is None else f1[i],
        }
        for i, (p, r) in enumerate(zip(paper, robust))
    ]


T, F = True, False
ROWS = (
    _rows("gsm8k", "math", 0, [T, F, F, F], [T, T, F, F])  # 25 / 50
    + _rows("gsm8k", "math", 1, [T, T, F, F], [T, T, T, F])  # 50 / 75
    + _rows("svamp", "math", 0, [T, T, T, F], [T, T, T, F])  # 75 / 75
    + _rows("svamp", "math", 1, [F, F, F, F], [T, F, F, F])  # 0 / 25
    + _rows("hotpotqa", "hotpotqa", 0, [T, F], [T, F], f1=[1.0, 0.5])  # EM 50, F1 75
    + _rows("strategyqa", "strategyqa", 0, [T, F], [T, T])  # 50 / 100
)


def test_seed_metrics_are_percentages_per_task_and_seed():
    per = {(r["task"], r["seed"]): r for r in seed_metrics(ROWS)}
    assert per[("gsm8k", 0)]["acc_paper"] == 25.0 and per[("gsm8k", 0)]["acc_robust"] == 50.0
    assert per[("svamp", 1)]["acc_paper"] == 0.0 and per[("svamp", 1)]["acc_robust"] == 25.0
    assert per[("gsm8k", 0)]["failures"] == {"turn_cap": 2}
    hotpot = per[("hotpotqa", 0)]
    assert hotpot["em"] == 50.0 and hotpot["f1"] == 75.0
    assert "em" not in per[("strategyqa", 0)]


def test_mean_std_uses_the_sample_std_and_zero_for_one_seed():
    assert mean_std([25.0, 50.0]) == {
        "mean": 37.5,
        "std": statistics.stdev([25.0, 50.0]),
        "values": [25.0, 50.0],
    }
    assert mean_std([40.0])["std"] == 0.0


def test_math_average_is_the_unweighted_mean_of_datasets_per_seed_then_over_seeds():
    summary = summarize(ROWS)
    avg = summary["math_average"]
    assert avg["tasks"] == ["gsm8k", "svamp"]  # the paper's column order, not alphabetical
    # paper: seed 0 = (25 + 75) / 2 = 50, seed 1 = (50 + 0) / 2 = 25
    assert avg["acc_paper"]["values"] == [50.0, 25.0]
    assert avg["acc_paper"]["mean"] == 37.5
    assert avg["acc_paper"]["std"] == pytest.approx(17.6777, abs=1e-4)
    # robust: seed 0 = (50 + 75) / 2 = 62.5, seed 1 = (75 + 25) / 2 = 50
    assert avg["acc_robust"]["values"] == [62.5, 50.0]
    gsm = summary["tasks"]["gsm8k"]
    assert gsm["questions"] == 4 and gsm["trajectories"] == 8 and gsm["seeds"] == [0, 1]
    assert gsm["acc_robust"]["mean"] == 62.5
    assert summary["tasks"]["hotpotqa"]["f1"]["mean"] == 75.0


def test_no_math_task_means_no_average():
    assert summarize(_rows("strategyqa", "strategyqa", 0, [T], [T]))["math_average"] is None


def test_results_markdown_has_the_paper_layout_with_both_scorings():
    text = format_results(summarize(ROWS), {"model": "m"})
    assert "- **model**: m" in text
    assert "| Scoring | GSM8K | SVAMP | Avg (2 of 4) |" in text
    assert "| paper | 37.50 ± 17.68 | 37.50 ± 53.03 | 37.50 ± 17.68 |" in text
    assert "| robust | 62.50 ± 17.68 | 50.00 ± 35.36 | 56.25 ± 8.84 |" in text
    assert "| paper = robust | 50.00 ± 0.00 | 75.00 ± 0.00 |" in text
    assert "| paper | 50.00 ± 0.00 |" in text and "| robust | 100.00 ± 0.00 |" in text
    assert "| GSM8K | 4 | 2 |" in text


def test_all_four_math_datasets_give_the_plain_average_column():
    rows = [r for t in ("gsm8k", "asdiv", "svamp", "multiarith") for r in _rows(t, "math", 0, [T, F], [T, F])]
    text = format_results(summarize(rows), {})
    assert "| Scoring | GSM8K | ASDiv | SVAMP | MultiArith | Avg |" in text
    assert "| paper | 50.00 ± 0.00 | 50.00 ± 0.00 | 50.00 ± 0.00 | 50.00 ± 0.00 | 50.00 ± 0.00 |" in text


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
    assert row[nd.CORRECT_PAPER] and row[nd.CORRECT_ROBUST]
    assert row[nd.PROMPT_TOKENS] == 30 and row[nd.COMPLETION_TOKENS] == 12
    assert row[nd.SEED] == 1 and row[nd.TEMPERATURE] == 0.2 and row[nd.MODEL] == "served-model"


@pytest.mark.parametrize("name", ["eval", "serve"])
def test_shipped_configs_load(name):
    from pathlib import Path

    cfg = load_config(NatRayConfig, Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    assert isinstance(cfg, NatRayConfig)
