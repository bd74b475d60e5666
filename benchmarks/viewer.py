"""Benchmark of ``nat-ray view`` on a big run (issue 28): does a million trajectories open at once?

Run from the repository root (a few minutes, about 1 GB of disk under --dir)::

    .venv/bin/python benchmarks/viewer.py      # writes benchmarks/results/viewer.json

It writes a synthetic loop-like run (``rounds/<r>/eval/trajectories/part-<k>.parquet``, the trajectory
schema, three tasks, two-turn trajectories whose thoughts are ~170 characters of varied words, a third
of them failures) of ``--rows`` trajectories, then
asks the viewer's app, in this process (Starlette's test client: the whole request path without the
network), for the pages a person opens first: the list of everything, a page filtered by source, task
and outcome, and a text search over questions, answers and turns. Each is timed cold (first request)
and warm (the median of three more). Goals (warm): the pages under 2 s, the search under 10 s.

The baseline, side by side: what reading a run means without the viewer, pandas loading every part
(``pandas.read_parquet`` of the run's files) and filtering in memory, timed once on the same files.
``first_page_over_pandas`` = the viewer's warm first page / that load.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from datetime import datetime
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/viewer.py` from the repo root
    sys.path.insert(0, str(ROOT))

from machine_info import machine  # noqa: E402 - beside this script

log = logging.getLogger("benchmarks.viewer")

RESULTS = ROOT / "benchmarks" / "results" / "viewer.json"
TASKS = ("word_math", "gsm8k", "svamp")
ROUNDS = 5
PARTS_PER_ROUND = 4
GOALS = {"first_page_s": 2.0, "filtered_page_s": 2.0, "text_search_s": 10.0}


@lru_cache(maxsize=1)
def thought_pool(size: int = 100_000, words: int = 25) -> list[str]:
    """Distinct sentences of seeded random words (~170 characters): turns as long and varied as a
    small model's thoughts, so the text search reads as many bytes as on a real run."""
    import numpy as np

    rng = np.random.default_rng(0)
    vocab = [f"w{k:04d}{'xyz'[k % 3]}" for k in range(3000)]
    picks = rng.integers(0, len(vocab), size=(size, words))
    return [" ".join(vocab[j] for j in row) for row in picks.tolist()]


def synthetic_part(start: int, n: int, round_: int):
    """``n`` trajectory rows (ids ``start ..``) as an Arrow table in the trajectory schema."""
    import numpy as np
    import pyarrow as pa

    from nat_ray.core import nat_data as col
    from nat_ray.core.records import arrow_schema

    schema = arrow_schema()
    idx = np.arange(start, start + n)
    a, b = idx % 97 + 2, idx % 89 + 3
    correct = (idx % 3) != 0
    answer = np.where(correct, a * b, a * b + 1)
    # One row in 50,000 answers "zebra": what the text search looks for.
    answers = ["zebra" if i % 50_000 == 7 else str(v) for i, v in zip(idx.tolist(), answer.tolist())]
    questions = [
        f"A shop sells {x} boxes of {y} pens. How many pens?" for x, y in zip(a.tolist(), b.tolist())
    ]
    pool = thought_pool()
    contents = []
    for i, x, y, ans in zip(idx.tolist(), a.tolist(), b.tolist(), answers):
        first, second = pool[i % len(pool)], pool[(i * 31 + 7) % len(pool)]
        contents += [f"Thought: {first}\nAction: calculate[{x}*{y}]", f"Observation: {x * y}",
                     f"Thought: {second}\nAction: finish[{ans}]", "Observation: Episode finished"]  # fmt: skip
    roles = ["assistant", "user"] * (2 * n)
    message = schema.field(col.TRAJECTORY).type
    turns = pa.ListArray.from_arrays(
        pa.array(np.arange(0, 4 * n + 1, 4), pa.int32()),
        pa.StructArray.from_arrays([pa.array(roles), pa.array(contents)], names=["role", "content"]),
        type=message,
    )
    prompt = pa.ListArray.from_arrays(
        pa.array(np.arange(0, n + 1), pa.int32()),
        pa.StructArray.from_arrays(
            [pa.array(["user"] * n), pa.array([f"Question: {q}" for q in questions])],
            names=["role", "content"],
        ),
        type=message,
    )
    columns = {
        col.TRAJECTORY_ID: pa.array([f"r{round_}-t{i}" for i in idx.tolist()]),
        col.TASK: pa.array([TASKS[(i // 7) % len(TASKS)] for i in idx.tolist()]),
        col.FAMILY: pa.array(["math"] * n),
        col.QUESTION_ID: pa.array([f"q{i % 200_000}" for i in idx.tolist()]),
        col.QUESTION: pa.array(questions),
        col.GOLD: pa.array([str(v) for v in (a * b).tolist()]),
        col.PROMPT: prompt,
        col.TRAJECTORY: turns,
        col.TURNS: pa.array(np.full(n, 2)),
        col.ANSWER: pa.array(answers),
        col.FINISHED: pa.array(np.ones(n, bool)),
        col.CORRECT_PAPER: pa.array(correct),
        col.CORRECT_ROBUST: pa.array(correct),
        col.NAT_CLASS: pa.array(np.where(correct, "correct", "incorrect")),
        col.FAILURE_REASON: pa.array([None if c else "wrong_answer" for c in correct.tolist()], pa.string()),
    }
    arrays = [columns.get(f.name, pa.nulls(n, f.type)) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def write_run(folder: Path, rows: int) -> float:
    """The synthetic run under ``folder`` (kept when it already has ``rows``); seconds it took."""
    import pyarrow.parquet as pq

    marker = folder / "rows.txt"
    if marker.is_file() and marker.read_text().strip() == str(rows):
        return 0.0
    began = time.time()
    per_part = rows // (ROUNDS * PARTS_PER_ROUND)
    start = 0
    for r in range(ROUNDS):
        part_dir = folder / "rounds" / str(r) / "eval" / "trajectories"
        part_dir.mkdir(parents=True, exist_ok=True)
        for k in range(PARTS_PER_ROUND):
            pq.write_table(
                synthetic_part(start, per_part, r), part_dir / f"part-{k}.parquet", row_group_size=50_000
            )
            start += per_part
            log.info("wrote %d of %d rows", start, rows)
    marker.write_text(str(rows))
    return time.time() - began


def timed(client, url: str) -> dict:
    """Cold (first) and warm (median of three more) seconds of one page, and what it counted."""
    seconds = []
    for _ in range(4):
        began = time.perf_counter()
        response = client.get(url)
        seconds.append(time.perf_counter() - began)
        response.raise_for_status()
    count = response.text.split('<p id="count">', 1)[1].split(" ", 1)[0]
    return {
        "url": url,
        "cold_s": round(seconds[0], 3),
        "warm_s": round(statistics.median(seconds[1:]), 3),
        "count": int(count),
    }


def pandas_baseline(folder: Path) -> dict:
    """Load every part with pandas and filter one source's failures of one task: the way without a viewer."""
    import pandas as pd

    began = time.perf_counter()
    files = sorted(folder.glob("rounds/*/eval/trajectories/*.parquet"))
    frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    loaded = time.perf_counter() - began
    began = time.perf_counter()
    hits = frame[
        (frame["task"] == "gsm8k") & (~frame["correct_robust"]) & frame["trajectory_id"].str.startswith("r2-")
    ]
    return {
        "load_s": round(loaded, 3),
        "filter_s": round(time.perf_counter() - began, 3),
        "count": len(hits),
        "rows": len(frame),
    }


def main() -> int:
    from starlette.testclient import TestClient

    from nat_ray.view.app import create_app
    from nat_ray.view.runs import open_run

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="trajectories in the synthetic run")
    parser.add_argument(
        "--dir", type=Path, default=Path("runs/viewer-benchmark"), help="where the run is written"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    began = time.time()
    write_seconds = write_run(args.dir, args.rows)
    opened = time.perf_counter()
    run = open_run(args.dir)
    open_seconds = time.perf_counter() - opened
    client = TestClient(create_app(run))
    source = next(s.key for s in run.sources if s.label == "rounds/2/eval")
    pages = {
        "first_page": timed(client, "/trajectories"),
        "filtered_page": timed(client, f"/trajectories?source={source}&task=gsm8k&outcome=incorrect"),
        "text_search": timed(client, "/trajectories?q=zebra"),
    }
    baseline = pandas_baseline(args.dir)
    result = {
        "benchmark": "nat-ray view on a big run: page times, warm and cold (nat_ray.view, Starlette test client)",
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "rows": run.rows,
        "sources": len(run.sources),
        "write_run_s": round(write_seconds, 1),
        "open_run_s": round(open_seconds, 3),
        "pages": pages,
        "goals_warm_s": GOALS,
        "meets_goals": {
            "first_page": pages["first_page"]["warm_s"] < GOALS["first_page_s"],
            "filtered_page": pages["filtered_page"]["warm_s"] < GOALS["filtered_page_s"],
            "text_search": pages["text_search"]["warm_s"] < GOALS["text_search_s"],
        },
        "pandas_baseline": baseline,
        "first_page_over_pandas": round(pages["first_page"]["warm_s"] / baseline["load_s"], 4),
        "filtered_count_matches_pandas": pages["filtered_page"]["count"] == baseline["count"],
        "seconds": round(time.time() - began, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {k: result[k] for k in ("rows", "pages", "meets_goals", "first_page_over_pandas")}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
