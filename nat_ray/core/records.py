"""One trajectory = one Parquet row. Rollout, evaluation and ``import-nat`` all write rows made here.

Column names are the constants of :mod:`nat_ray.core.nat_data`. Messages are stored as Arrow lists of
``{role, content}`` structs, gold answers as strings (StrategyQA's booleans as ``yes``/``no``), so
one schema holds every task.

Schema versions (the file's ``nat_ray_schema`` metadata): 1, the first; 2 adds the lineage columns
``task_source`` (the task file's path), ``task_hash`` (its sha256, 16 hex digits) and
``tool_versions`` (JSON text of ``{tool name: version}``); 3 adds the token-exact turns
``turn_prompt_ids`` and ``turn_completion_ids`` (one list of int32 token ids per agent turn: the
prompt the engine read and the completion it sampled; ``None`` for engines that give no ids, such as
HTTP teachers and imported text); 4 adds ``token_drift``, the turns whose next prompt did not
continue with the ids they sampled (:func:`nat_ray.core.masks.turn_drift`; ``None`` where unchecked).
:func:`read_rows` reads every version, giving an older row ``None`` in the columns it lacks.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

from nat_ray import safe_files
from nat_ray.core import nat_data as columns
from nat_ray.core.masks import turn_drift
from nat_ray.core.react import Episode
from nat_ray.core.scoring import Score, gold_text, nat_class

SCHEMA_VERSION = 4


def trajectory_id(
    model: str, task: str, question_id: str, temperature: float, sample_index: int, seed: int
) -> str:
    """Deterministic id: the same (model, task, question, temperature, sample, seed) is the same trajectory."""
    key = json.dumps([model, task, str(question_id), float(temperature), int(sample_index), int(seed)])
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def config_hash(config: dict) -> str:
    """Short stable hash of a config mapping (for provenance; resuming keys on trajectory ids)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def verdict_class(family: str, score: Score) -> str:
    """The NAT-k class of a scored trajectory: F1 classes for HotpotQA, correct/incorrect otherwise."""
    if family == "hotpotqa" and score.f1 is not None:
        return nat_class(score.f1, "four-class")
    return "correct" if score.correct_robust else "incorrect"


def _messages(turns: list[dict]) -> list[dict]:
    return [{"role": str(t["role"]), "content": str(t["content"])} for t in turns]


def trajectory_row(
    *,
    trajectory_id: str,
    prompt: list[dict],
    trajectory: list[dict],
    turns: int,
    answer: str | None,
    finished: bool,
    failure_reason: str | None,
    prompt_tokens: int,
    completion_tokens: int,
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
    task_source: str | None = None,
    task_hash: str | None = None,
    tool_versions: dict[str, str] | None = None,
    turn_prompt_ids: list[list[int]] | None = None,
    turn_completion_ids: list[list[int]] | None = None,
    token_drift: int | None = None,
) -> dict:
    """The Parquet row of one trajectory, every column of :func:`arrow_schema` named once.

    The lineage fields (``task_source``, ``task_hash``, ``tool_versions``) are what
    :meth:`nat_ray.tasks.Task.lineage` returns; ``tool_versions`` is stored as JSON text.
    ``turn_prompt_ids`` / ``turn_completion_ids`` hold one id list per agent turn, or ``None``.

    Raises:
        ValueError: only one of the id columns is given, or they differ in length.
    """
    if (turn_prompt_ids is None) != (turn_completion_ids is None) or (
        turn_prompt_ids is not None and len(turn_prompt_ids) != len(turn_completion_ids or [])
    ):
        raise ValueError("turn_prompt_ids and turn_completion_ids must both be given, one list per turn")
    return {
        columns.TRAJECTORY_ID: trajectory_id,
        columns.TASK: task,
        columns.FAMILY: family,
        columns.QUESTION_ID: str(question_id),
        columns.QUESTION: question,
        columns.GOLD: gold_text(gold),
        columns.TEMPERATURE: float(temperature),
        columns.SAMPLE_INDEX: int(sample_index),
        columns.SEED: int(seed),
        columns.PROMPT: _messages(prompt),
        columns.TRAJECTORY: _messages(trajectory),
        columns.TURNS: turns,
        columns.ANSWER: answer,
        columns.FINISHED: finished,
        columns.CORRECT_PAPER: bool(score.correct_paper),
        columns.CORRECT_ROBUST: bool(score.correct_robust),
        columns.F1: None if score.f1 is None else float(score.f1),
        columns.NAT_CLASS: verdict_class(family, score),
        columns.FAILURE_REASON: failure_reason,
        columns.PROMPT_TOKENS: prompt_tokens,
        columns.COMPLETION_TOKENS: completion_tokens,
        columns.MODEL: model,
        columns.ENGINE: engine,
        columns.CONFIG_HASH: config_hash,
        columns.STARTED_AT: started_at,
        columns.ENDED_AT: ended_at or now_iso(),
        columns.TASK_SOURCE: task_source,
        columns.TASK_HASH: task_hash,
        columns.TOOL_VERSIONS: None if tool_versions is None else json.dumps(tool_versions, sort_keys=True),
        columns.TURN_PROMPT_IDS: _id_lists(turn_prompt_ids),
        columns.TURN_COMPLETION_IDS: _id_lists(turn_completion_ids),
        columns.TOKEN_DRIFT: token_drift,
    }


def _id_lists(lists: list[list[int]] | None) -> list[list[int]] | None:
    return None if lists is None else [[int(i) for i in ids] for ids in lists]


def episode_drift(episode: Episode, tokenizer=None) -> int | None:
    """The episode's turns whose next prompt did not continue with the ids they sampled
    (:func:`nat_ray.core.masks.turn_drift`); ``None`` without a tokenizer or engine ids."""
    ids = episode.turn_token_ids()
    if ids is None or tokenizer is None:
        return None
    return turn_drift(tokenizer, ids[0], ids[1], [step.text for step in episode.steps])


def episode_row(episode: Episode, tokenizer=None, **fields) -> dict:
    """The Parquet row of one finished (or failed) episode; ``fields`` as :func:`trajectory_row`'s.

    With the engine's ``tokenizer`` and stored ids, the row also counts the episode's token drift.
    """
    ids = episode.turn_token_ids()
    drift = episode_drift(episode, tokenizer)
    fields = {
        "turn_prompt_ids": None if ids is None else ids[0],
        "turn_completion_ids": None if ids is None else ids[1],
        "token_drift": drift,
        **fields,
    }
    return trajectory_row(
        trajectory_id=episode.id,
        prompt=episode.prompt,
        trajectory=episode.trajectory(),
        turns=episode.turns,
        answer=episode.answer,
        finished=episode.finished,
        failure_reason=episode.failure_reason,
        prompt_tokens=episode.prompt_tokens,
        completion_tokens=episode.completion_tokens,
        **fields,
    )


def arrow_schema():
    """The Arrow schema of trajectory files (pyarrow imported lazily: the core stays light)."""
    import pyarrow as pa

    message = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    id_lists = pa.list_(pa.list_(pa.int32()))
    return pa.schema(
        [
            (columns.TRAJECTORY_ID, pa.string()),
            (columns.TASK, pa.string()),
            (columns.FAMILY, pa.string()),
            (columns.QUESTION_ID, pa.string()),
            (columns.QUESTION, pa.string()),
            (columns.GOLD, pa.string()),
            (columns.TEMPERATURE, pa.float64()),
            (columns.SAMPLE_INDEX, pa.int64()),
            (columns.SEED, pa.int64()),
            (columns.PROMPT, message),
            (columns.TRAJECTORY, message),
            (columns.TURNS, pa.int64()),
            (columns.ANSWER, pa.string()),
            (columns.FINISHED, pa.bool_()),
            (columns.CORRECT_PAPER, pa.bool_()),
            (columns.CORRECT_ROBUST, pa.bool_()),
            (columns.F1, pa.float64()),
            (columns.NAT_CLASS, pa.string()),
            (columns.FAILURE_REASON, pa.string()),
            (columns.PROMPT_TOKENS, pa.int64()),
            (columns.COMPLETION_TOKENS, pa.int64()),
            (columns.MODEL, pa.string()),
            (columns.ENGINE, pa.string()),
            (columns.CONFIG_HASH, pa.string()),
            (columns.STARTED_AT, pa.string()),
            (columns.ENDED_AT, pa.string()),
            (columns.TASK_SOURCE, pa.string()),
            (columns.TASK_HASH, pa.string()),
            (columns.TOOL_VERSIONS, pa.string()),
            (columns.TURN_PROMPT_IDS, id_lists),
            (columns.TURN_COMPLETION_IDS, id_lists),
            (columns.TOKEN_DRIFT, pa.int64()),
        ],
        metadata={"nat_ray_schema": str(SCHEMA_VERSION)},
    )


def write_rows(rows: list[dict], path, store=None) -> None:
    """Write rows as one Parquet file with the trajectory schema, whole or not at all (its temporary
    file is a dot-name, which readers skip, so a half-written file is never mistaken for data).

    With ``store`` (:class:`nat_ray.core.storage.Store`), ``path`` is a name inside it (a bucket too).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=arrow_schema())
    if store is not None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        store.write_bytes(str(path), sink.getvalue().to_pybytes())
        return
    with safe_files.staged_file(path) as tmp:
        pq.write_table(table, tmp)


def is_part(name: str) -> bool:
    """Whether a file name is a whole Parquet part: a writer's temporary file is a dot-name (and a set-aside
    damaged one starts with ``_``), and pathlib's glob matches those too."""
    return name.endswith(".parquet") and not name.startswith((".", "_"))


def part_files(folder) -> list:
    """The whole Parquet files of a folder (:func:`is_part`), sorted."""
    from pathlib import Path

    return sorted(f for f in Path(folder).glob("*.parquet") if is_part(f.name))


def read_rows(path, store=None) -> list[dict]:
    """All rows of a trajectory Parquet file, or of the ``*.parquet`` files in a folder (first of each id).

    With ``store`` (:class:`nat_ray.core.storage.Store`), ``path`` is a name inside it.
    """
    from pathlib import Path

    import pyarrow.parquet as pq

    if store is not None:
        rel = str(path)
        if store.is_file(rel):
            names = [rel]
        else:
            names = [n for n in store.files(rel) if is_part(n.rsplit("/", 1)[-1])]
        tables = (pq.read_table(store.open_input(name)) for name in names)
    else:
        path = Path(path)
        tables = (pq.read_table(file) for file in (part_files(path) if path.is_dir() else [path]))
    names = arrow_schema().names
    seen: set[str] = set()
    rows = []
    for table in tables:
        for row in table.to_pylist():
            if row[columns.TRAJECTORY_ID] not in seen:
                seen.add(row[columns.TRAJECTORY_ID])
                # Older schema versions lack the newer columns: every row gets every column.
                rows.append({name: row.get(name) for name in names} | row)
    return rows
