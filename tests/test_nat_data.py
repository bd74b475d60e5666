"""Each NAT data variant's composition, from hand-made scored trajectories."""

from __future__ import annotations

import pytest

from nat_ray.core import nat_data as columns
from nat_ray.core.masks import IGNORE_INDEX, tokenize_example
from nat_ray.errors import ConfigError, DataError


def _row(tid, qid, correct, f1=None, family="hotpotqa", turns=None, finished=True):
    turns = (
        turns
        if turns is not None
        else [
            {"role": "assistant", "content": f"Thought: t{tid}\nAction: search[{qid}]"},
            {"role": "user", "content": "Observation:  #1: x"},
            {"role": "assistant", "content": f"Thought: so\nAction: finish[{tid}]"},
            {"role": "user", "content": "Observation: Episode finished"},
        ]
    )
    return {
        columns.TRAJECTORY_ID: tid,
        columns.QUESTION_ID: qid,
        columns.QUESTION: f"question {qid}?",
        columns.FAMILY: family,
        columns.TRAJECTORY: turns,
        columns.CORRECT_PAPER: correct,
        columns.CORRECT_ROBUST: correct,
        columns.F1: f1,
        columns.FINISHED: finished,
    }


ROWS = [
    _row("p1", "q1", True, 1.0),
    _row("p1b", "q1", True, 1.0),  # a second positive of q1: deduplicated
    _row("p2", "q2", True, 1.0),
    _row("n1", "q1", False, 0.0),
    _row("n2", "q2", False, 0.25),
    _row("n3", "q3", False, 0.5),
    _row(
        "n3dup", "q3", False, 0.5, turns=_row("n3", "q3", False)[columns.TRAJECTORY]
    ),  # exact duplicate of n3
    _row("empty", "q4", False, 0.0, turns=[]),
    _row("unfinished", "q5", False, 0.0, finished=False),
]


def _question_turns(examples):
    return {ex.trajectory_id: ex.messages[ex.prompt_messages - 1]["content"] for ex in examples}


def test_wo_neg_uses_only_positives_one_per_question():
    examples, sel = columns.build_examples(ROWS, "wo_neg")
    assert {ex.trajectory_id for ex in examples} == {"p1", "p2"}
    assert sel.dropped["duplicate_positive"] == 1
    assert set(_question_turns(examples).values()) == {"Question: question q1?", "Question: question q2?"}


def test_nut_mixes_negatives_under_the_same_prompt():
    examples, sel = columns.build_examples(ROWS, "nut")
    ids = {ex.trajectory_id for ex in examples}
    assert ids == {"p1", "p2", "n1", "n2", "n3", "unfinished"}
    assert sel.dropped["empty"] == 1 and sel.dropped["duplicate_negative"] == 1
    turns = _question_turns(examples)
    assert turns["n1"] == "Question: question q1?" == turns["p1"]


def test_nat_marks_negatives_with_the_incorrect_prompt():
    examples, _ = columns.build_examples(ROWS, "nat", drop_unfinished_negatives=True)
    turns = _question_turns(examples)
    assert "unfinished" not in turns
    assert turns["p1"].endswith("solve the question **correctly**.")
    assert turns["n2"].endswith("But **incorrectly** solve the question.")
    assert examples[0].messages[0]["content"].endswith("follow the instruction strictly.")


def test_nat_k_grades_negatives_by_f1():
    examples, _ = columns.build_examples(ROWS, "nat_k", drop_zero_f1_negatives=True)
    turns = _question_turns(examples)
    assert set(turns) == {"p1", "p2", "n2", "n3"}  # F1 = 0 negatives dropped (spec §3.5)
    assert turns["n2"] == "[Mostly Incorrect] Question: question q2?."
    assert turns["n3"] == "[Mostly Correct] Question: question q3?."
    assert turns["p1"] == "[Correct] Question: question q1?."


def test_table4_and_cot_variants():
    turns = _question_turns(columns.build_examples(ROWS, "nat_inverse")[0])
    assert turns["p1"] == "[Incorrect] Question: question q1?." and turns["n1"].startswith("[Correct]")
    math_rows = [_row("m1", "a", True, family="math"), _row("m2", "b", False, family="math")]
    turns = _question_turns(columns.build_examples(math_rows, "nat_ab")[0])
    assert turns == {"m1": "[A] Question: question a?.", "m2": "[B] Question: question b?."}
    cot, _ = columns.build_examples(math_rows, "cot_nat")
    assert all(ex.prompt_messages == 1 for ex in cot)  # no instruction turns


def test_trailing_episode_finished_observation_is_dropped():
    ex = columns.build_example(ROWS[0], "nat")
    assert ex.messages[-1]["role"] == "assistant" and ex.messages[-1]["content"].endswith("finish[p1]")


def test_seeded_sampling_is_reproducible_and_bounded():
    a = columns.select_trajectories(ROWS, 1, 2, seed=3)
    b = columns.select_trajectories(ROWS, 1, 2, seed=3)
    assert [r[columns.TRAJECTORY_ID] for r in a.negatives] == [r[columns.TRAJECTORY_ID] for r in b.negatives]
    assert len(a.positives) == 1 and len(a.negatives) == 2
    with pytest.raises(DataError, match="only 2"):
        columns.select_trajectories(ROWS, 5, None)


def test_label_mode_picks_the_verdict():
    row = {**_row("x", "q", True), columns.CORRECT_PAPER: False, columns.CORRECT_ROBUST: True}
    assert columns.is_positive(row, "robust") and not columns.is_positive(row, "paper")
    with pytest.raises(ConfigError):
        columns.is_positive(row, "lenient")


def test_errors_before_training():
    with pytest.raises(DataError, match="needs negative"):
        columns.build_examples([_row("p", "q", True)], "nat")
    with pytest.raises(DataError, match="no positive"):
        columns.build_examples([_row("n", "q", False)], "nut")
    with pytest.raises(ConfigError, match="unknown data variant"):
        columns.get_variant("nat_99")
    with pytest.raises(DataError, match="grades by F1"):
        columns.build_examples([_row("h1", "a", True), _row("h2", "b", False)], "nat_soft")
    with pytest.raises(ConfigError, match="no template"):  # F1 classes need a QA task
        columns.build_examples(
            [_row("m1", "a", True, family="math"), _row("m2", "b", False, family="math")], "nat_k"
        )


def test_examples_tokenize_with_loss_on_the_agent_only(tokenizer):
    ex = columns.build_example(ROWS[3], "nat")
    tok = tokenize_example(tokenizer, ex.messages, prompt_messages=ex.prompt_messages)
    supervised = tokenizer.decode([t for t, lab in zip(tok.input_ids, tok.labels) if lab != IGNORE_INDEX])
    assert "Action: search[q1]" in supervised and "Action: finish[n1]" in supervised
    assert (
        "Observation" not in supervised and "incorrectly" not in supervised and "understood" not in supervised
    )


# ---------------------------------------------------------------------------------------------------
# A user's task: the prompt is rebuilt from its task file (tests/data/tasks/metric)


@pytest.fixture
def metric_rows():
    from pathlib import Path

    from nat_ray.tasks import TASKS, load_task_file

    before = dict(TASKS)
    task = load_task_file(Path(__file__).parent / "data" / "tasks" / "metric" / "metric.yaml")
    lineage = {columns.TASK: "metric", columns.TASK_SOURCE: task.source, columns.TASK_HASH: task.source_hash}
    rows = [
        {**_row("p1", "m1", True, 1.0, family="custom"), **lineage},
        {**_row("n1", "m1", False, 0.5, family="custom"), **lineage},
        {**_row("n2", "m2", False, 0.0, family="custom"), **lineage},
    ]
    yield task, rows
    TASKS.clear()
    TASKS.update(before)


def test_custom_task_variants_rebuild_the_task_files_prompt(metric_rows):
    task, rows = metric_rows
    examples, _ = columns.build_examples(rows, "nat")
    by_id = {e.trajectory_id: e for e in examples}
    assert by_id["p1"].messages[0] == {"role": "user", "content": task.instruction}
    assert by_id["p1"].messages[2]["content"] == "Question: question m1?. Convert it to metres **correctly**."
    assert (
        by_id["n1"].messages[2]["content"]
        == "Question: question m1?. Convert it to metres, but **incorrectly**."
    )
    assert by_id["n1"].prompt_messages == 3 and by_id["n1"].messages[3]["content"].startswith("Thought: tn1")
    nut, _ = columns.build_examples(rows, "nut")
    assert {e.messages[2]["content"] for e in nut} == {"Question: question m1?", "Question: question m2?"}
    wo_neg, _ = columns.build_examples(rows, "wo_neg")
    assert [e.trajectory_id for e in wo_neg] == ["p1"]
    nat_k, _ = columns.build_examples(rows, "nat_k")  # the float scorer's F1 grades the negatives
    assert {e.trajectory_id: e.klass for e in nat_k} == {
        "p1": "correct",
        "n1": "mostly_correct",
        "n2": "totally_incorrect",
    }
    with pytest.raises(ConfigError, match="no template 'cot-zero-shot-target-aware' for custom tasks"):
        columns.build_examples(rows, "cot_nat")


def test_custom_rows_fall_back_to_the_registered_task(metric_rows, tmp_path):
    from nat_ray.tasks import register_task

    task, rows = metric_rows
    moved = [{**r, columns.TASK_SOURCE: str(tmp_path / "gone.yaml")} for r in rows]
    with pytest.raises(DataError, match="cannot rebuild the prompt of task 'metric'"):
        columns.build_example(moved[0], "nat")
    register_task(task)
    assert columns.build_example(moved[0], "nat").messages[0]["content"] == task.instruction


# ---------------------------------------------------------------------------------------------------
# Failure-aware NAT (beyond the paper)


def _failed(tid, reason, finished=False, family="math"):
    return {**_row(tid, "q", False, family=family, finished=finished), columns.FAILURE_REASON: reason}


FAILURES = [
    _row("ok", "q", True, family="math"),
    _failed("wrong", None, finished=True),
    _failed("cap", "turn_cap"),
    _failed("overflow", "context_overflow"),
    _failed("unparsed", "parse_error"),
    _failed("tool", "tool_error"),
    _failed("engine", "generation_error"),
    _failed("imported", None),  # unfinished, no reason recorded
]


def test_failure_kind_follows_the_stored_reason_and_finish():
    from nat_ray.core import react
    from nat_ray.core.prompts import FAILURE_KINDS

    kinds = {r[columns.TRAJECTORY_ID]: columns.failure_kind(r) for r in FAILURES[1:]}
    assert kinds == {
        "wrong": "wrong_answer",
        "cap": "turn_cap",
        "overflow": "turn_cap",
        "unparsed": "unparseable",
        "tool": "tool_error",
        "engine": "incorrect",
        "imported": "incorrect",
    }
    assert set(kinds.values()) == set(FAILURE_KINDS)
    # The reasons are react's own (spelled out in nat_data to keep its imports light).
    assert set(columns._KIND_OF_REASON) <= set(react.FAILURE_REASONS)


@pytest.mark.parametrize("family", ["math", "hotpotqa", "strategyqa"])
def test_nat_failure_gives_each_kind_its_own_marker_and_keeps_nat_positives(family):
    from nat_ray.core.prompts import build_messages

    rows = [{**r, columns.FAMILY: family} for r in FAILURES]
    examples, sel = columns.build_examples(rows, "nat_failure")
    assert len(sel.positives) == 1 and len(sel.negatives) == 7
    klass = {ex.trajectory_id: ex.klass for ex in examples}
    assert klass["ok"] == "correct" and klass["tool"] == "tool_error" and klass["wrong"] == "wrong_answer"
    turns = _question_turns(examples)
    # Five markers for five classes; the "incorrect" one is NAT's own.
    assert len({turns[t] for t in ("ok", "wrong", "cap", "unparsed", "tool", "engine")}) == 6
    assert turns["cap"] == turns["overflow"] and turns["engine"] == turns["imported"]
    nat = _question_turns(columns.build_examples(rows, "nat")[0])
    assert turns["ok"] == nat["ok"] and turns["engine"] == nat["engine"]
    assert "wrong answer" in turns["wrong"] and "parsed" in turns["unparsed"] and "tool" in turns["tool"]
    # The instruction turn is NAT's, and inference asks for "correct" exactly as NAT does.
    nat_ex = next(ex for ex in columns.build_examples(rows, "nat")[0] if ex.trajectory_id == "ok")
    failure_ex = next(ex for ex in examples if ex.trajectory_id == "ok")
    assert failure_ex.messages == nat_ex.messages
    variant = columns.get_variant("nat_failure")
    assert build_messages(family, "q?", variant.template, shots=1) == build_messages(
        family, "q?", columns.get_variant("nat").template, shots=1
    )


def test_nat_failure_on_a_custom_task_keeps_the_tasks_markers(metric_rows):
    rows = [{**r, columns.FAILURE_REASON: "turn_cap", columns.FINISHED: False} for r in metric_rows[1]]
    failure = {ex.trajectory_id: ex for ex in columns.build_examples(rows, "nat_failure")[0]}
    nat = {ex.trajectory_id: ex for ex in columns.build_examples(rows, "nat")[0]}
    assert failure.keys() == nat.keys()
    for tid, ex in failure.items():
        if ex.klass == "correct":
            assert ex.messages == nat[tid].messages  # the task's own "correct" marker
        else:
            assert ex.klass == "turn_cap" and "never reach a final answer" in _question_turns([ex])[tid]
