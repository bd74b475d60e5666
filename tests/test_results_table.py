"""Accuracy tables: hand-worked per-seed accuracies, math averages, mean ± std, the Markdown layouts."""

from __future__ import annotations

import statistics

import pytest

from nat_ray import nat_data as columns
from nat_ray.results_table import (
    format_comparison,
    format_eval_results,
    format_rollout_summary,
    in_table_order,
    mean_std,
    seed_metrics,
    summarize,
    summarize_rollout,
)


def _rows(task: str, family: str, seed: int, paper: list[bool], robust: list[bool], f1=None) -> list[dict]:
    return [
        {
            columns.TASK: task,
            columns.FAMILY: family,
            columns.SEED: seed,
            columns.CORRECT_PAPER: p,
            columns.CORRECT_ROBUST: r,
            columns.FINISHED: r,
            columns.TURNS: 2,
            columns.FAILURE_REASON: None if r else "turn_cap",
            columns.F1: None if f1 is None else f1[i],
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
    text = format_eval_results(summarize(ROWS), {"model": "m"})
    assert "- **model**: m" in text
    assert "| Scoring | GSM8K | SVAMP | Avg (2 of 4) |" in text
    assert "| paper | 37.50 ± 17.68 | 37.50 ± 53.03 | 37.50 ± 17.68 |" in text
    assert "| robust | 62.50 ± 17.68 | 50.00 ± 35.36 | 56.25 ± 8.84 |" in text
    assert "| paper = robust | 50.00 ± 0.00 | 75.00 ± 0.00 |" in text
    assert "| paper | 50.00 ± 0.00 |" in text and "| robust | 100.00 ± 0.00 |" in text
    assert "| GSM8K | 4 | 2 |" in text


def test_all_four_math_datasets_give_the_plain_average_column():
    rows = [r for t in ("gsm8k", "asdiv", "svamp", "multiarith") for r in _rows(t, "math", 0, [T, F], [T, F])]
    text = format_eval_results(summarize(rows), {})
    assert "| Scoring | GSM8K | ASDiv | SVAMP | MultiArith | Avg |" in text
    assert "| paper | 50.00 ± 0.00 | 50.00 ± 0.00 | 50.00 ± 0.00 | 50.00 ± 0.00 | 50.00 ± 0.00 |" in text


def test_tasks_come_in_the_papers_column_order_and_unknown_ones_after():
    assert in_table_order(["strategyqa", "zeta", "svamp", "gsm8k", "alpha"]) == [
        "gsm8k",
        "svamp",
        "strategyqa",
        "alpha",
        "zeta",
    ]


def test_comparison_has_a_row_per_model_with_robust_then_paper_accuracy():
    text = format_comparison({"base": summarize(ROWS), "nat": summarize(_rows("gsm8k", "math", 0, [T], [T]))})
    assert "| Model | gsm8k | svamp | hotpotqa | strategyqa | Math avg |" in text
    # base: gsm8k robust 62.5 (paper 37.5); math average robust 56.25 (paper 37.5)
    assert "| base | 62.5 (37.5) | 50.0 (37.5) | 50.0 (50.0) | 100.0 (50.0) | 56.2 (37.5) |" in text
    assert "| nat | 100.0 (100.0) | - | - | - | 100.0 (100.0) |" in text


def test_rollout_summary_is_per_task_and_temperature():
    rows = [
        {**row, columns.TEMPERATURE: temperature}
        for temperature in (0.0, 0.7)
        for row in _rows("gsm8k", "math", 0, [T, F], [T, T])
    ]
    table = summarize_rollout(rows)
    assert [(r["task"], r["temperature"], r["count"]) for r in table] == [
        ("gsm8k", 0.0, 2),
        ("gsm8k", 0.7, 2),
    ]
    assert table[0]["acc_paper"] == 0.5 and table[0]["acc_robust"] == 1.0 and table[0]["mean_turns"] == 2
    text = format_rollout_summary(table)
    assert text.splitlines()[1].split()[:5] == ["gsm8k", "0.00", "2", "50.0%", "100.0%"]
