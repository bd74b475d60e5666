"""Accuracy tables: hand-worked per-seed accuracies, math averages, mean ± std, intervals, the layouts."""

from __future__ import annotations

import math
import statistics

import pytest

from nat_ray.core import nat_data as columns
from nat_ray.evaluation.results_table import (
    SMOKE_TEST_BANNER,
    format_comparison,
    format_eval_results,
    format_rollout_summary,
    in_table_order,
    is_smoke_test,
    mean_interval,
    mean_std,
    seed_metrics,
    summarize,
    summarize_rollout,
    t95,
    wilson_interval,
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
    # Layout changed deliberately: one decimal, then [Wilson 95%] n=trajectories (hand-worked below).
    assert (
        "| paper | 37.5 ± 17.7 [13.7, 69.4] n=8 | 37.5 ± 53.0 [13.7, 69.4] n=8 | 37.5 ± 17.7 [18.5, 61.4] n=16 |"
        in text
    )
    assert (
        "| robust | 62.5 ± 17.7 [30.6, 86.3] n=8 | 50.0 ± 35.4 [21.5, 78.5] n=8 | 56.2 ± 8.8 [33.2, 76.9] n=16 |"
        in text
    )
    assert "| paper = robust | 50.0 ± 0.0 [9.5, 90.5] n=2 | 75.0 ± 0.0 n=2 |" in text
    assert (
        "| paper | 50.0 ± 0.0 [9.5, 90.5] n=2 |" in text
        and "| robust | 100.0 ± 0.0 [34.2, 100.0] n=2 |" in text
    )
    assert "| GSM8K | 4 | 2 |" in text


def test_all_four_math_datasets_give_the_plain_average_column():
    rows = [r for t in ("gsm8k", "asdiv", "svamp", "multiarith") for r in _rows(t, "math", 0, [T, F], [T, F])]
    text = format_eval_results(summarize(rows), {})
    assert "| Scoring | GSM8K | ASDiv | SVAMP | MultiArith | Avg |" in text
    # 1 of 2 per dataset -> Wilson [9.5, 90.5]; the average pools 4 of 8 -> [21.5, 78.5].
    assert (
        "| paper | 50.0 ± 0.0 [9.5, 90.5] n=2 | 50.0 ± 0.0 [9.5, 90.5] n=2 | 50.0 ± 0.0 [9.5, 90.5] n=2 | "
        "50.0 ± 0.0 [9.5, 90.5] n=2 | 50.0 ± 0.0 [21.5, 78.5] n=8 |"
    ) in text


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
    # base: gsm8k robust 62.5 (paper 37.5); math average robust 56.25 (paper 37.5). Layout changed
    # deliberately: mean ± std [Wilson] n=, the paper's rule after it, ~ where within noise of the base.
    assert (
        "| base | 62.5 ± 17.7 [30.6, 86.3] n=8 (paper 37.5) | 50.0 ± 35.4 [21.5, 78.5] n=8 (paper 37.5) | "
        "50.0 ± 0.0 [9.5, 90.5] n=2 (paper 50.0) | 100.0 ± 0.0 [34.2, 100.0] n=2 (paper 50.0) | "
        "56.2 ± 8.8 [33.2, 76.9] n=16 (paper 37.5) |"
    ) in text
    # 1 of 1 -> Wilson [20.7, 100.0], which overlaps the base's [30.6, 86.3]: within noise.
    assert (
        "| nat | 100.0 ± 0.0 [20.7, 100.0] n=1 (paper 100.0) ~ | - | - | - | 100.0 ± 0.0 [20.7, 100.0] n=1 (paper 100.0) ~ |"
        in text
    )


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
    # 2 of 2 robust -> Wilson [1/(1 + z²/2), 1] = [34.2%, 100%]
    assert table[0]["correct_robust"] == 2 and table[0]["correct_paper"] == 1
    assert table[0]["robust_wilson95"] == pytest.approx([2 / (2 + Z * Z), 1.0])
    assert text.splitlines()[1].split()[5:7] == ["[34.2,", "100.0]"]
    assert text.splitlines()[0].split()[2] == "n"
    assert text.splitlines()[-1].startswith("n = trajectories; robust 95% CI: Wilson")
    assert SMOKE_TEST_BANNER not in text
    smoke = format_rollout_summary(table, smoke_test=True).splitlines()
    assert smoke[0].startswith("Smoke test, not a measurement.") and "not the method" in smoke[0]
    assert smoke[3].split()[:5] == ["gsm8k", "0.00", "2", "50.0%", "100.0%"]


# --- intervals -------------------------------------------------------------------------------------

Z = 1.96


def _wilson_by_hand(k: int, n: int) -> tuple[float, float]:
    """The Wilson bounds as the roots of (k/n - p)² = z² p(1-p)/n, a quadratic in p."""
    p_hat = k / n
    a = 1 + Z * Z / n
    b = -(2 * p_hat + Z * Z / n)
    c = p_hat * p_hat
    root = math.sqrt(b * b - 4 * a * c)
    return ((-b - root) / (2 * a), (-b + root) / (2 * a))


@pytest.mark.parametrize("k, n", [(0, 10), (5, 10), (10, 10), (1, 1), (3, 8), (81, 263)])
def test_wilson_interval_solves_the_score_equation(k, n):
    assert wilson_interval(k, n) == pytest.approx(_wilson_by_hand(k, n), abs=1e-12)


def test_wilson_interval_by_hand_and_from_the_textbook():
    # 0 of n: [0, z²/(n + z²)]; n of n: [n/(n + z²), 1]
    assert wilson_interval(0, 10) == pytest.approx((0.0, 3.8416 / 13.8416))
    assert wilson_interval(10, 10) == pytest.approx((10 / 13.8416, 1.0))
    assert wilson_interval(1, 1) == pytest.approx((1 / 4.8416, 1.0))
    # 5 of 10: centre 0.5, half-width z/(1 + z²/10) * sqrt(0.025 + z²/400) = 0.26341
    low, high = wilson_interval(5, 10)
    assert (low, high) == pytest.approx((0.5 - 0.26341, 0.5 + 0.26341), abs=1e-5)
    # Newcombe (1998), Stat. Med. 17:857, Table I: 81/263 -> 0.2553-0.3662, 0/20 -> 0-0.1611.
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=5e-5)
    assert wilson_interval(0, 20) == pytest.approx((0.0, 0.1611), abs=5e-5)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(1, 10, z=0.0) == pytest.approx((0.1, 0.1))  # no width without a quantile


@pytest.mark.parametrize("k, n", [(-1, 10), (11, 10), (0, -1)])
def test_wilson_interval_rejects_counts_outside_0_to_n(k, n):
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(k, n)


def test_t_table_matches_the_textbook_and_falls_toward_z():
    assert t95(1) == 12.706 and t95(2) == 4.303 and t95(10) == 2.228 and t95(30) == 2.042
    values = [t95(df) for df in range(1, 200)]
    assert all(a > b for a, b in zip(values, values[1:]))  # strictly falling, across the table's end
    assert t95(40) == pytest.approx(2.021, abs=1e-3) and t95(120) == pytest.approx(1.980, abs=1e-3)
    with pytest.raises(ValueError, match="df >= 1"):
        t95(0)


def test_mean_interval_is_t_times_the_standard_error():
    assert mean_interval([40.0]) is None and mean_interval([]) is None
    # [50, 25]: mean 37.5, s = 17.678, se = s/sqrt(2) = 12.5, t(1) = 12.706
    assert mean_interval([50.0, 25.0]) == pytest.approx((37.5 - 12.706 * 12.5, 37.5 + 12.706 * 12.5))
    # [40, 50, 60]: mean 50, s = 10, se = 10/sqrt(3), t(2) = 4.303
    half = 4.303 * 10 / math.sqrt(3)
    assert mean_interval([40.0, 50.0, 60.0]) == pytest.approx((50 - half, 50 + half))


def test_summary_gives_counts_wilson_and_seed_intervals_per_task():
    summary = summarize(ROWS)
    gsm = summary["tasks"]["gsm8k"]
    # gsm8k, both seeds: paper 1 + 2 = 3 of 8, robust 2 + 3 = 5 of 8
    assert gsm["n"] == 8 and gsm["correct_paper"] == 3 and gsm["correct_robust"] == 5
    assert gsm["acc_paper"]["n"] == 8 and gsm["acc_paper"]["successes"] == 3
    assert gsm["acc_paper"]["wilson95"] == pytest.approx([100 * b for b in _wilson_by_hand(3, 8)])
    assert gsm["acc_robust"]["wilson95"] == pytest.approx([100 * b for b in _wilson_by_hand(5, 8)])
    assert gsm["finished"]["successes"] == 5
    # Two seeds: 62.5 ± 12.706 * 12.5 reaches past both ends, so it is clipped to percentages.
    assert gsm["acc_robust"]["seed_ci95"] == [0.0, 100.0]
    assert gsm["mean_turns"]["seed_ci95"] == [2.0, 2.0] and "wilson95" not in gsm["mean_turns"]
    hotpot = summary["tasks"]["hotpotqa"]
    assert hotpot["em"]["successes"] == 1 and hotpot["em"]["wilson95"] == pytest.approx(
        [100 * b for b in _wilson_by_hand(1, 2)]
    )
    assert "wilson95" not in hotpot["f1"] and hotpot["f1"]["n"] == 2
    assert hotpot["em"]["seed_ci95"] is None  # one seed
    strategy = summary["tasks"]["strategyqa"]
    assert strategy["correct_robust"] == 2 and strategy["acc_robust"]["wilson95"][1] == 100.0


def test_seed_interval_with_three_seeds_is_not_clipped():
    rows = [
        r
        for seed, right in enumerate((4, 5, 6))  # 40, 50, 60 %
        for r in _rows("gsm8k", "math", seed, [i < right for i in range(10)], [i < right for i in range(10)])
    ]
    stat = summarize(rows)["tasks"]["gsm8k"]["acc_robust"]
    half = 4.303 * 10 / math.sqrt(3)
    assert stat["seed_ci95"] == pytest.approx([50 - half, 50 + half])
    assert stat["n"] == 30 and stat["successes"] == 15
    assert stat["wilson95"] == pytest.approx([100 * b for b in _wilson_by_hand(15, 30)])
    text = format_eval_results(summarize(rows), {})
    assert "| robust, seeds | [25.2, 74.8] (3 seeds) |" in text
    assert "Row *seeds*: the 95% t interval of the mean over seeds" in text


def test_math_average_interval_pools_equal_datasets_and_uses_the_effective_n_otherwise():
    avg = summarize(ROWS)["math_average"]
    # gsm8k and svamp have 8 trajectories each: the pooled n, 16, and 3 + 3 = 6 paper / 5 + 4 = 9 robust.
    assert avg["n"] == 16 and avg["n_effective"] == pytest.approx(16.0)
    assert avg["correct_paper"] == 6 and avg["correct_robust"] == 9
    assert avg["acc_paper"]["wilson95"] == pytest.approx([100 * b for b in _wilson_by_hand(6, 16)])
    assert avg["acc_robust"]["wilson95"] == pytest.approx([100 * b for b in _wilson_by_hand(9, 16)])
    assert avg["acc_paper"]["seed_ci95"] == [0.0, 100.0]
    # Unequal: gsm8k 1 of 2, svamp 4 of 4 -> average 75 %, effective n = 2² / (1/2 + 1/4) = 16/3.
    rows = _rows("gsm8k", "math", 0, [T, F], [T, F]) + _rows("svamp", "math", 0, [T] * 4, [T] * 4)
    avg = summarize(rows)["math_average"]
    assert avg["n"] == 6 and avg["n_effective"] == pytest.approx(16 / 3)
    n, p = 16 / 3, 0.75
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z / (1 + Z * Z / n) * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    assert avg["acc_robust"]["wilson95"] == pytest.approx([100 * (centre - half), 100 * (centre + half)])
    assert avg["acc_robust"]["seed_ci95"] is None


def test_seed_metrics_count_the_successes_behind_each_percentage():
    per = {(r["task"], r["seed"]): r for r in seed_metrics(ROWS)}
    assert per[("gsm8k", 1)]["count"] == 4
    assert per[("gsm8k", 1)]["correct_paper"] == 2 and per[("gsm8k", 1)]["correct_robust"] == 3
    assert per[("gsm8k", 1)]["finished_count"] == 3


def test_eval_tables_note_their_layout_and_show_the_smoke_banner_only_when_asked():
    text = format_eval_results(summarize(ROWS), {"model": "m"})
    assert SMOKE_TEST_BANNER not in text and text.startswith("# NAT evaluation")
    assert (
        "| paper, seeds | [0.0, 100.0] (2 seeds) | [0.0, 100.0] (2 seeds) | [0.0, 100.0] (2 seeds) |" in text
    )
    assert text.count("Cell: mean ± std over seeds") == 4  # one note under each of the four tables
    assert "| seeds |" not in text  # HotpotQA has one seed here: no seed row
    assert (
        "| GSM8K | 4 | 2 | 37.5 ± 17.7 [13.7, 69.4] n=8 | 62.5 ± 17.7 [30.6, 86.3] n=8 | [0.0, 100.0] (2 seeds) |"
        in text
    )
    smoke = format_eval_results(summarize(ROWS), {"model": "m"}, smoke_test=True)
    assert smoke.startswith(SMOKE_TEST_BANNER + "\n\n# NAT evaluation")
    assert "tiny CPU default" in SMOKE_TEST_BANNER and "not the method" in SMOKE_TEST_BANNER


def test_comparison_marks_only_differences_within_noise_and_notes_the_test():
    weak = summarize(_rows("gsm8k", "math", 0, [F] * 20, [F] * 20))  # 0 of 20 -> [0.0, 16.1]
    strong = summarize(_rows("gsm8k", "math", 0, [T] * 20, [T] * 20))  # 20 of 20 -> [83.9, 100.0]
    close = summarize(_rows("gsm8k", "math", 0, [T] * 2 + [F] * 18, [T] * 2 + [F] * 18))  # 2 of 20
    text = format_comparison({"base": weak, "nat": strong, "nut": close})
    assert (
        "| base | 0.0 ± 0.0 [0.0, 16.1] n=20 (paper 0.0) | 0.0 ± 0.0 [0.0, 16.1] n=20 (paper 0.0) |" in text
    )
    assert (
        "| nat | 100.0 ± 0.0 [83.9, 100.0] n=20 (paper 100.0) | 100.0 ± 0.0 [83.9, 100.0] n=20 (paper 100.0) |"
        in text
    )
    assert "| nut | 10.0 ± 0.0 [2.8, 30.1] n=20 (paper 10.0) ~ |" in text
    assert "~ : within noise of a base row (base), i.e. the Wilson intervals overlap" in text
    assert "## Mean over seeds" not in text  # one seed everywhere
    assert SMOKE_TEST_BANNER not in text
    assert format_comparison({"base": weak}, smoke_test=True).startswith(
        SMOKE_TEST_BANNER + "\n\n# NAT pipeline"
    )


def test_comparison_gives_the_seed_interval_table_with_two_seeds():
    text = format_comparison({"base": summarize(ROWS)})
    assert "## Mean over seeds, 95% t interval (robust accuracy %)" in text
    assert (
        "| base | [0.0, 100.0] (2 seeds) | [0.0, 100.0] (2 seeds) | - | - | [0.0, 100.0] (2 seeds) |" in text
    )


def test_comparison_still_prints_a_summary_stored_before_intervals():
    old = {
        "tasks": {
            "gsm8k": {"acc_robust": {"mean": 50.0, "std": 0.0}, "acc_paper": {"mean": 25.0, "std": 0.0}}
        },
        "math_average": None,
    }
    text = format_comparison({"base": summarize(ROWS), "old": old})
    assert "| old | 50.0 ± 0.0 (paper 25.0) | - | - | - | - |" in text


@pytest.mark.parametrize(
    "model",
    [
        None,
        "",
        "embedded",
        "default",
        "smollm2-135m-instruct",
        "/home/u/.cache/nat_ray/models/smollm2-135m-instruct",
        "/home/u/.cache/nat_ray/models/smollm2-135m-instruct/",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ],
)
def test_the_embedded_model_is_a_smoke_test_on_any_device(model):
    assert is_smoke_test(model, "cpu") and is_smoke_test(model, "cuda") and is_smoke_test(model, "auto")


@pytest.mark.parametrize(
    "model",
    ["Qwen/Qwen2.5-7B-Instruct", "runs/train/nat/export/model", "/models/smollm2-135m-instruct-nat", "llama"],
)
def test_other_models_are_measurements(model):
    assert not is_smoke_test(model, "cpu") and not is_smoke_test(model, "cuda")


def test_a_tuned_row_is_outside_noise_only_when_it_clears_every_base_row():
    """The base asked two ways (0-shot like the tuned model, 1-shot at its best): a tuned cell is
    unmarked only when its interval lies outside both, so a win over the weaker base is not enough."""
    zero = summarize(_rows("gsm8k", "math", 0, [F] * 20, [F] * 20))  # [0.0, 16.1]
    one = summarize(_rows("gsm8k", "math", 0, [T] * 8 + [F] * 12, [T] * 8 + [F] * 12))  # [21.9, 61.3]
    tuned = summarize(_rows("gsm8k", "math", 0, [T] * 12 + [F] * 8, [T] * 12 + [F] * 8))  # [38.7, 78.1]
    best = summarize(_rows("gsm8k", "math", 0, [T] * 20, [T] * 20))  # [83.9, 100.0]
    text = format_comparison({"base-0shot": zero, "base-1shot": one, "nat": tuned, "nat_failure": best})
    assert "| nat | 60.0 ± 0.0 [38.7, 78.1] n=20 (paper 60.0) ~ |" in text  # clears base-0shot only
    assert "| nat_failure | 100.0 ± 0.0 [83.9, 100.0] n=20 (paper 100.0) |" in text
    assert "| base-1shot | 40.0 ± 0.0 [21.9, 61.3] n=20 (paper 40.0) |" in text  # bases are not marked
    assert "within noise of a base row (base-0shot, base-1shot)" in text


def test_the_format_table_separates_unparseable_episodes_from_wrong_answers():
    rows = _rows("gsm8k", "math", 0, [T, F, F, F], [T, F, F, F])
    for row in rows[2:]:
        row[columns.FAILURE_REASON] = "parse_error"
    text = format_comparison({"base": summarize(rows)})
    assert "## Format: episodes whose every action parsed, %" in text
    assert "| base | 50 [15.0, 85.0] n=4, 2.00 turns |" in text
