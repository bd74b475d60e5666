"""Benchmark section ``data_prep`` (issue 19): streamed training-data preparation from 1k to 100k rows.

Synthetic trajectory Parquet (the schema of :mod:`nat_ray.core.records`: GSM8K-style questions, four
trajectories each: one or two positives, negatives with a wrong final answer, some of them exact
duplicates, every few one unfinished), written in files of 5,000 rows, then the real preparation of
``nat-ray train`` (:func:`nat_ray.train.prepare.prepare_data`: selection, the embedded model's
tokenizer, packing to 1,024 tokens, variant ``nat``). Each size runs in its own process with its own
local Ray, so the driver's peak RSS (sampled every 50 ms by a psutil thread) belongs to that size.

``data_prep_flatness`` = seconds per trajectory at the smallest size / at the largest: 1 is
perfectly flat, above 1 means the fixed cost (Ray start-up excluded, task and tokenizer start-up
included) dominates the small size; below 0.77 would mean the per-row cost grows with the data.
``data_prep_marginal_ms_per_row`` leaves the fixed cost out: milliseconds per added trajectory
between consecutive sizes (flat when these are about equal); ``data_prep_marginal_flatness`` = the
first of them over the last (ms per added row from 1k to 10k over from 10k to 100k; goal >= 0.8).
Each size also reports the CPU seconds of its driver and local Ray (``cpu_seconds``, their
``cores_busy``), how many processes Ray started meanwhile, and ``data_prep_marginal_cpu_ms_per_row``
the marginal CPU per row. The CPU counter reads the processes alive at the end of a size, so a Ray
worker that ended before it is missed: a lower bound, not the work done (the run of 2026-12-07 gave
less CPU at 100k rows than at 10k, and a negative marginal).

Imported by ``benchmarks/scale.py``; standalone: ``.venv/bin/python benchmarks/scale_data.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = (1000, 10000, 100000)
PER_QUESTION = 4
FILE_ROWS = 5000
ROWS_LOOK_LIKE = (
    "GSM8K-style ReAct trajectories, 4 per question (1-2 positives, wrong-answer negatives, some exact "
    "duplicates, every 7th unfinished): 2 or 3 agent turns of Thought/Action calculate[...] and "
    "Observation, finish[answer]; about 220 tokens per example with the prompt"
)


def synthetic_row(q: int, k: int) -> dict:
    """Trajectory ``k`` of question ``q``: a short realistic ReAct episode (the rest of the schema null)."""
    from nat_ray.core import nat_data as c

    a, b, d = 2 + q % 17, 3 + q % 13, 1 + q % 5
    product, total = a * b, a * b + d
    correct = k == 0 or (k == 1 and q % 3 == 0)
    answer = total if correct else total + (k if k != 3 or q % 2 else 2)  # k=3 often duplicates k=2
    turns = [
        {
            "role": "assistant",
            "content": f"Thought: There are {a} boxes with {b} pens each, so I multiply first.\n"
            f"Action: calculate[{a} * {b}]",
        },
        {"role": "user", "content": f"Observation: {product}"},
        {
            "role": "assistant",
            "content": f"Thought: Then {d} loose pens are added to the {product}.\nAction: calculate[{product} + {d}]",
        },
        {"role": "user", "content": f"Observation: {total}"},
        {"role": "assistant", "content": f"Thought: I have the total.\nAction: finish[{answer}]"},
        {"role": "user", "content": "Observation: Episode finished"},
    ]
    return {
        c.TRAJECTORY_ID: f"q{q}-s{k}",
        c.TASK: "gsm8k",
        c.FAMILY: "math",
        c.QUESTION_ID: f"q{q}",
        c.QUESTION: f"A shop has {a} boxes of {b} pens and {d} loose pens. How many pens does it have?",
        c.GOLD: str(total),
        c.TEMPERATURE: 0.7,
        c.SAMPLE_INDEX: k,
        c.SEED: 42,
        c.PROMPT: [],
        c.TRAJECTORY: turns,
        c.TURNS: 3,
        c.ANSWER: str(answer),
        c.FINISHED: (q * PER_QUESTION + k) % 7 != 6,
        c.CORRECT_PAPER: correct,
        c.CORRECT_ROBUST: correct,
        c.MODEL: "synthetic",
        c.ENGINE: "synthetic",
    }


def write_data(folder: Path, rows: int) -> None:
    """``rows`` synthetic trajectories as Parquet files of :data:`FILE_ROWS` rows."""
    from nat_ray.core import records

    folder.mkdir(parents=True, exist_ok=True)
    for part, start in enumerate(range(0, rows, FILE_ROWS)):
        batch = [
            synthetic_row(i // PER_QUESTION, i % PER_QUESTION)
            for i in range(start, min(rows, start + FILE_ROWS))
        ]
        records.write_rows(batch, folder / f"part-{part:04d}.parquet")


def tree_cpu_seconds(proc) -> float:
    """CPU seconds (user + system) of ``proc`` and its live descendants, and of the children each reaped.

    A local Ray's processes (GCS, raylet, its workers) descend from the driver that started it. A
    worker that ended between two readings is not always in a live process's reaped-children times
    (measured: less CPU at 100k rows than at 10k), so the difference is a lower bound.
    """
    import psutil

    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def measure_one(rows: int, folder: Path) -> dict:
    """Write ``rows`` trajectories, start Ray, prepare them; seconds, the driver's peak RSS, and the CPU
    seconds and new processes of the driver and its local Ray (where a per-row cost beyond the work goes)."""
    import psutil
    import ray

    from nat_ray.config import TrainConfig
    from nat_ray.models import ensure_embedded
    from nat_ray.ray_runtime import init_ray
    from nat_ray.train.prepare import prepare_data

    write_data(folder, rows)
    model_path = str(ensure_embedded())
    init_ray(2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = TrainConfig(data=[str(folder)], variant="nat", max_length=1024, packing=True)
    me, peak, done = psutil.Process(), [0], threading.Event()
    before = {c.pid for c in me.children(recursive=True)}
    started: set[int] = set()  # processes that appeared during the preparation (Ray workers)

    def sample() -> None:
        ticks = 0
        while not done.is_set():
            peak[0] = max(peak[0], me.memory_info().rss)
            if ticks % 20 == 0:  # every second: scanning /proc costs more than reading one RSS
                started.update(c.pid for c in me.children(recursive=True) if c.pid not in before)
            ticks += 1
            time.sleep(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    rss_before = me.memory_info().rss
    thread.start()
    cpu_before = tree_cpu_seconds(me)
    began = time.perf_counter()
    prepared = prepare_data(cfg, model_path, driver_max_rows=0)  # the streamed path at every size
    seconds = time.perf_counter() - began
    cpu = tree_cpu_seconds(me) - cpu_before
    done.set()
    thread.join()
    s = prepared.stats
    return {
        "trajectories": rows,
        "seconds": round(seconds, 2),
        "seconds_per_row": seconds / rows,
        "examples": s["examples"],
        "rows_out": s["rows"],
        "tokens": s["tokens"],
        "packing_efficiency": s["packing_efficiency"],
        "selection_dropped": s["selection_dropped"],
        "driver_rss_mb_before": round(rss_before / 2**20, 1),
        "driver_peak_rss_mb": round(max(peak[0], rss_before) / 2**20, 1),
        "cpu_seconds": round(cpu, 2),
        "cores_busy": round(cpu / seconds, 2),
        "processes_started": len(started),
    }


def data_prep(args) -> dict:
    """Section ``data_prep``: seconds per trajectory and driver RSS at each size, each in a subprocess."""
    sizes = tuple(getattr(args, "prep_sizes", SIZES))
    per_size = []
    with tempfile.TemporaryDirectory(prefix="nat_ray_scale_data_") as tmp:
        for rows in sizes:
            out = subprocess.run(
                [sys.executable, __file__, "--one", str(rows), str(Path(tmp) / f"rows{rows}")],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=False,
                env={**os.environ, "RAY_DEDUP_LOGS": "1"},
            )
            if out.returncode != 0:
                raise RuntimeError(f"data_prep at {rows} rows failed:\n{out.stderr[-4000:]}")
            per_size.append(json.loads(out.stdout.strip().splitlines()[-1]))
    from scale_stages import marginal_costs, marginal_flatness  # beside this file

    first, last = per_size[0], per_size[-1]
    trajectories = [p["trajectories"] for p in per_size]
    return {
        "rows_look_like": ROWS_LOOK_LIKE,
        "config": "variant nat, max_length 1024, packing, all positives and negatives",
        "sizes": per_size,
        "data_prep_seconds": {str(p["trajectories"]): p["seconds"] for p in per_size},
        "data_prep_rss_mb": {str(p["trajectories"]): p["driver_peak_rss_mb"] for p in per_size},
        "data_prep_flatness": round(first["seconds_per_row"] / last["seconds_per_row"], 3),
        # Without the fixed cost: milliseconds per added trajectory between consecutive sizes, and
        # the first of them over the last (1k->10k over 10k->100k).
        "data_prep_marginal_flatness": marginal_flatness(trajectories, [p["seconds"] for p in per_size]),
        "data_prep_marginal_ms_per_row": [
            round(1000 * c, 3) for c in marginal_costs(trajectories, [p["seconds"] for p in per_size])
        ],
        # The same in CPU seconds of the driver and its local Ray's live processes (a lower bound: see
        # tree_cpu_seconds).
        "data_prep_marginal_cpu_ms_per_row": [
            round(1000 * c, 3) for c in marginal_costs(trajectories, [p["cpu_seconds"] for p in per_size])
        ],
    }


def plot_data_prep(ax, figures) -> None:
    """Milliseconds per trajectory (left axis) and driver peak RSS (right axis) against trajectories."""
    sizes = figures["sizes"]
    x = [p["trajectories"] for p in sizes]
    ax.plot(x, [1000 * p["seconds_per_row"] for p in sizes], "o-", label="ms per trajectory")
    ax.set_xscale("log")
    ax.set_xlabel("trajectories")
    ax.set_ylabel("ms per trajectory")
    ax.set_ylim(bottom=0)
    rss = ax.twinx()
    rss.plot(x, [p["driver_peak_rss_mb"] for p in sizes], "s--", color="tab:orange", label="driver peak RSS")
    rss.set_ylabel("driver peak RSS (MB)")
    rss.set_ylim(bottom=0)
    ax.set_title(
        f"data preparation (flatness {figures['data_prep_flatness']}, "
        f"marginal {figures.get('data_prep_marginal_flatness')})"
    )
    ax.legend(loc="upper left")
    rss.legend(loc="upper right")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(measure_one(int(sys.argv[2]), Path(sys.argv[3]))))
    else:
        import types

        print(json.dumps(data_prep(types.SimpleNamespace()), indent=1))
