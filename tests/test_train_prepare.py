"""The streamed data preparation's pure parts (nat_ray.train.prepare) against the in-memory path."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from rows import math_row  # tests/rows.py

from nat_ray.config import TrainConfig
from nat_ray.core import nat_data
from nat_ray.errors import ConfigError, DataError
from nat_ray.train.data import finalize_examples, select_examples, tokenize_examples
from nat_ray.train.packing import pack_examples
from nat_ray.train.prepare import (
    chunk_rows,
    gather_rows,
    index_batch,
    sample_selection,
    select_in_question,
    trajectory_features,
)


def _rows() -> list[dict]:
    rows = [math_row(i, c) for i in range(4) for c in (True, False)]
    rows.append(math_row(0, True) | {nat_data.TRAJECTORY_ID: "t0-again"})  # a second positive
    rows.append(math_row(1, False) | {nat_data.TRAJECTORY_ID: "t1-dup"})  # same turns as t1-False
    rows.append(math_row(2, False) | {nat_data.TRAJECTORY_ID: "t2-open", nat_data.FINISHED: False})
    empty = math_row(3, False) | {nat_data.TRAJECTORY_ID: "t3-empty"}
    rows.append(empty | {nat_data.TRAJECTORY: empty[nat_data.TRAJECTORY][1:2]})
    return rows


def _statuses(rows: list[dict], drop_unfinished: bool = False) -> pa.Table:
    by_question: dict[str, list[dict]] = {}
    for row in rows:
        by_question.setdefault(row[nat_data.QUESTION_ID], []).append(trajectory_features(row, "robust"))
    out = []
    for feats in by_question.values():
        for f, s in zip(feats, select_in_question(feats, drop_unfinished, False)):
            out.append({"question_id": f["question_id"], "trajectory_id": f["trajectory_id"], "status": s})
    return pa.Table.from_pylist(out[::-1])  # any order: the draw sorts


@pytest.mark.parametrize("drop_unfinished", [False, True])
def test_per_question_selection_matches_select_trajectories(drop_unfinished):
    rows = _rows()
    old = nat_data.select_trajectories(rows, None, None, drop_unfinished_negatives=drop_unfinished)
    statuses = _statuses(rows, drop_unfinished).to_pylist()
    kept = {s["trajectory_id"]: s["status"] for s in statuses if s["status"] in ("positive", "negative")}
    assert kept == {r[nat_data.TRAJECTORY_ID]: "positive" for r in old.positives} | {
        r[nat_data.TRAJECTORY_ID]: "negative" for r in old.negatives
    }
    dropped = {k: sum(s["status"] == k for s in statuses) for k in old.dropped}
    assert dropped == old.dropped


@pytest.mark.parametrize("counts", [(None, None), (2, 3), (4, 1)])
def test_seeded_draw_is_the_one_of_build_examples(counts):
    rows = _rows()
    variant = nat_data.get_variant("nat")
    examples, sel = nat_data.build_examples(rows, variant, *counts, seed=7)
    chosen = sample_selection(_statuses(rows), variant, *counts, seed=7)
    assert chosen.trajectory_ids == [ex.trajectory_id for ex in examples]
    assert (chosen.positives, chosen.negatives, chosen.dropped) == (
        len(sel.positives),
        len(sel.negatives),
        sel.dropped,
    )


def test_draw_errors_match():
    variant = nat_data.get_variant("nat")
    with pytest.raises(DataError, match="asked for 9 positives but the data has only 4"):
        sample_selection(_statuses(_rows()), variant, 9, None, 42)
    positives = [r for r in _rows() if r[nat_data.CORRECT_ROBUST]]
    with pytest.raises(DataError, match="needs negative trajectories"):
        sample_selection(_statuses(positives), variant, None, None, 42)


def test_chunk_rows_are_the_in_memory_rows(tokenizer, embedded_path):
    """One chunk = the whole selection: the same packed rows and counts as prepare_rows' steps."""
    rows = _rows()
    cfg = TrainConfig(data=["x"], max_length=1024, global_batch_size=1, micro_batch_size=1, num_workers=1)
    examples, _ = select_examples(cfg, rows)
    by_id = {r[nat_data.TRAJECTORY_ID]: r for r in rows}
    ordered = [by_id[ex.trajectory_id] for ex in examples]
    packed, counts = chunk_rows(
        ordered, list(range(len(ordered))), "nat", "robust", tokenizer, 1024, "truncate", True
    )
    tokenized = tokenize_examples(examples, embedded_path, 1024)
    kept, cut = finalize_examples(tokenized, examples, "truncate")
    assert packed == pack_examples(kept, 1024)
    assert counts == cut | {"text": len(examples)}


def test_dpo_draw_lays_out_pairs_of_one_question_positive_first_and_reports_them():
    nat = nat_data.get_variant("nat")
    chosen = sample_selection(_statuses(_rows()), nat, None, None, 42, "dpo", pair_seed=7)
    again = sample_selection(_statuses(_rows()), nat, None, None, 42, "dpo", pair_seed=7)
    assert chosen == again  # seeded
    question = {r[nat_data.TRAJECTORY_ID]: r[nat_data.QUESTION_ID] for r in _rows()}
    positive = {r[nat_data.TRAJECTORY_ID]: r[nat_data.CORRECT_ROBUST] for r in _rows()}
    ids = chosen.trajectory_ids
    pairs = list(zip(ids[::2], ids[1::2]))
    assert all(question[w] == question[lo] and positive[w] and not positive[lo] for w, lo in pairs)
    assert chosen.positives == chosen.negatives == chosen.pairs.pairs == len(pairs) == 4
    with pytest.raises(ConfigError, match="selects positives only"):
        sample_selection(_statuses(_rows()), nat_data.get_variant("wo_neg"), None, None, 42, "kto")
    one_sided = [r for r in _rows() if r[nat_data.QUESTION_ID] != "q0" or r[nat_data.CORRECT_ROBUST]]
    one_sided = [r for r in one_sided if r[nat_data.QUESTION_ID] == "q0" or not r[nat_data.CORRECT_ROBUST]]
    with pytest.raises(DataError, match="none of the 4 questions has both"):
        sample_selection(_statuses(one_sided), nat, None, None, 42, "dpo")


def test_preference_rows_use_the_plain_prompt_and_dpo_drops_a_pair_with_half_gone(tokenizer):
    rows = [math_row(i, c) for i in range(2) for c in (True, False)]
    marked, _ = chunk_rows(rows, [0, 1, 2, 3], "nat", "robust", tokenizer, 1024, "drop", False)
    kto, _ = chunk_rows(rows, [0, 1, 2, 3], "nat", "robust", tokenizer, 1024, "drop", True, "kto")
    plain, _ = chunk_rows(rows, [0, 1, 2, 3], "nut", "robust", tokenizer, 1024, "drop", False)
    assert kto == plain != marked  # one unpacked row per example, no marker
    dpo, counts = chunk_rows(rows, [0, 1, 2, 3], "nat", "robust", tokenizer, 1024, "drop", True, "dpo")
    assert [r.example_ids for r in dpo] == [(0, 1), (2, 3)]
    assert dpo[0].input_ids == plain[0].input_ids + plain[1].input_ids
    assert dpo[0].position_ids == list(range(len(plain[0]))) + list(range(len(plain[1])))
    long = rows[:3] + [rows[3] | {nat_data.QUESTION: "many words " * 400}]
    dpo, counts = chunk_rows(long, [0, 1, 2, 3], "nat", "robust", tokenizer, 512, "drop", True, "dpo")
    assert [r.example_ids for r in dpo] == [(0, 1)]
    assert (counts["dropped_overlong"], counts["dropped_pair_partner"]) == (1, 1)


def test_index_batch_keeps_selected_rows_with_index_and_chunk():
    batch = pa.table({"trajectory_id": ["a", "b", "c", "d"], "x": [1, 2, 3, 4]})
    out = index_batch(batch, pa.array(["d", "z", "b"]), chunk_examples=2).to_pylist()
    assert out == [
        {"trajectory_id": "b", "x": 2, "index": 2, "chunk": 1},
        {"trajectory_id": "d", "x": 4, "index": 0, "chunk": 0},
    ]


def test_gather_rows_takes_rows_in_stream_order():
    def block(ids):
        return pa.table(
            {k: [[i] for i in ids] for k in ("input_ids", "labels", "position_ids", "example_ids", "lengths")}
        )

    out = gather_rows([0, 0, 1], [0, 1, 0], [1, 0, 1], [0, 1, 1], block([10, 11]), block([20, 21]))
    assert out.column_names[:3] == ["step", "micro", "input_ids"]
    assert out["input_ids"].to_pylist() == [[20], [11], [21]]
    assert out["step"].to_pylist() == [0, 0, 1] and out["micro"].to_pylist() == [0, 1, 0]


def test_custom_rows_made_elsewhere_are_rebuilt_from_the_task_file_found_here(tmp_path):
    """A teacher set shipped with a task names the author's checkout; the driver finds the file here
    (the task registered in this process, else a row's path that exists) and tells the workers."""
    import pyarrow.parquet as pq

    from nat_ray.tasks import TASKS, register_task_file
    from nat_ray.train.prepare import custom_task_files

    here = Path(__file__).resolve().parent.parent / "examples" / "word_math" / "task.yaml"
    rows = pa.table(
        {
            "family": ["custom", "custom", "math"],
            "task": ["word_math", "word_math", "gsm8k"],
            "task_source": ["/elsewhere/word_math/task.yaml", str(here), None],
        }
    )
    pq.write_table(rows, tmp_path / "rows.parquet")
    TASKS.pop("word_math", None)
    assert custom_task_files([str(tmp_path / "rows.parquet")]) == [str(here)]  # the row path that exists
    pq.write_table(rows.slice(0, 1), tmp_path / "rows.parquet")
    assert custom_task_files([str(tmp_path / "rows.parquet")]) == []  # none here: row_task will say so
    register_task_file(here)
    try:
        assert custom_task_files([str(tmp_path / "rows.parquet")]) == [str(here)]  # the registered one
    finally:
        TASKS.pop("word_math", None)
