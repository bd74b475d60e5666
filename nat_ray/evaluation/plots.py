"""Plots of evaluation results, written whole (a reader never opens half a PNG)."""

from __future__ import annotations

from pathlib import Path

from nat_ray import safe_files
from nat_ray.evaluation.results_table import round_score


def plot_accuracy(base: dict | None, rounds: list[dict], out: Path) -> Path | None:
    """``accuracy_by_round.png``: robust and paper accuracy per round, Wilson 95% bars per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rounds if r.get("summary")]
    if not scored:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    xs = [r["round"] for r in scored]
    tasks = sorted({t for r in scored for t in r["summary"]["tasks"]})
    for task in tasks:
        points = [
            (r["round"], r["summary"]["tasks"][task]["acc_robust"])
            for r in scored
            if task in r["summary"]["tasks"]
        ]
        ys = [s["mean"] for _, s in points]
        lows = [s["mean"] - s.get("wilson95", [s["mean"]])[0] for _, s in points]
        highs = [s.get("wilson95", [0, s["mean"]])[1] - s["mean"] for _, s in points]
        ax.errorbar(
            [x for x, _ in points],
            ys,
            yerr=[lows, highs],
            marker="o",
            capsize=3,
            alpha=0.6,
            label=f"{task} (robust, 95% Wilson)",
        )
    for metric, style in (("robust", "-"), ("paper", "--")):
        ys = [round_score(r["summary"], metric) for r in scored]
        ax.plot(xs, ys, style, color="black", linewidth=2, label=f"mean of tasks ({metric})")
        if base is not None and round_score(base["summary"], metric) is not None:
            ax.axhline(
                round_score(base["summary"], metric),
                linestyle=style,
                color="grey",
                linewidth=1,
                label=f"base ({metric})",
            )
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (%)")
    ax.set_xticks(xs)
    ax.set_ylim(-2, 102)
    ax.set_title("NAT loop: test accuracy by round")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with safe_files.staged_file(out) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out
