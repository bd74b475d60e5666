"""Served-episode capture and feedback (``serve.capture``): ids, parts, the journal of what a killed
replica lost, feedback's last-wins log. Pure files and processes; the served path runs in
``tests/integration/test_serve.py``."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from pydantic import ValidationError

from nat_ray.config import AgentConfig
from nat_ray.core import episode_ids
from nat_ray.core import nat_data as columns
from nat_ray.core.react import Step
from nat_ray.core.storage import Store
from nat_ray.errors import ConfigError, DataError
from nat_ray.serve import capture
from nat_ray.serve.api import FeedbackRequest, validation_error
from nat_ray.tasks import get_task


def _episode(eid: str = "req-1", answer: str | None = "4"):
    from nat_ray.agent import new_episode

    ep = new_episode(get_task("gsm8k"), "2 + 2?", AgentConfig(temperature=0.7, seed=3), eid)
    ep.steps.append(Step("Action: finish[4]", prompt_ids=[1, 2, 3], completion_ids=[7, 8]))
    ep.answer, ep.finished = answer, True
    return ep


def _row(episode_id: str, gold=None) -> dict:
    from nat_ray.serve.api import gold_score

    episode = _episode()
    return capture.captured_row(
        episode,
        get_task("gsm8k"),
        question="2 + 2?",
        episode_id=episode_id,
        model="m:round-1",
        gold=gold,
        score=gold_score("gsm8k", episode.answer, gold),
        started_at="2026-12-07T00:00:00Z",
        config_hash="h",
        tool_versions={"calculate": "1"},
    )


def test_ids_are_unique_and_only_the_issuing_secret_recognises_them():
    secret, other = episode_ids.new_secret(), episode_ids.new_secret()
    ids = {episode_ids.issue(secret) for _ in range(2000)}
    assert len(ids) == 2000
    one = next(iter(ids))
    assert episode_ids.issued_with(one, secret) and not episode_ids.issued_with(one, other)
    tampered = one[:-1] + ("0" if one[-1] != "0" else "1")
    nonce_swapped = episode_ids.issue(secret)[:27] + one[27:]
    for bad in (tampered, nonce_swapped, "", "ep-1-2", None, 5, one.upper(), one + "0"):
        assert not episode_ids.issued_with(bad, secret), bad


def test_a_captured_row_is_named_by_its_episode_id_and_unlabelled_without_gold():
    row = _row("ep-a")
    assert row[columns.TRAJECTORY_ID] == "ep-a" and row[columns.QUESTION_ID] == "req-1"
    assert row[columns.NAT_CLASS] == capture.UNLABELLED and row[columns.GOLD] == ""
    assert row[columns.TURN_PROMPT_IDS] == [[1, 2, 3]] and row[columns.TURN_COMPLETION_IDS] == [[7, 8]]
    assert (row[columns.TEMPERATURE], row[columns.SEED], row[columns.MODEL]) == (0.7, 3, "m:round-1")
    scored = _row("ep-b", gold=4)
    assert scored[columns.CORRECT_ROBUST] and scored[columns.NAT_CLASS] != capture.UNLABELLED
    assert not _row("ep-c", gold=5)[columns.CORRECT_ROBUST]


def _journalled(location: str, replica: str) -> list[str]:
    """The episode ids in ``replica``'s journal now (its heartbeat left out)."""
    names = Store(location).files(f"{capture.JOURNAL_DIR}/{replica}", recursive=True)
    return sorted(n.rsplit("/", 1)[-1] for n in names if not n.endswith("/" + capture.ALIVE))


def test_parts_are_written_every_n_rows_or_s_seconds_and_half_written_ones_are_never_read(location):
    now = [0.0]
    writer = capture.CaptureWriter(location, flush_rows=2, flush_s=10, replica="r1", clock=lambda: now[0])
    writer.add(_row("ep-1"))
    assert writer.pending == 1 and capture.read_captured(location) == []
    assert _journalled(location, "r1") == ["ep-1"]  # journalled before it is written
    writer.add(_row("ep-2"))  # the second row fills the part
    assert writer.pending == 0 and writer.written == 2 and _journalled(location, "r1") == []
    writer.add(_row("ep-3"))
    now[0] = 9.0
    writer.tick()  # too early: only marks the journal alive
    assert writer.pending == 1
    now[0] = 10.0
    writer.tick()
    assert writer.pending == 0
    # A writer's temporary file beside the parts (a replica killed mid-write) is skipped.
    Store(location).write_bytes(f"{capture.EPISODES_DIR}/.part-r1-000003.tmp1.2.parquet", b"PAR1 half")
    assert [r[columns.TRAJECTORY_ID] for r in capture.read_captured(location)] == ["ep-1", "ep-2", "ep-3"]
    writer.add(_row("ep-4"))
    writer.close()  # a graceful stop writes what it kept and leaves no journal
    assert len(capture.read_captured(location)) == 4
    assert Store(location).files(capture.JOURNAL_DIR, recursive=True) == []
    assert capture.recover_lost(location, stale_s=0) == 0


def test_a_marker_written_while_a_flush_takes_its_segment_is_written_again(tmp_path, monkeypatch):
    writer = capture.CaptureWriter(tmp_path, flush_rows=10, flush_s=60, replica="r1")
    writer.add(_row("ep-1"))
    real_touch = writer.store.touch

    def touch_then_flush(rel: str) -> None:  # a flush lands between the marker's write and its row
        real_touch(rel)
        if rel.endswith("/ep-2") and writer._segment == 1:
            writer.flush()

    monkeypatch.setattr(writer.store, "touch", touch_then_flush)
    writer.flush()  # segment 0 -> 1
    writer.add(_row("ep-2"))
    markers = Store(tmp_path).files(f"{capture.JOURNAL_DIR}/r1", recursive=True)
    assert writer.pending == 1 and f"{capture.JOURNAL_DIR}/r1/000002/ep-2" in markers  # in the new segment
    writer.close()  # the stray one in segment 1 goes with it
    assert Store(tmp_path).files(capture.JOURNAL_DIR, recursive=True) == []
    assert len(capture.read_captured(tmp_path)) == 2 and capture.recover_lost(tmp_path, stale_s=0) == 0


def test_rows_survive_a_failed_write_and_go_out_with_the_next_flush(tmp_path, monkeypatch):
    writer = capture.CaptureWriter(tmp_path, flush_rows=10, flush_s=60, replica="r1")
    writer.add(_row("ep-1"))
    real = capture.records.write_rows

    def full_disk(rows, path, store=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(capture.records, "write_rows", full_disk)
    assert writer.flush() == 0 and writer.pending == 1
    assert _journalled(str(tmp_path), "r1") == ["ep-1"]
    monkeypatch.setattr(capture.records, "write_rows", real)
    writer.add(_row("ep-2"))
    assert writer.flush() == 2 and _journalled(str(tmp_path), "r1") == []
    assert [r[columns.TRAJECTORY_ID] for r in capture.read_captured(tmp_path)] == ["ep-1", "ep-2"]


KILLED_REPLICA = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from test_capture import _row
    from nat_ray.serve.capture import CaptureWriter
    writer = CaptureWriter(sys.argv[1], flush_rows=2, flush_s=600, replica="doomed")
    for i in range(5):  # two parts written, the fifth row kept in memory
        writer.add(_row(f"ep-{i}"))
    print("ready", flush=True)
    time.sleep(600)
    """
)


def test_a_killed_replica_s_unwritten_episodes_are_counted_by_the_next_one(location, caplog):
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_REPLICA, location, os.path.dirname(__file__)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert len(capture.read_captured(location)) == 4
    # A live replica's journal (touched within stale_s) is left alone.
    assert capture.recover_lost(location, stale_s=3600) == 0
    with caplog.at_level(logging.WARNING, logger="nat_ray.serve.capture"):
        assert capture.recover_lost(location, stale_s=0) == 1
    assert "1 episode(s) answered by replica doomed were lost" in caplog.text
    assert Store(location).files(f"{capture.LOST_DIR}/doomed") == [f"{capture.LOST_DIR}/doomed/ep-4"]
    assert capture.recover_lost(location, stale_s=0) == 0  # counted once


def test_an_older_server_s_journal_file_is_counted_too(tmp_path):
    (tmp_path / capture.JOURNAL_DIR).mkdir()
    (tmp_path / capture.JOURNAL_DIR / "old.ids").write_text("ep-1\nep-2\n")
    assert capture.recover_lost(tmp_path, stale_s=3600) == 0
    assert capture.recover_lost(tmp_path, stale_s=0) == 2
    assert (tmp_path / capture.LOST_DIR / "old.ids").is_file()
    assert capture.recover_lost(tmp_path, stale_s=0) == 0


def test_the_secret_is_made_once_and_shared_and_a_damaged_one_is_named(location):
    first = capture.capture_secret(f"{location}/cap")
    assert capture.capture_secret(f"{location}/cap") == first and len(first) == episode_ids.SECRET_BYTES
    store = Store(f"{location}/cap")
    if not store.remote:
        assert oct(os.stat(store.path(capture.SECRET_FILE)).st_mode & 0o777) == "0o600"
    store.write_text(capture.SECRET_FILE, "not hex")
    with pytest.raises(DataError, match="is damaged"):
        capture.capture_secret(f"{location}/cap")


def test_feedback_keeps_the_last_score_per_episode_across_replicas_and_skips_torn_lines(location, caplog):
    a, b = capture.FeedbackLog(location, "a"), capture.FeedbackLog(location, "b")
    a.record("ep-1", 0.2)
    b.record("ep-2", 1, answer="42")
    b.record("ep-1", 0.9, answer="7")
    # An older server's append-only log, with a line torn by a kill.
    Store(location).write_text(f"{capture.FEEDBACK_DIR}/old.jsonl", '{"episode_id": "ep-3", "sco')
    with caplog.at_level(logging.WARNING, logger="nat_ray.serve.capture"):
        got = capture.read_feedback(location)
    assert {k: (v["score"], v["answer"]) for k, v in got.items()} == {"ep-1": (0.9, "7"), "ep-2": (1.0, "42")}
    assert "1 entr(ies)" in caplog.text
    for bad in (1.5, -0.1, float("nan"), True, "1"):
        with pytest.raises(ValueError):
            a.record("ep-1", bad)


@pytest.mark.parametrize(
    "body, field",
    [
        ({"episode_id": "ep-1", "score": 1.5}, "score"),
        ({"episode_id": "ep-1", "score": True}, "score"),
        ({"episode_id": "ep-1", "score": "1"}, "score"),
        ({"score": 1}, "episode_id"),
        ({"episode_id": "ep-1", "score": 1, "extra": 1}, "extra"),
    ],
)
def test_bad_feedback_bodies_are_400s_naming_the_field(body, field):
    with pytest.raises(ValidationError) as info:
        FeedbackRequest.model_validate_json(json.dumps(body))
    status, payload = validation_error(info.value, invalid_status=400)
    assert status == 400 and payload["error"]["param"] == field
    assert FeedbackRequest.model_validate_json('{"episode_id": "ep-1", "score": 1}').score == 1.0


def test_a_redactor_rewrites_every_text_and_drops_the_token_ids_or_the_row_is_not_written(tmp_path):
    row = _row("ep-1", gold=4)
    clean = capture.redacted(row, lambda text: text.replace("2", "N"))
    assert clean[columns.QUESTION] == "N + N?" and clean[columns.ANSWER] == "4"
    assert all("2" not in m["content"] for m in clean[columns.PROMPT] + clean[columns.TRAJECTORY])
    assert clean[columns.TURN_PROMPT_IDS] is None and clean[columns.TURN_COMPLETION_IDS] is None
    assert row[columns.QUESTION] == "2 + 2?"  # the served row is untouched

    def broken(text):
        raise RuntimeError("no")

    for fn, words in ((broken, "RuntimeError: no"), (lambda text: None, "returned NoneType")):
        with pytest.raises(ValueError, match=words):
            capture.redacted(row, fn)
    plugin = tmp_path / "redact.py"
    plugin.write_text("def mask(text):\n    return text.upper()\n")
    assert capture.load_redactor(f"{plugin}:mask")("a") == "A"
    with pytest.raises(ConfigError, match="has no attribute"):
        capture.load_redactor(f"{plugin}:nothing")


def test_a_task_file_may_keep_its_episodes_off_disk(tmp_path):
    from nat_ray.tasks.task_file import load_task_file

    (tmp_path / "test.jsonl").write_text('{"question": "1 + 1?", "answer": "2"}\n')
    text = "name: private\ndata: {test: test.jsonl}\nscorer: math\ninstruction: Add.\n"
    (tmp_path / "a.yaml").write_text(text)
    (tmp_path / "b.yaml").write_text(text + "capture: false\n")
    (tmp_path / "c.yaml").write_text(text + "capture: nope\n")
    assert load_task_file(tmp_path / "a.yaml").capture is True
    assert load_task_file(tmp_path / "b.yaml").capture is False
    with pytest.raises(ConfigError, match="capture must be true or false, got 'nope'"):
        load_task_file(tmp_path / "c.yaml")


def test_training_leaves_out_captured_episodes_nobody_labelled():
    from nat_ray.core.nat_data import select_trajectories

    wrong, unknown = _row("ep-1", gold=5), _row("ep-2")  # a negative by its gold; no verdict at all
    selection = select_trajectories([wrong, unknown], None, None)
    assert [r[columns.TRAJECTORY_ID] for r in selection.negatives] == ["ep-1"]
    assert selection.positives == [] and selection.dropped["unlabelled"] == 1


def test_traffic_is_labelled_by_feedback_then_gold_and_the_rest_is_counted_and_left_out():
    from nat_ray.core.traffic import describe, label_traffic

    asked = _row("ep-a")  # no gold; a person says it was right and what the answer is
    graded = _row("ep-b", gold=5)  # the request's gold says wrong
    silent = _row("ep-c")  # nobody said anything
    earlier = _row("ep-d", gold=4)  # an earlier round trained on it
    feedback = {"ep-a": {"score": 1.0, "answer": "4"}, "ep-x": {"score": 0.0}}
    rows, counts = label_traffic([asked, graded, silent, earlier], feedback, used={"ep-d"})
    assert [r[columns.TRAJECTORY_ID] for r in rows] == ["ep-a", "ep-b"]
    assert rows[0][columns.CORRECT_ROBUST] and rows[0][columns.GOLD] == "4"
    assert rows[0][columns.NAT_CLASS] != capture.UNLABELLED and asked[columns.NAT_CLASS] == capture.UNLABELLED
    assert rows[1] is graded and not graded[columns.CORRECT_ROBUST]
    assert counts == {
        "episodes": 4,
        "earlier": 1,
        "new": 3,
        "feedback": 1,
        "gold": 1,
        "judge": 0,
        "unlabelled": 1,
    }
    assert describe(counts) == (
        "3 new of 4 captured: 1 labelled by feedback, 1 by gold, 0 by the judge, 1 unlabelled (left out)"
    )
    # A partial score is wrong, and where the task grades by F1 it is the row's F1.
    qa = {**_row("ep-q"), columns.FAMILY: "hotpotqa"}
    (half,), _ = label_traffic([qa], {"ep-q": {"score": 0.5}})
    assert not half[columns.CORRECT_ROBUST] and half[columns.F1] == 0.5
    (math_half,), _ = label_traffic([_row("ep-m")], {"ep-m": {"score": 0.5}})
    assert math_half[columns.F1] is None and math_half[columns.NAT_CLASS] == "incorrect"


def test_the_ticker_counts_a_dead_replica_s_journal_once_it_goes_stale(tmp_path):
    writer = capture.CaptureWriter(tmp_path, flush_rows=10, flush_s=0.001, replica="alive")
    dead = capture.CaptureWriter(tmp_path, flush_rows=10, flush_s=60, replica="dead")
    dead.add(_row("ep-1"))
    dead.add(_row("ep-2"))
    old = time.time() - 3600
    for path in (tmp_path / capture.JOURNAL_DIR / "dead").rglob("*"):
        os.utime(path, (old, old))  # a journal nobody touched for an hour
    ticker = capture.Ticker(writer, interval_s=0.02, recover_s=0.05)
    try:
        deadline = time.monotonic() + 20
        while ticker.lost < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        ticker.stop()
    assert ticker.lost == 2 and len(Store(tmp_path).files(f"{capture.LOST_DIR}/dead")) == 2
    assert (tmp_path / capture.JOURNAL_DIR / "alive" / capture.ALIVE).is_file()  # touched every tick
