"""One trajectory = one Parquet row. Rollout, evaluation and ``import-nat`` all write rows made here.

Column names are the constants of :mod:`nat_ray.nat_data`. Messages are stored as Arrow lists of
``{role, content}`` structs, gold answers as strings (StrategyQA's booleans as ``yes``/``no``), so
one schema holds every task.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

from nat_ray import nat_data as nd
from nat_ray.react import Episode
from nat_ray.scoring import Score, nat_class

SCHEMA_VERSION = 1


def trajectory_id(
    model: str, task: str, question_id: str, temperature: float, sample_index: int, seed: int
) -> str:
    """Deterministic id: the same (model, task, question, temperature, sample, seed) is the same trajectory."""
    key = json.dumps([model, task, str(question_id), float(temperature), int(sample_index), int(seed)])
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def config_hash(config: dict) -> str:
    """Short stable hash of a config mapping (for provenance; resuming keys on trajectory ids)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def gold_text(gold: str | bool) -> str:
    return ("yes" if gold else "no") if isinstance(gold, bool) else str(gold)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def verdict_class(family: str, score: Score) -> str:
    """The NAT-k class of a scored trajectory: F1 classes for HotpotQA, correct/incorrect otherwise."""
    if family == "hotpotqa" and score.f1 is not None:
        return nat_class(score.f1, "four-class")
    return "correct" if score.correct_robust else "incorrect"


def _messages(turns: list[dict]) -> list[dict]:
    return [{"role": str(t["role"]), "content": str(t["content"])} for t in turns]


def episode_row(
    episode: Episode,
    *,
    task: str,
    family: str,
    question_id: str,
    question: str,
    gold: str | bool,
    score: Score,
    temperature: float,
    sample_index: int,
    seed: int,
    model: str,
    engine: str,
    config_hash: str,
    started_at: str,
    ended_at: str | None = None,
) -> dict:
    """The Parquet row of one finished (or failed) episode."""
    return {
        nd.TRAJECTORY_ID: episode.id,
        nd.TASK: task,
        nd.FAMILY: family,
        nd.QUESTION_ID: str(question_id),
        nd.QUESTION: question,
        nd.GOLD: gold_text(gold),
        nd.TEMPERATURE: float(temperature),
        nd.SAMPLE_INDEX: int(sample_index),
        nd.SEED: int(seed),
        nd.PROMPT: _messages(episode.prompt),
        nd.TRAJECTORY: _messages(episode.trajectory()),
        nd.TURNS: episode.turns,
        nd.ANSWER: episode.answer,
        nd.FINISHED: episode.finished,
        nd.CORRECT_PAPER: bool(score.correct_paper),
        nd.CORRECT_ROBUST: bool(score.correct_robust),
        nd.F1: None if score.f1 is None else float(score.f1),
        nd.NAT_CLASS: verdict_class(family, score),
        nd.FAILURE_REASON: episode.failure_reason,
        nd.PROMPT_TOKENS: episode.prompt_tokens,
        nd.COMPLETION_TOKENS: episode.completion_tokens,
        nd.MODEL: model,
        nd.ENGINE: engine,
        nd.CONFIG_HASH: config_hash,
        nd.STARTED_AT: started_at,
        nd.ENDED_AT: ended_at or now_iso(),
    }


def arrow_schema():
    """The Arrow schema of trajectory files (pyarrow imported lazily: the core stays light)."""
    import pyarrow as pa

    message = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    return pa.schema(
        [
            (nd.TRAJECTORY_ID, pa.string()),
            (nd.TASK, pa.string()),
            (nd.FAMILY, pa.string()),
            (nd.QUESTION_ID, pa.string()),
            (nd.QUESTION, pa.string()),
            (nd.GOLD, pa.string()),
            (nd.TEMPERATURE, pa.float64()),
            (nd.SAMPLE_INDEX, pa.int64()),
            (nd.SEED, pa.int64()),
            (nd.PROMPT, message),
            (nd.TRAJECTORY, message),
            (nd.TURNS, pa.int64()),
            (nd.ANSWER, pa.string()),
            (nd.FINISHED, pa.bool_()),
            (nd.CORRECT_PAPER, pa.bool_()),
            (nd.CORRECT_ROBUST, pa.bool_()),
            (nd.F1, pa.float64()),
            (nd.NAT_CLASS, pa.string()),
            (nd.FAILURE_REASON, pa.string()),
            (nd.PROMPT_TOKENS, pa.int64()),
            (nd.COMPLETION_TOKENS, pa.int64()),
            (nd.MODEL, pa.string()),
            (nd.ENGINE, pa.string()),
            (nd.CONFIG_HASH, pa.string()),
            (nd.STARTED_AT, pa.string()),
            (nd.ENDED_AT, pa.string()),
        ],
        metadata={"nat_ray_schema": str(SCHEMA_VERSION)},
    )


def write_rows(rows: list[dict], path) -> None:
    """Write rows as one Parquet file with the trajectory schema (atomic: temp file, then rename)."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=arrow_schema())
    path = os.fspath(path)
    # A dot-name: readers skip it, so a half-written file is never mistaken for data.
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_rows(path) -> list[dict]:
    """All rows of a trajectory Parquet file, or of the ``*.parquet`` files in a folder (first of each id)."""
    from pathlib import Path

    import pyarrow.parquet as pq

    path = Path(path)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    seen: set[str] = set()
    rows = []
    for file in files:
        for row in pq.read_table(file).to_pylist():
            if row[nd.TRAJECTORY_ID] not in seen:
                seen.add(row[nd.TRAJECTORY_ID])
                rows.append(row)
    return rows
