"""Accuracy tables from trajectory rows: per-seed metrics, mean ± std over seeds, intervals, Markdown.

The evaluation's tables have the paper's layout (spec §7); the pipeline's compares models side by
side. Every cell gives n (trajectories over all seeds) and a 95% interval: Wilson for an accuracy,
and with two or more seeds also the t interval of the mean over seeds. A table from the tiny
default model says at its top that it is a smoke test of the machinery (:func:`is_smoke_test`).
Pure: rows in (the :mod:`nat_ray.core.records` schema), numbers and text out.
"""

from __future__ import annotations

import collections
import math
import statistics
from collections.abc import Sequence

from nat_ray.core import nat_data as columns
from nat_ray.models import EMBEDDED, EMBEDDED_ALIASES
from nat_ray.tasks import TASKS

SMOKE_TEST_BANNER = (
    "> **Smoke test, not a measurement.** The model is the tiny CPU default (SmolLM2-135M-Instruct): "
    "this table tests the machinery (rollout, training, evaluation), not the method. "
    "Its numbers are no evidence for or against NAT's effect."
)

# Two-sided 95% critical values of Student's t for df = 1..30 (any statistics table).
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
_Z95 = 1.959964  # the normal quantile the t values tend to

# Metrics that are a share of trajectories (a Wilson interval applies), and seed_metrics' count of
# the successes behind each; f1 and mean_turns are no share.
_SUCCESSES = {
    "acc_paper": "correct_paper",
    "acc_robust": "correct_robust",
    "finished": "finished_count",
    "em": "correct_paper",  # EM is the paper's verdict on HotpotQA
}
# Metrics in percent, whose seed interval is clipped to [0, 100]; mean_turns is not.
_PERCENTS = ("acc_paper", "acc_robust", "finished", "em", "f1")


def round_score(summary: dict, metric: str) -> float | None:
    """The accuracy a model (a loop's round) is judged by: the mean over its tasks of ``acc_<metric>`` (percent)."""
    values = [t[f"acc_{metric}"]["mean"] for t in summary.get("tasks", {}).values() if f"acc_{metric}" in t]
    return statistics.fmean(values) if values else None


def is_smoke_test(model: str | None, device: str) -> bool:
    """Whether a table from ``model`` only tests the machinery: the model is the embedded tiny default.

    Pure string logic, nothing is loaded. The embedded SmolLM2-135M-Instruct is named ``None``, ``""``,
    an alias of :data:`nat_ray.models.EMBEDDED_ALIASES`, its converted copy in the model cache
    (``.../smollm2-135m-instruct``) or its hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``).

    Args:
        model: the engine config's ``model`` (or what :func:`nat_ray.models.resolve_model` made of it).
        device: the engine config's ``device``. It does not change the answer: the 135M model is as
            tiny on a GPU, and a real model on a CPU is slow but still measures the method.
    """
    del device  # see the docstring: the model alone decides
    if not model or model.strip().lower() in EMBEDDED_ALIASES:
        return True
    name = model.strip().replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return name.lower() == EMBEDDED


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion, as fractions; ``(0.0, 1.0)`` when ``n == 0``.

    Unlike the Wald interval p ± z·sqrt(p(1-p)/n) it stays inside [0, 1] and has width at 0/n and n/n.

    Args:
        successes: correct trajectories, 0 <= successes <= n.
        n: trajectories.
        z: the normal quantile (1.96 for 95%).

    Raises:
        ValueError: successes outside [0, n].
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return (0.0, 1.0)
    return _wilson(successes / n, n, z)


def _wilson(p: float, n: float, z: float = 1.96) -> tuple[float, float]:
    # n may be an effective (non-integer) size, see summarize's math average.
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return (max(0.0, center - half), min(1.0, center + half))


def t95(df: int) -> float:
    """Two-sided 95% critical value of Student's t with ``df`` degrees of freedom (df >= 1).

    df 1..30 from the table; above it the Cornish-Fisher expansion, within 0.001 of the exact value.
    """
    if df < 1:
        raise ValueError(f"t needs df >= 1, got {df}")
    if df <= len(_T95):
        return _T95[df - 1]
    z = _Z95
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df * df)


def mean_interval(values: Sequence[float]) -> tuple[float, float] | None:
    """95% t interval of the mean of ``values`` (one per seed): mean ± t(n-1)·s/√n; None for under 2."""
    values = list(values)
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    half = t95(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return (mean - half, mean + half)


def in_table_order(names) -> list[str]:
    """Task names in the paper's column order (the registry's), any others after them, sorted."""
    names = set(names)
    return [t for t in TASKS if t in names] + sorted(names - TASKS.keys())


def task_title(name: str) -> str:
    """The name a table prints for a task (``GSM8K``), or the name itself for an unregistered one."""
    return TASKS[name].title if name in TASKS else name


def drift_counts(rows: Sequence[dict]) -> dict[str, int]:
    """``token_drift``: turns whose next prompt did not continue with their sampled ids, summed over
    ``drift_checked`` episodes (those with engine ids; see :func:`nat_ray.core.masks.turn_drift`)."""
    checked = [r[columns.TOKEN_DRIFT] for r in rows if r.get(columns.TOKEN_DRIFT) is not None]
    return {"token_drift": int(sum(checked)), "drift_checked": len(checked)}


def seed_metrics(rows: Sequence[dict]) -> list[dict]:
    """One record per (task, seed): accuracy in percent (paper and robust), HotpotQA EM/F1, finish rate.

    Also the counts behind the percentages: ``count`` trajectories, ``correct_paper``,
    ``correct_robust`` and ``finished_count`` of them.
    """
    groups: dict[tuple[str, int], list[dict]] = collections.defaultdict(list)
    for row in rows:
        groups[(row[columns.TASK], row[columns.SEED])].append(row)
    out = []
    for (task, seed), group in sorted(groups.items()):
        n = len(group)
        correct_paper = sum(bool(r[columns.CORRECT_PAPER]) for r in group)
        correct_robust = sum(bool(r[columns.CORRECT_ROBUST]) for r in group)
        finished = sum(bool(r[columns.FINISHED]) for r in group)
        record = {
            "task": task,
            "family": group[0][columns.FAMILY],
            "seed": seed,
            "count": n,
            "correct_paper": correct_paper,
            "correct_robust": correct_robust,
            "finished_count": finished,
            "acc_paper": 100.0 * correct_paper / n,
            "acc_robust": 100.0 * correct_robust / n,
            "finished": 100.0 * finished / n,
            "mean_turns": sum(r[columns.TURNS] for r in group) / n,
            "failures": dict(
                collections.Counter(
                    r[columns.FAILURE_REASON] for r in group if r[columns.FAILURE_REASON]
                ).most_common()
            ),
            **drift_counts(group),
        }
        if record["family"] == "hotpotqa":
            # EM is already normalised, so it is the paper's and the robust verdict at once.
            record["em"] = record["acc_paper"]
            record["f1"] = 100.0 * sum(r[columns.F1] or 0.0 for r in group) / n
        out.append(record)
    return out


def mean_std(values: Sequence[float]) -> dict:
    """``{"mean", "std", "values"}``; std is the sample standard deviation (0 for a single seed)."""
    values = list(values)
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def _seed_ci(values: Sequence[float], percent: bool) -> list[float] | None:
    ci = mean_interval(values)
    if ci is None:
        return None
    lo, hi = ci
    return [max(0.0, lo), min(100.0, hi)] if percent else [lo, hi]


def summarize(rows: Sequence[dict]) -> dict:
    """Mean ± std over seeds per task and metric, intervals, and the math average (spec §6).

    Each metric is :func:`mean_std` plus ``n`` (trajectories over all seeds), ``seed_ci95`` (the 95%
    t interval of the mean over seeds, in the metric's unit, clipped to [0, 100] for percentages;
    None with one seed) and, for a share of trajectories (accuracies, EM, finished), ``successes``
    and ``wilson95``: the Wilson 95% interval in percent of the share pooled over all seeds. Seeds
    repeat the same questions, so the pooled Wilson interval is too narrow when seeds agree; the
    seed interval is the check on that.

    The math average is computed per seed as the unweighted mean of the math datasets' accuracies
    (Tables 2, 3 and 7), then averaged over seeds. Its Wilson interval takes the effective size
    k² / Σ 1/nᵢ of its k datasets (nᵢ trajectories each), which is the pooled n when they are the
    same size and otherwise matches the variance of an unweighted mean of proportions.

    Returns:
        ``{"tasks": {task: {...}}, "math_average": {...} | None}``; a task also has ``n``,
        ``correct_paper`` and ``correct_robust`` (counts over all seeds), the math average ``n``
        (trajectories of its datasets over the common seeds) and ``n_effective``.
    """
    per_seed = seed_metrics(rows)
    by_task: dict[str, list[dict]] = collections.defaultdict(list)
    for record in per_seed:
        by_task[record["task"]].append(record)
    tasks = {}
    for task, recs in by_task.items():
        metrics = ["acc_paper", "acc_robust", "finished", "mean_turns"]
        if recs[0]["family"] == "hotpotqa":
            metrics += ["em", "f1"]
        failures: collections.Counter = collections.Counter()
        for r in recs:
            failures.update(r["failures"])
        n = sum(r["count"] for r in recs)
        stats = {}
        for m in metrics:
            stat = mean_std([r[m] for r in recs])
            stat["n"] = n
            stat["seed_ci95"] = _seed_ci(stat["values"], percent=m in _PERCENTS)
            if m in _SUCCESSES:
                successes = sum(r[_SUCCESSES[m]] for r in recs)
                lo, hi = wilson_interval(successes, n)
                stat["successes"] = successes
                stat["wilson95"] = [100.0 * lo, 100.0 * hi]
            stats[m] = stat
        tasks[task] = {
            "family": recs[0]["family"],
            "seeds": [r["seed"] for r in recs],
            "questions": recs[0]["count"],
            "trajectories": n,
            "n": n,
            "correct_paper": sum(r["correct_paper"] for r in recs),
            "correct_robust": sum(r["correct_robust"] for r in recs),
            "failures": dict(failures.most_common()),
            "token_drift": sum(r.get("token_drift", 0) for r in recs),
            "drift_checked": sum(r.get("drift_checked", 0) for r in recs),
            **stats,
        }
    math_tasks = [t for t in in_table_order(tasks) if tasks[t]["family"] == "math"]
    math_average = None
    if math_tasks:
        seeds = sorted(set.intersection(*(set(tasks[t]["seeds"]) for t in math_tasks)))
        per = {(r["task"], r["seed"]): r for r in per_seed}
        sizes = [sum(per[(t, s)]["count"] for s in seeds) for t in math_tasks]
        n_total = sum(sizes)
        n_effective = len(sizes) ** 2 / sum(1 / size for size in sizes)
        math_average = {"tasks": math_tasks, "n": n_total, "n_effective": n_effective}
        for mode in ("acc_paper", "acc_robust"):
            stat = mean_std([statistics.fmean(per[(t, s)][mode] for t in math_tasks) for s in seeds])
            lo, hi = _wilson(stat["mean"] / 100.0, n_effective)
            stat.update(
                n=n_total, seed_ci95=_seed_ci(stat["values"], percent=True), wilson95=[100 * lo, 100 * hi]
            )
            math_average[mode] = stat
            key = _SUCCESSES[mode]
            math_average[key] = sum(per[(t, s)][key] for t in math_tasks for s in seeds)
    return {"tasks": tasks, "math_average": math_average}


def _interval(pair: Sequence[float] | None) -> str:
    return "-" if pair is None else f"[{pair[0]:.1f}, {pair[1]:.1f}]"


def _cell(stat: dict) -> str:
    """``mean ± std [Wilson 95%] n=N`` for a share; ``mean ± std n=N`` for another metric."""
    wilson = f" {_interval(stat['wilson95'])}" if "wilson95" in stat else ""
    return f"{stat['mean']:.1f} ± {stat['std']:.1f}{wilson} n={stat['n']}"


def _seed_cell(stat: dict) -> str:
    """The t interval of the mean over seeds and how many seeds, or ``-`` with one."""
    if stat["seed_ci95"] is None:
        return "-"
    return f"{_interval(stat['seed_ci95'])} ({len(stat['values'])} seeds)"


def _has_seed_ci(stats: Sequence[dict]) -> bool:
    return any(s["seed_ci95"] is not None for s in stats)


_CELL_NOTE = (
    "Cell: mean ± std over seeds (sample std, 0 with one seed) [95% Wilson interval of the share "
    "pooled over all seeds] n = trajectories over all seeds; in percent."
)
_SEED_NOTE = "Row *seeds*: the 95% t interval of the mean over seeds (2+ seeds)."


def format_eval_results(summary: dict, header: dict, smoke_test: bool = False) -> str:
    """Markdown tables shaped like the paper's (spec §7), paper and robust scoring side by side.

    Args:
        summary: :func:`summarize`'s output.
        header: settings listed above the tables.
        smoke_test: the model is the tiny default (:func:`is_smoke_test`): say so at the top.
    """
    tasks = summary["tasks"]
    lines = [SMOKE_TEST_BANNER, ""] if smoke_test else []
    lines += ["# NAT evaluation", ""]
    lines += [f"- **{k}**: {v}" for k, v in header.items()]
    lines += [
        "",
        "Seeds repeat the same questions, so the pooled Wilson interval is too narrow when seeds agree; "
        "the t interval over seeds (2+ seeds) is the check on that.",
        "",
    ]
    math = summary["math_average"]
    if math is not None:
        cols = math["tasks"]
        names = [task_title(t) for t in cols]
        avg = "Avg" if len(cols) == 4 else f"Avg ({len(cols)} of 4)"
        lines += ["## Math (accuracy %; Table 2 layout)", ""]
        lines += ["| Scoring | " + " | ".join([*names, avg]) + " |", "|---" * (len(cols) + 2) + "|"]
        modes = (("acc_paper", "paper"), ("acc_robust", "robust"))
        for mode, label in modes:
            cells = [_cell(tasks[t][mode]) for t in cols] + [_cell(math[mode])]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        seeded = _has_seed_ci([tasks[t][m] for t in cols for m, _ in modes])
        if seeded:
            for mode, label in modes:
                cells = [_seed_cell(tasks[t][mode]) for t in cols] + [_seed_cell(math[mode])]
                lines.append(f"| {label}, seeds | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"{_CELL_NOTE} Avg: the Wilson interval at the effective n = k²/Σ(1/nᵢ) of its k datasets "
            f"(n={math['n']}, effective {math['n_effective']:.1f})." + (f" {_SEED_NOTE}" if seeded else ""),
            "",
        ]
    if "hotpotqa" in tasks:
        t = tasks["hotpotqa"]
        lines += ["## HotpotQA (EM and F1 ×100; Table 5 layout)", ""]
        lines += ["| Scoring | EM | F1 |", "|---|---|---|"]
        lines.append(f"| paper = robust | {_cell(t['em'])} | {_cell(t['f1'])} |")
        seeded = _has_seed_ci([t["em"], t["f1"]])
        if seeded:
            lines.append(f"| seeds | {_seed_cell(t['em'])} | {_seed_cell(t['f1'])} |")
        lines += [
            "",
            f"{_CELL_NOTE} F1 is no share of trajectories, so it has no Wilson interval."
            + (f" {_SEED_NOTE}" if seeded else ""),
            "EM compares normalised answers, so the paper's and the robust verdicts coincide.",
            "",
        ]
    if "strategyqa" in tasks:
        t = tasks["strategyqa"]
        lines += ["## StrategyQA (accuracy %; Table 6 layout)", ""]
        lines += ["| Scoring | Accuracy |", "|---|---|"]
        lines.append(f"| paper | {_cell(t['acc_paper'])} |")
        lines.append(f"| robust | {_cell(t['acc_robust'])} |")
        seeded = _has_seed_ci([t["acc_paper"], t["acc_robust"]])
        if seeded:
            lines.append(f"| paper, seeds | {_seed_cell(t['acc_paper'])} |")
            lines.append(f"| robust, seeds | {_seed_cell(t['acc_robust'])} |")
        lines += ["", _CELL_NOTE + (f" {_SEED_NOTE}" if seeded else ""), ""]
    lines += ["## Per task", ""]
    lines += [
        "| Task | Questions | Seeds | Acc. paper | Acc. robust | Robust, seeds | Finished % | Turns | Failures |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in in_table_order(tasks):
        t = tasks[name]
        failures = ", ".join(f"{k} {v}" for k, v in t["failures"].items()) or "-"
        lines.append(
            f"| {task_title(name)} | {t['questions']} | {len(t['seeds'])} | {_cell(t['acc_paper'])} | "
            f"{_cell(t['acc_robust'])} | {_seed_cell(t['acc_robust'])} | {_cell(t['finished'])} | "
            f"{t['mean_turns']['mean']:.2f} | {failures} |"
        )
    lines += [
        "",
        f"{_CELL_NOTE} *Robust, seeds*: the 95% t interval of the mean robust accuracy over seeds "
        "(- with one seed). Turns: mean per trajectory.",
    ]
    return "\n".join(lines) + "\n"


def _overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def _format_table(results: dict[str, dict], tasks: list[str]) -> list[str]:
    """Did each model write actions the agent could run? Parsed % separates learning the ReAct format
    from learning the task: a base asked without a demonstration may fail on format alone."""
    lines = [
        "",
        "## Format: episodes whose every action parsed, %",
        "",
        "| Model | " + " | ".join(tasks) + " |",
        "|---" * (len(tasks) + 1) + "|",
    ]
    for label, summary in results.items():
        cells = []
        for task in tasks:
            stat = summary["tasks"].get(task)
            if stat is None or not stat.get("n") or "mean_turns" not in stat:  # absent, or stored before
                cells.append("-")
                continue
            n = stat["n"]
            parsed = n - stat.get("failures", {}).get("parse_error", 0)
            lo, hi = wilson_interval(parsed, n)
            turns = stat["mean_turns"]["mean"]
            cells.append(f"{100 * parsed / n:.0f} [{100 * lo:.1f}, {100 * hi:.1f}] n={n}, {turns:.2f} turns")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Cell: parsed % [95% Wilson interval] and mean turns per episode."]
    return lines


def format_comparison(results: dict[str, dict], smoke_test: bool = False) -> str:
    """One Markdown table: a row per model, a column per task (robust accuracy, the paper's after it).

    A cell is ``mean ± std [Wilson 95%] n=N (paper P)``. ``~`` marks a tuned model's difference from
    a base row (``base``, or ``base-0shot`` and ``base-1shot``; else the first row) that lies within
    noise: the robust Wilson intervals overlap. That check is
    conservative (non-overlapping 95% intervals differ at about p < 0.01), so an unmarked cell is a
    difference worth a second look, and a marked one is none. With two or more seeds a second table
    gives the t interval of the mean over seeds.

    Args:
        results: model label -> its :func:`summarize` output (``tasks`` and ``math_average``).
        smoke_test: the models are the tiny default and its fine-tunes (:func:`is_smoke_test` of the
            base model): say so at the top.
    """
    tasks = in_table_order(t for r in results.values() for t in r["tasks"])
    header = "| Model | " + " | ".join(tasks) + " | Math avg |"
    rule = "|---" * (len(tasks) + 2) + "|"

    def stats_of(summary: dict) -> list[dict | None]:
        avg = summary.get("math_average")
        return [
            *(summary["tasks"][t]["acc_robust"] if t in summary["tasks"] else None for t in tasks),
            avg["acc_robust"] if avg else None,
        ]

    rows = {label: stats_of(summary) for label, summary in results.items()}
    papers = {
        label: [
            *(summary["tasks"][t]["acc_paper"] if t in summary["tasks"] else None for t in tasks),
            summary["math_average"]["acc_paper"] if summary.get("math_average") else None,
        ]
        for label, summary in results.items()
    }
    # The base model's rows (``base``, or ``base-0shot`` and ``base-1shot``); else the first row.
    base_labels = [label for label in results if label.split("-")[0] == "base"] or list(results)[:1]
    lines = [SMOKE_TEST_BANNER, ""] if smoke_test else []
    lines += [
        "# NAT pipeline results",
        "",
        "Robust accuracy % (HotpotQA: EM) per model and task, the paper's exact rule as (paper …).",
        "",
        header,
        rule,
    ]
    for label, stats in rows.items():
        cells = []
        for i, (stat, paper) in enumerate(zip(stats, papers[label])):
            if stat is None:
                cells.append("-")
                continue
            # A summary stored before intervals existed (a resumed run) prints without them.
            wilson = stat.get("wilson95")
            cell = f"{stat['mean']:.1f} ± {stat['std']:.1f}"
            cell += f" {_interval(wilson)} n={stat['n']}" if wilson else ""
            cell += f" (paper {paper['mean']:.1f})"
            bases = [rows[b][i] for b in base_labels if b != label]
            bases = [b["wilson95"] for b in bases if b is not None and b.get("wilson95")]
            if label not in base_labels and wilson and bases:
                cell += " ~" if any(_overlap(wilson, b) for b in bases) else ""
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Cell: mean ± std over seeds [95% Wilson interval of the robust accuracy pooled over all seeds] "
        "n = trajectories over all seeds (paper: the paper's rule, mean over seeds). "
        f"~ : within noise of a base row ({', '.join(base_labels)}), i.e. the Wilson intervals overlap "
        "(a conservative check: non-overlapping 95% intervals differ at about p < 0.01); an unmarked "
        "tuned cell lies outside every base row's interval. Math avg: Wilson at the effective "
        "n = k²/Σ(1/nᵢ) of its k datasets.",
    ]
    lines += _format_table(results, tasks)
    seeded = any(s is not None and s.get("seed_ci95") is not None for stats in rows.values() for s in stats)
    if seeded:
        lines += ["", "## Mean over seeds, 95% t interval (robust accuracy %)", "", header, rule]
        for label, stats in rows.items():
            cells = ["-" if s is None or s.get("seed_ci95") is None else _seed_cell(s) for s in stats]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", "Cell: mean ± t(seeds-1)·s/√seeds, clipped to [0, 100]; - with one seed."]
    return "\n".join(lines) + "\n"


def summarize_rollout(rows: Sequence[dict]) -> list[dict]:
    """Per task x temperature: count, accuracy (paper and robust), failure reasons.

    Fractions, not percent; ``correct_paper`` and ``correct_robust`` count trajectories and
    ``robust_wilson95`` is the Wilson 95% interval ``[lo, hi]`` of the robust accuracy.
    """
    groups: dict[tuple, list[dict]] = collections.defaultdict(list)
    for row in rows:
        groups[(row[columns.TASK], row[columns.TEMPERATURE])].append(row)
    table = []
    for (task, temperature), group in sorted(groups.items()):
        n = len(group)
        reasons = collections.Counter(r[columns.FAILURE_REASON] for r in group if r[columns.FAILURE_REASON])
        correct_paper = sum(bool(r[columns.CORRECT_PAPER]) for r in group)
        correct_robust = sum(bool(r[columns.CORRECT_ROBUST]) for r in group)
        table.append(
            {
                "task": task,
                "temperature": temperature,
                "count": n,
                "correct_paper": correct_paper,
                "correct_robust": correct_robust,
                "acc_paper": correct_paper / n,
                "acc_robust": correct_robust / n,
                "robust_wilson95": list(wilson_interval(correct_robust, n)),
                "finished": sum(r[columns.FINISHED] for r in group) / n,
                "mean_turns": sum(r[columns.TURNS] for r in group) / n,
                "failures": dict(reasons.most_common()),
                **drift_counts(group),
            }
        )
    return table


def format_rollout_summary(table: list[dict], smoke_test: bool = False) -> str:
    """The rollout's table as plain text for the terminal (fractions as percentages).

    Args:
        table: :func:`summarize_rollout`'s output.
        smoke_test: the model is the tiny default (:func:`is_smoke_test`): say so on the first line.
    """
    lines = [SMOKE_TEST_BANNER.removeprefix("> ").replace("**", ""), ""] if smoke_test else []
    lines.append(
        f"{'task':12s} {'temp':>5s} {'n':>6s} {'acc(paper)':>10s} {'acc(robust)':>11s} {'robust 95% CI':>14s} "
        f"{'finished':>8s} {'turns':>5s}  failures"
    )
    for r in table:
        failures = ", ".join(f"{k}={v}" for k, v in r["failures"].items()) or "-"
        lo, hi = r["robust_wilson95"]
        ci = f"[{100 * lo:.1f}, {100 * hi:.1f}]"
        lines.append(
            f"{r['task']:12s} {r['temperature']:5.2f} {r['count']:6d} {r['acc_paper']:10.1%} {r['acc_robust']:11.1%} "
            f"{ci:>14s} {r['finished']:8.1%} {r['mean_turns']:5.2f}  {failures}"
        )
    lines.append("n = trajectories; robust 95% CI: Wilson interval of the robust accuracy, in percent.")
    return "\n".join(lines)
