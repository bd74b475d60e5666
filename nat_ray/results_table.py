"""Accuracy tables from trajectory rows: per-seed metrics, mean ± std over seeds, Markdown.

The evaluation's tables have the paper's layout (spec §7); the pipeline's compares models side by
side. Pure: rows in (the :mod:`nat_ray.records` schema), numbers and text out.
"""

from __future__ import annotations

import collections
import statistics
from collections.abc import Sequence

from nat_ray import nat_data as columns
from nat_ray.tasks import TASKS


def in_table_order(names) -> list[str]:
    """Task names in the paper's column order (the registry's), any others after them, sorted."""
    names = set(names)
    return [t for t in TASKS if t in names] + sorted(names - TASKS.keys())


def task_title(name: str) -> str:
    """The name a table prints for a task (``GSM8K``), or the name itself for an unregistered one."""
    return TASKS[name].title if name in TASKS else name


def seed_metrics(rows: Sequence[dict]) -> list[dict]:
    """One record per (task, seed): accuracy in percent (paper and robust), HotpotQA EM/F1, finish rate."""
    groups: dict[tuple[str, int], list[dict]] = collections.defaultdict(list)
    for row in rows:
        groups[(row[columns.TASK], row[columns.SEED])].append(row)
    out = []
    for (task, seed), group in sorted(groups.items()):
        n = len(group)
        record = {
            "task": task,
            "family": group[0][columns.FAMILY],
            "seed": seed,
            "count": n,
            "acc_paper": 100.0 * sum(r[columns.CORRECT_PAPER] for r in group) / n,
            "acc_robust": 100.0 * sum(r[columns.CORRECT_ROBUST] for r in group) / n,
            "finished": 100.0 * sum(r[columns.FINISHED] for r in group) / n,
            "mean_turns": sum(r[columns.TURNS] for r in group) / n,
            "failures": dict(
                collections.Counter(
                    r[columns.FAILURE_REASON] for r in group if r[columns.FAILURE_REASON]
                ).most_common()
            ),
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


def summarize(rows: Sequence[dict]) -> dict:
    """Mean ± std over seeds per task and metric, and the math average (spec §6).

    The math average is computed per seed as the unweighted mean of the math datasets' accuracies
    (Tables 2, 3 and 7), then averaged over seeds.

    Returns:
        ``{"tasks": {task: {...}}, "math_average": {...} | None}``.
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
        tasks[task] = {
            "family": recs[0]["family"],
            "seeds": [r["seed"] for r in recs],
            "questions": recs[0]["count"],
            "trajectories": sum(r["count"] for r in recs),
            "failures": dict(failures.most_common()),
            **{m: mean_std([r[m] for r in recs]) for m in metrics},
        }
    math_tasks = [t for t in in_table_order(tasks) if tasks[t]["family"] == "math"]
    math_average = None
    if math_tasks:
        seeds = sorted(set.intersection(*(set(tasks[t]["seeds"]) for t in math_tasks)))
        per = {(r["task"], r["seed"]): r for r in per_seed}
        math_average = {
            "tasks": math_tasks,
            **{
                mode: mean_std([statistics.fmean(per[(t, s)][mode] for t in math_tasks) for s in seeds])
                for mode in ("acc_paper", "acc_robust")
            },
        }
    return {"tasks": tasks, "math_average": math_average}


def _cell(stat: dict) -> str:
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}"


def format_eval_results(summary: dict, header: dict) -> str:
    """Markdown tables shaped like the paper's (spec §7), paper and robust scoring side by side."""
    tasks = summary["tasks"]
    lines = ["# NAT evaluation", ""]
    lines += [f"- **{k}**: {v}" for k, v in header.items()]
    lines += ["", "Cells are mean ± std over seeds (sample std; 0 with one seed), in percent.", ""]
    math = summary["math_average"]
    if math is not None:
        cols = math["tasks"]
        names = [task_title(t) for t in cols]
        avg = "Avg" if len(cols) == 4 else f"Avg ({len(cols)} of 4)"
        lines += ["## Math (accuracy %; Table 2 layout)", ""]
        lines += ["| Scoring | " + " | ".join([*names, avg]) + " |", "|---" * (len(cols) + 2) + "|"]
        for mode, label in (("acc_paper", "paper"), ("acc_robust", "robust")):
            cells = [_cell(tasks[t][mode]) for t in cols] + [_cell(math[mode])]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    if "hotpotqa" in tasks:
        t = tasks["hotpotqa"]
        lines += ["## HotpotQA (EM and F1 ×100; Table 5 layout)", ""]
        lines += ["| Scoring | EM | F1 |", "|---|---|---|"]
        lines.append(f"| paper = robust | {_cell(t['em'])} | {_cell(t['f1'])} |")
        lines += ["", "EM compares normalised answers, so the paper's and the robust verdicts coincide.", ""]
    if "strategyqa" in tasks:
        t = tasks["strategyqa"]
        lines += ["## StrategyQA (accuracy %; Table 6 layout)", ""]
        lines += ["| Scoring | Accuracy |", "|---|---|"]
        lines.append(f"| paper | {_cell(t['acc_paper'])} |")
        lines.append(f"| robust | {_cell(t['acc_robust'])} |")
        lines.append("")
    lines += ["## Per task", ""]
    lines += [
        "| Task | Questions | Seeds | Acc. paper | Acc. robust | Finished % | Turns | Failures |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in in_table_order(tasks):
        t = tasks[name]
        failures = ", ".join(f"{k} {v}" for k, v in t["failures"].items()) or "-"
        lines.append(
            f"| {task_title(name)} | {t['questions']} | {len(t['seeds'])} | {_cell(t['acc_paper'])} | "
            f"{_cell(t['acc_robust'])} | {_cell(t['finished'])} | {t['mean_turns']['mean']:.2f} | {failures} |"
        )
    return "\n".join(lines) + "\n"


def format_comparison(results: dict[str, dict]) -> str:
    """One Markdown table: a row per model, a column per task (robust accuracy, paper in brackets).

    Args:
        results: model label -> its :func:`summarize` output (``tasks`` and ``math_average``).
    """
    tasks = in_table_order(t for r in results.values() for t in r["tasks"])
    header = "| Model | " + " | ".join(tasks) + " | Math avg |"
    lines = [
        "# NAT pipeline results",
        "",
        "Accuracy % (HotpotQA: EM), mean over seeds: robust scoring, the paper's exact rule in brackets.",
        "",
        header,
        "|---" * (len(tasks) + 2) + "|",
    ]
    for label, summary in results.items():
        cells = []
        for t in tasks:
            stats = summary["tasks"].get(t)
            cells.append(
                "-"
                if stats is None
                else f"{stats['acc_robust']['mean']:.1f} ({stats['acc_paper']['mean']:.1f})"
            )
        avg = summary.get("math_average")
        cells.append("-" if not avg else f"{avg['acc_robust']['mean']:.1f} ({avg['acc_paper']['mean']:.1f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summarize_rollout(rows: Sequence[dict]) -> list[dict]:
    """Per task x temperature: count, accuracy (paper and robust), failure reasons."""
    groups: dict[tuple, list[dict]] = collections.defaultdict(list)
    for row in rows:
        groups[(row[columns.TASK], row[columns.TEMPERATURE])].append(row)
    table = []
    for (task, temperature), group in sorted(groups.items()):
        n = len(group)
        reasons = collections.Counter(r[columns.FAILURE_REASON] for r in group if r[columns.FAILURE_REASON])
        table.append(
            {
                "task": task,
                "temperature": temperature,
                "count": n,
                "acc_paper": sum(r[columns.CORRECT_PAPER] for r in group) / n,
                "acc_robust": sum(r[columns.CORRECT_ROBUST] for r in group) / n,
                "finished": sum(r[columns.FINISHED] for r in group) / n,
                "mean_turns": sum(r[columns.TURNS] for r in group) / n,
                "failures": dict(reasons.most_common()),
            }
        )
    return table


def format_rollout_summary(table: list[dict]) -> str:
    """The rollout's table as plain text for the terminal (fractions as percentages)."""
    lines = [
        f"{'task':12s} {'temp':>5s} {'count':>6s} {'acc(paper)':>10s} {'acc(robust)':>11s} {'finished':>8s} "
        f"{'turns':>5s}  failures"
    ]
    for r in table:
        failures = ", ".join(f"{k}={v}" for k, v in r["failures"].items()) or "-"
        lines.append(
            f"{r['task']:12s} {r['temperature']:5.2f} {r['count']:6d} {r['acc_paper']:10.1%} {r['acc_robust']:11.1%} "
            f"{r['finished']:8.1%} {r['mean_turns']:5.2f}  {failures}"
        )
    return "\n".join(lines)
