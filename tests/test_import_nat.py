"""``import-nat``: NAT's StrategyQA trajectory files → trajectory rows, on hand-made files in NAT's format."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from nat_ray import paths
from nat_ray.cli import main
from nat_ray.core import nat_data as columns
from nat_ray.core import records
from nat_ray.core.prompts import build_messages
from nat_ray.errors import DataError
from nat_ray.import_nat import (
    DEFAULT_OUT,
    ENGINE,
    FILE_NAMES,
    NAT_DIR,
    TEACHER_MODEL,
    import_nat,
    resolve_inputs,
)

QUESTIONS = [
    {"id": "q1", "question": "Is the sky blue?", "answer": True},
    {"id": "q2", "question": "Can fish fly to the moon?", "answer": False},
    {"id": "q3", "question": "Is water wet?", "answer": True},
]
FINISHED = {"role": "user", "content": "Observation: Episode finished", "loss": False}


def _search(query: str) -> list[dict]:
    return [
        {"role": "assistant", "content": f"Thought: look it up.\n\nAction: search[{query}]", "loss": True},
        {"role": "user", "content": "Observation:  #1: a #2: b #3: c", "loss": False},
    ]


def _finish(pred: str) -> list[dict]:
    return [
        {"role": "assistant", "content": f"Thought: done.\n\nAction: finish[{pred}]", "loss": True},
        FINISHED,
    ]


def _record(
    qid: str, source: str, conversations: list[dict], reward: bool, gt: bool, pred: str | None
) -> dict:
    info = (
        {"reward": reward, "gt": gt}
        if pred is None
        else {"reward": reward, "acc": reward, "gt": gt, "pred": pred}
    )
    return {"conversations": conversations, "info": info, "id": qid, "source": source}


POSITIVES = [
    _record("q1", "0.5", _search("sky colour") + _finish("Yes"), True, True, "Yes"),
    _record("q2", "0.2", _finish("No"), True, False, "No"),
]
NEGATIVES = [
    _record("q1", "0.5", _finish("Yes."), False, True, "Yes."),  # NAT's rule: wrong; robust: right
    _record("q1", "0.5", _search("sky") + _finish("Uncertain"), False, True, "Uncertain"),
    _record("q2", "0.7", [t for i in range(7) for t in _search(f"fish {i}")], False, False, None),  # turn cap
    _record("q3", "0.2", [], False, True, None),  # empty
    _record("q2", "0.2", _search("fish moon"), False, False, None),  # stopped early (a bad next turn)
]


def _write(path: Path, data) -> Path:
    text = json.dumps(data)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def nat_dir(tmp_path: Path) -> Path:
    """A folder laid out like NAT's dataset/strategyqa: gzipped positives, plain negatives, questions."""
    folder = tmp_path / "strategyqa"
    folder.mkdir()
    _write(folder / f"{FILE_NAMES[0]}.gz", POSITIVES)
    _write(folder / FILE_NAMES[1], NEGATIVES)
    (folder / "train.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS), encoding="utf-8")
    return folder


def _inputs(folder: Path) -> tuple[list[Path], Path]:
    return [folder / f"{FILE_NAMES[0]}.gz", folder / FILE_NAMES[1]], folder / "train.jsonl"


def test_rows_in_file_order_with_nat_fields(nat_dir):
    files, questions = _inputs(nat_dir)
    rows, stats = import_nat(files, questions)

    assert len(rows) == 7 == stats.trajectories
    assert [(r[columns.QUESTION_ID], r[columns.TEMPERATURE], r[columns.SAMPLE_INDEX]) for r in rows] == [
        ("q1", 0.5, 0),
        ("q2", 0.2, 0),
        ("q1", 0.5, 1),
        ("q1", 0.5, 2),
        ("q2", 0.7, 0),
        ("q3", 0.2, 0),
        ("q2", 0.2, 1),
    ]
    first = rows[0]
    assert first[columns.TRAJECTORY_ID] == records.trajectory_id(TEACHER_MODEL, "strategyqa", "q1", 0.5, 0, 0)
    assert first[columns.QUESTION] == "Is the sky blue?"
    assert first[columns.GOLD] == "yes" and rows[1][columns.GOLD] == "no"
    assert first[columns.PROMPT] == build_messages("strategyqa", "Is the sky blue?", "zero-shot", None, 0)
    # loss dropped, turns kept as they are, the closing "Episode finished" included
    assert first[columns.TRAJECTORY] == [
        {"role": t["role"], "content": t["content"]} for t in POSITIVES[0]["conversations"]
    ]
    assert first[columns.TRAJECTORY][-1]["content"] == columns.EPISODE_FINISHED
    assert (
        first[columns.TURNS],
        first[columns.ANSWER],
        first[columns.FINISHED],
        first[columns.FAILURE_REASON],
    ) == (
        2,
        "Yes",
        True,
        None,
    )
    assert (first[columns.TASK], first[columns.FAMILY], first[columns.SEED], first[columns.F1]) == (
        "strategyqa",
        "strategyqa",
        0,
        None,
    )
    assert (
        first[columns.MODEL],
        first[columns.ENGINE],
        first[columns.PROMPT_TOKENS],
        first[columns.COMPLETION_TOKENS],
    ) == (
        TEACHER_MODEL,
        ENGINE,
        0,
        0,
    )
    assert first[columns.STARTED_AT] == first[columns.ENDED_AT]
    assert len({r[columns.CONFIG_HASH] for r in rows}) == 1


def test_ids_are_deterministic_and_unique(nat_dir):
    files, questions = _inputs(nat_dir)
    ids = [r[columns.TRAJECTORY_ID] for r in import_nat(files, questions)[0]]
    assert len(set(ids)) == len(ids)
    assert ids == [r[columns.TRAJECTORY_ID] for r in import_nat(files, questions)[0]]


def test_rescoring_paper_and_robust(nat_dir):
    rows, stats = import_nat(*_inputs(nat_dir))
    verdicts = {
        r[columns.ANSWER]: (r[columns.CORRECT_PAPER], r[columns.CORRECT_ROBUST], r[columns.NAT_CLASS])
        for r in rows
    }
    assert verdicts["Yes"] == (True, True, "correct")
    assert verdicts["No"] == (True, True, "correct")
    assert verdicts["Yes."] == (False, True, "correct")  # robust verdict picks the class
    assert verdicts["Uncertain"] == (False, False, "incorrect")
    assert (stats.reward_true, stats.reward_false) == (2, 5)
    assert (stats.correct_paper, stats.correct_robust) == (2, 3)
    assert (stats.disagree_paper, stats.disagree_robust) == (0, 1)
    assert stats.gt_mismatch == 0 and stats.finish_mismatch == 0


def test_unfinished_and_empty_trajectories(nat_dir):
    rows, stats = import_nat(*_inputs(nat_dir))
    capped, empty, stopped = rows[4], rows[5], rows[6]
    assert (
        capped[columns.TURNS],
        capped[columns.FINISHED],
        capped[columns.FAILURE_REASON],
        capped[columns.ANSWER],
    ) == (
        7,
        False,
        "turn_cap",
        None,
    )
    assert (empty[columns.TURNS], empty[columns.TRAJECTORY], empty[columns.FAILURE_REASON]) == (
        0,
        [],
        "parse_error",
    )
    assert (stopped[columns.TURNS], stopped[columns.FINISHED], stopped[columns.FAILURE_REASON]) == (
        1,
        False,
        "parse_error",
    )
    assert not any(r[columns.CORRECT_PAPER] or r[columns.CORRECT_ROBUST] for r in (capped, empty, stopped))
    assert (stats.unfinished, stats.empty, stats.turn_cap) == (3, 1, 1)


def test_finish_found_by_nats_split(tmp_path, nat_dir):
    # One positive in NAT's file has a stray "Action:" line first; NAT's "\nAction: " split still finished it.
    turn = {"role": "assistant", "content": "Action: Based on it, yes.\n\nAction: finish[Yes]", "loss": True}
    path = _write(tmp_path / "pos.json", [_record("q1", "0.2", [turn, FINISHED], True, True, "Yes")])
    rows, stats = import_nat([path], nat_dir / "train.jsonl")
    assert (rows[0][columns.FINISHED], rows[0][columns.FAILURE_REASON]) == (True, None)
    assert (stats.nat_split_finish, stats.finish_mismatch) == (1, 0)


def test_parquet_round_trip(tmp_path, nat_dir):
    rows, _ = import_nat(*_inputs(nat_dir))
    out = tmp_path / "out.parquet"
    records.write_rows(rows, out)
    schema = pq.read_schema(out)
    assert schema.equals(records.arrow_schema()) and schema.metadata == records.arrow_schema().metadata
    assert records.read_rows(out) == rows


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("bad.json", b"{not json"),
        ("object.json", json.dumps({"conversations": []}).encode()),
        ("broken.json.gz", b"\x1f\x8b\x08\x00 truncated"),
        ("latin1.json", '["caf\xe9"]'.encode("latin-1")),
    ],
)
def test_malformed_file_raises_naming_it(tmp_path, nat_dir, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=name.replace(".", r"\.")):
        import_nat([path], nat_dir / "train.jsonl")


def test_missing_file_raises(tmp_path, nat_dir):
    with pytest.raises(DataError, match="nope.json"):
        import_nat([tmp_path / "nope.json"], nat_dir / "train.jsonl")


def test_malformed_records_skipped_and_counted(tmp_path, nat_dir, caplog):
    good = POSITIVES[0]
    data = [
        good,
        {k: v for k, v in good.items() if k != "conversations"},
        {k: v for k, v in good.items() if k != "id"},
        {**good, "id": "q999"},
        "not an object",
        {**good, "source": "hot"},
        {**good, "info": {"gt": True}},
        {**good, "conversations": [{"role": "assistant"}]},
    ]
    path = _write(tmp_path / "mixed.json", data)
    with caplog.at_level(logging.WARNING, logger="nat_ray.import_nat"):
        rows, stats = import_nat([path], nat_dir / "train.jsonl")
    assert len(rows) == 1 and stats.records == 8
    assert dict(stats.skipped) == {
        "missing_conversations": 1,
        "missing_id": 1,
        "unknown_question": 1,
        "not_an_object": 1,
        "bad_source": 1,
        "bad_info": 1,
        "bad_conversations": 1,
    }
    assert f"{path}[3]: skipped" in caplog.text and "q999" in caplog.text


def test_cli_folder_and_out_dir(tmp_path, nat_dir, capsys):
    argv = [
        "import-nat",
        str(nat_dir.parent),
        "--output-dir",
        str(tmp_path / "runs"),
    ]  # a NAT-like checkout root
    assert main(argv) == 0
    out = tmp_path / "runs" / DEFAULT_OUT.name
    rows = records.read_rows(out)
    assert len(rows) == 7 and rows[0][columns.QUESTION] == "Is the sky blue?"  # positives first
    summary = capsys.readouterr().out
    assert "7 of 7 records" in summary and "2 positive / 5 negative" in summary and str(out) in summary


def test_cli_files_out_file_and_questions(tmp_path, nat_dir):
    files, questions = _inputs(nat_dir)
    out = tmp_path / "x" / "mine.parquet"
    assert main(["import-nat", str(files[1]), "--questions", str(questions), "--out", str(out)]) == 0
    assert len(records.read_rows(out)) == len(NEGATIVES)


def test_cli_help_names_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["import-nat", "--help"])
    text = capsys.readouterr().out
    assert str(DEFAULT_OUT) in text and NAT_DIR in text and "PATH" in text and "--questions" in text


def test_resolve_inputs_rejects_missing_path(tmp_path):
    with pytest.raises(DataError, match="nothing-here"):
        resolve_inputs([str(tmp_path / "nothing-here")])
    with pytest.raises(DataError, match="strategyqa_gpt-3.5_positive"):
        resolve_inputs([str(tmp_path)])


# ---------------------------------------------------------------------------------------------
# The real files, when this machine has them
# ---------------------------------------------------------------------------------------------


def _real_files() -> list[Path]:
    shared = paths.shared_data_dir()
    if shared is None:
        pytest.skip("no shared data dir")
    found = [
        next(
            (shared / NAT_DIR / (n + s) for s in ("", ".gz") if (shared / NAT_DIR / (n + s)).is_file()), None
        )
        for n in FILE_NAMES
    ]
    if None in found or not (shared / NAT_DIR / "train.jsonl").is_file():
        pytest.skip(f"NAT StrategyQA trajectory files not under {shared / NAT_DIR}")
    return found


def test_real_nat_files():
    positive, negative = _real_files()
    questions = positive.parent / "train.jsonl"
    rows, stats = import_nat([positive, negative], questions)
    assert (len(rows), stats.skipped) == (2333, {})  # every question found
    assert list(stats.rows_per_file.values()) == [1070, 1263]
    assert len({r[columns.TRAJECTORY_ID] for r in rows}) == 2333
    assert (stats.empty, stats.unfinished, stats.turn_cap, stats.finish_mismatch) == (7, 20, 3, 0)
    # Re-scoring the positives alone: NAT's rule agrees with info.reward except where we counted otherwise.
    pos_rows, pos_stats = import_nat([positive], questions)
    assert sum(r[columns.CORRECT_PAPER] for r in pos_rows) == 1070 - pos_stats.disagree_paper
    assert pos_stats.disagree_paper == 0
