"""``nat_ray.core.records``: trajectory ids, config hashes, verdicts, and the Parquet row format."""

from __future__ import annotations

import hashlib
import json
import re

import pyarrow.parquet as pq
import pytest

from nat_ray.core import nat_data as columns
from nat_ray.core import records
from nat_ray.core.react import Action, Episode, Step
from nat_ray.core.scoring import Score

# ---------------------------------------------------------------------------------------------------
# Ids and hashes


def test_trajectory_id_is_pinned():
    # Resuming a rollout keys on these ids: a change here orphans every part already written.
    tid = records.trajectory_id("m", "gsm8k", "q1", 0.5, 0, 0)
    key = json.dumps(["m", "gsm8k", "q1", 0.5, 0, 0])  # '["m", "gsm8k", "q1", 0.5, 0, 0]'
    assert tid == hashlib.sha256(key.encode()).hexdigest()[:24] == "b112d1a7eaab7ac27af4e251"


def test_trajectory_id_normalises_types():
    # A question id read back from Parquet is a string; a temperature from YAML may be an int.
    assert records.trajectory_id("m", "svamp", 7, 1, 2, 3) == records.trajectory_id(
        "m", "svamp", "7", 1.0, 2, 3
    )


def test_trajectory_id_differs_in_every_field():
    base = ("m", "gsm8k", "q1", 0.5, 0, 0)
    variants = [
        ("m2", "gsm8k", "q1", 0.5, 0, 0),
        ("m", "svamp", "q1", 0.5, 0, 0),
        ("m", "gsm8k", "q2", 0.5, 0, 0),
        ("m", "gsm8k", "q1", 0.9, 0, 0),
        ("m", "gsm8k", "q1", 0.5, 1, 0),
        ("m", "gsm8k", "q1", 0.5, 0, 1),
    ]
    ids = {records.trajectory_id(*args) for args in [base, *variants]}
    assert len(ids) == 7
    assert all(re.fullmatch(r"[0-9a-f]{24}", i) for i in ids)


def test_trajectory_id_fields_do_not_run_together():
    # JSON keeps the fields apart: ("ab", "c") and ("a", "bc") are different trajectories.
    assert records.trajectory_id("ab", "c", "q", 0, 0, 0) != records.trajectory_id("a", "bc", "q", 0, 0, 0)


def test_config_hash_ignores_key_order_at_every_level():
    a = {"engine": {"model": "m", "max_model_len": 2048}, "temperatures": [0.5, 0.9]}
    b = {"temperatures": [0.5, 0.9], "engine": {"max_model_len": 2048, "model": "m"}}
    assert records.config_hash(a) == records.config_hash(b)
    assert (
        records.config_hash({"a": 1, "b": [1, 2]}) == "e6f20bdc3757e5e7"
    )  # pinned: provenance stays comparable


def test_config_hash_sees_values_and_list_order():
    base = records.config_hash({"t": [0.5, 0.9]})
    assert records.config_hash({"t": [0.9, 0.5]}) != base
    assert records.config_hash({"t": [0.5, 1.0]}) != base


def test_config_hash_accepts_non_json_values():
    from pathlib import Path

    # default=str: a Path hashes like its string.
    assert records.config_hash({"p": Path("/a/b")}) == records.config_hash({"p": "/a/b"})


# ---------------------------------------------------------------------------------------------------
# Gold answers and verdicts


@pytest.mark.parametrize(("gold", "text"), [(True, "yes"), (False, "no"), ("42", "42"), ("Paris", "Paris")])
def test_gold_text(gold, text):
    assert records.gold_text(gold) == text


@pytest.mark.parametrize(
    ("f1", "cls"),
    [(0.0, "totally_incorrect"), (0.25, "mostly_incorrect"), (0.4, "mostly_correct"), (1.0, "correct")],
)
def test_verdict_class_hotpotqa_goes_by_f1(f1, cls):
    # The paper's four classes; the booleans do not matter when there is an F1.
    assert records.verdict_class("hotpotqa", Score(False, False, em=False, f1=f1)) == cls


@pytest.mark.parametrize("family", ["math", "strategyqa", "hotpotqa"])
def test_verdict_class_without_f1_goes_by_the_robust_verdict(family):
    assert records.verdict_class(family, Score(correct_paper=False, correct_robust=True)) == "correct"
    assert records.verdict_class(family, Score(correct_paper=True, correct_robust=False)) == "incorrect"


def test_verdict_class_ignores_f1_outside_hotpotqa():
    assert records.verdict_class("math", Score(True, True, f1=0.0)) == "correct"


# ---------------------------------------------------------------------------------------------------
# Rows


def make_row(i: int = 0, **overrides) -> dict:
    """A StrategyQA row of a two-turn episode: search, then finish."""
    prompt = [
        {"role": "system", "content": "Answer yes or no."},
        {"role": "user", "content": f"Question {i}?"},
    ]
    episode = Episode(
        id=f"t{i}",
        prompt=prompt,
        tools=("search",),
        steps=[
            Step("Thought: look it up.\nAction: search[x]", Action("search", "x"), " #1: X: y", None, 10, 4),
            Step("Action: finish[yes]", Action("finish", "yes"), None, None, 20, 3),
        ],
        answer="yes",
        finished=True,
    )
    fields = dict(
        task="strategyqa",
        family="strategyqa",
        question_id=i,
        question=f"Question {i}?",
        gold=True,
        score=Score(correct_paper=True, correct_robust=True),
        temperature=0.5,
        sample_index=1,
        seed=3,
        model="m",
        engine="vllm",
        config_hash="c0ffee",
        started_at="2025-01-01T00:00:00.000+00:00",
        ended_at="2025-01-01T00:00:05.000+00:00",
    )
    return records.episode_row(episode, **{**fields, **overrides})


def test_episode_row_columns_are_the_schema_in_order():
    assert list(make_row()) == [f.name for f in records.arrow_schema()]
    assert records.arrow_schema().metadata == {b"nat_ray_schema": str(records.SCHEMA_VERSION).encode()}


def test_episode_row_values():
    row = make_row(7)
    assert row[columns.TRAJECTORY_ID] == "t7" and row[columns.QUESTION_ID] == "7"  # ids are strings
    assert row[columns.GOLD] == "yes" and row[columns.ANSWER] == "yes" and row[columns.FINISHED] is True
    assert row[columns.TRAJECTORY] == [
        {"role": "assistant", "content": "Thought: look it up.\nAction: search[x]"},
        {"role": "user", "content": "Observation:  #1: X: y"},
        {"role": "assistant", "content": "Action: finish[yes]"},
    ]
    assert row[columns.PROMPT][1] == {"role": "user", "content": "Question 7?"}
    assert (row[columns.TURNS], row[columns.PROMPT_TOKENS], row[columns.COMPLETION_TOKENS]) == (2, 30, 7)
    assert (
        row[columns.CORRECT_PAPER],
        row[columns.CORRECT_ROBUST],
        row[columns.F1],
        row[columns.NAT_CLASS],
    ) == (
        True,
        True,
        None,
        "correct",
    )
    assert row[columns.FAILURE_REASON] is None
    assert (row[columns.TEMPERATURE], row[columns.SAMPLE_INDEX], row[columns.SEED]) == (0.5, 1, 3)
    assert row[columns.ENDED_AT] == "2025-01-01T00:00:05.000+00:00"


def test_episode_row_stamps_the_end_when_none_is_given():
    ended = make_row(ended_at=None)[columns.ENDED_AT]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", ended)


def test_write_then_read_round_trip(tmp_path):
    rows = [make_row(0), make_row(1, score=Score(False, False), gold=False)]
    path = tmp_path / "part-0.parquet"
    records.write_rows(rows, path)
    assert records.read_rows(path) == rows
    assert [p.name for p in tmp_path.iterdir()] == ["part-0.parquet"]  # no temp file left behind
    schema = pq.read_schema(path)
    assert schema.equals(records.arrow_schema()) and schema.metadata == records.arrow_schema().metadata


def test_missing_columns_are_written_as_nulls(tmp_path):
    partial = {columns.TRAJECTORY_ID: "only-id", columns.TASK: "gsm8k"}
    records.write_rows([partial], tmp_path / "p.parquet")
    (row,) = records.read_rows(tmp_path / "p.parquet")
    assert (
        row[columns.TRAJECTORY_ID] == "only-id"
        and row[columns.ANSWER] is None
        and row[columns.TRAJECTORY] is None
    )
    assert list(row) == [f.name for f in records.arrow_schema()]


def test_empty_list_writes_a_file_with_the_schema(tmp_path):
    path = tmp_path / "empty.parquet"
    records.write_rows([], path)
    assert records.read_rows(path) == []
    assert pq.read_schema(path).names == [f.name for f in records.arrow_schema()]


def test_a_folder_of_parts_reads_in_file_order_first_of_each_id(tmp_path):
    records.write_rows([make_row(2), make_row(0)], tmp_path / "b.parquet")
    records.write_rows([make_row(1), make_row(2, model="other")], tmp_path / "a.parquet")
    records.write_rows([], tmp_path / "c.parquet")
    (tmp_path / "notes.txt").write_text("not a part")
    rows = records.read_rows(tmp_path)
    assert [r[columns.TRAJECTORY_ID] for r in rows] == ["t1", "t2", "t0"]  # a.parquet, then b.parquet
    assert rows[1][columns.MODEL] == "other"  # t2 from a.parquet; b.parquet's copy is skipped


def test_an_empty_folder_has_no_rows(tmp_path):
    assert records.read_rows(tmp_path) == []


# ---------------------------------------------------------------------------------------------------
# Lineage (schema version 2)


def test_lineage_columns_default_to_null_and_take_a_tasks_lineage():
    row = make_row()
    assert (row[columns.TASK_SOURCE], row[columns.TASK_HASH], row[columns.TOOL_VERSIONS]) == (
        None,
        None,
        None,
    )
    lineage = {
        "task_source": "/t/metric.yaml",
        "task_hash": "0123456789abcdef",
        "tool_versions": {"z": "2", "a": "1"},
    }
    row = make_row(**lineage)
    assert row[columns.TASK_SOURCE] == "/t/metric.yaml" and row[columns.TASK_HASH] == "0123456789abcdef"
    assert row[columns.TOOL_VERSIONS] == '{"a": "1", "z": "2"}'  # JSON text, keys sorted
    assert list(row)[-6:-3] == ["task_source", "task_hash", "tool_versions"]


def test_version_1_files_without_lineage_columns_still_read(tmp_path):
    import pyarrow as pa

    lineage = {columns.TASK_SOURCE, columns.TASK_HASH, columns.TOOL_VERSIONS}
    v1 = pa.schema(
        [f for f in records.arrow_schema() if f.name not in lineage], metadata={"nat_ray_schema": "1"}
    )
    old = {k: v for k, v in make_row(0).items() if k not in lineage}
    pq.write_table(pa.Table.from_pylist([old], schema=v1), tmp_path / "a-v1.parquet")
    records.write_rows(
        [make_row(1, task_source="/t.yaml", task_hash="h", tool_versions={})], tmp_path / "b.parquet"
    )
    first, second = records.read_rows(tmp_path)
    assert list(first) == list(second) == [f.name for f in records.arrow_schema()]
    assert first == {**old, columns.TASK_SOURCE: None, columns.TASK_HASH: None, columns.TOOL_VERSIONS: None}
    assert second[columns.TASK_SOURCE] == "/t.yaml" and second[columns.TOOL_VERSIONS] == "{}"


# ---------------------------------------------------------------------------------------------------
# Token-exact turns (schema version 3)


def _episode_with_ids() -> Episode:
    return Episode(
        id="ids",
        prompt=[{"role": "user", "content": "Q?"}],
        tools=("search",),
        steps=[
            Step("Action: search[x]", Action("search", "x"), "y", None, 3, 2, [1, 2, 3], [40, 41]),
            Step(
                "Action: finish[yes]", Action("finish", "yes"), None, None, 6, 2, [1, 2, 3, 9, 9, 9], [50, 2]
            ),
        ],
        answer="yes",
        finished=True,
    )


def test_token_ids_are_stored_per_turn_and_round_trip_as_int32(tmp_path):
    row = records.episode_row(
        _episode_with_ids(),
        task="strategyqa",
        family="strategyqa",
        question_id="q",
        question="Q?",
        gold=True,
        score=Score(True, True),
        temperature=0.0,
        sample_index=0,
        seed=0,
        model="m",
        engine="vllm",
        config_hash="c",
        started_at="2025-01-01T00:00:00.000+00:00",
    )
    assert records.SCHEMA_VERSION == 4
    assert row[columns.TURN_PROMPT_IDS] == [[1, 2, 3], [1, 2, 3, 9, 9, 9]]
    assert row[columns.TURN_COMPLETION_IDS] == [[40, 41], [50, 2]]
    records.write_rows([row, make_row(1)], tmp_path / "p.parquet")
    schema = pq.read_schema(tmp_path / "p.parquet")
    import pyarrow as pa

    assert schema.field(columns.TURN_COMPLETION_IDS).type.equals(pa.list_(pa.list_(pa.int32())))
    back, no_ids = records.read_rows(tmp_path / "p.parquet")
    assert back == row
    # An engine without ids (HTTP, imported text) stores nulls, not empty lists.
    assert no_ids[columns.TURN_PROMPT_IDS] is None and no_ids[columns.TURN_COMPLETION_IDS] is None


def test_id_columns_must_come_together_one_list_per_turn():
    with pytest.raises(ValueError, match="one list per turn"):
        make_row(turn_prompt_ids=[[1]], turn_completion_ids=None)
    with pytest.raises(ValueError, match="one list per turn"):
        make_row(turn_prompt_ids=[[1], [2]], turn_completion_ids=[[3]])


def test_version_2_files_without_id_columns_still_read(tmp_path):
    import pyarrow as pa

    ids = {columns.TURN_PROMPT_IDS, columns.TURN_COMPLETION_IDS}
    v2 = pa.schema([f for f in records.arrow_schema() if f.name not in ids], metadata={"nat_ray_schema": "2"})
    old = {k: v for k, v in make_row(0).items() if k not in ids}
    pq.write_table(pa.Table.from_pylist([old], schema=v2), tmp_path / "a-v2.parquet")
    (row,) = records.read_rows(tmp_path)
    assert list(row) == [f.name for f in records.arrow_schema()]
    assert row == {**old, columns.TURN_PROMPT_IDS: None, columns.TURN_COMPLETION_IDS: None}


def test_a_writers_temporary_file_is_never_read_as_data(tmp_path):
    """A driver killed between writing a part and renaming it leaves ``.part-…tmp….parquet`` behind (and
    a damaged part is set aside as ``_corrupt-…``): readers, resume and training data skip both."""
    from nat_ray.rollout.run import done_ids
    from nat_ray.train.data import trajectory_files

    parts = tmp_path / "trajectories"
    records.write_rows([make_row(0)], parts / "part-1.parquet")
    records.write_rows([make_row(1)], parts / ".part-2.tmp77.1.parquet")  # whole, but never renamed
    records.write_rows([make_row(2)], parts / "_corrupt-part-3.parquet")
    assert records.part_files(parts) == [parts / "part-1.parquet"]
    assert [r[columns.TRAJECTORY_ID] for r in records.read_rows(parts)] == [
        make_row(0)[columns.TRAJECTORY_ID]
    ]
    assert done_ids(tmp_path) == {make_row(0)[columns.TRAJECTORY_ID]}
    assert trajectory_files([str(parts)]) == [str(parts / "part-1.parquet")]
