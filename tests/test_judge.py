"""The judge for served episodes without gold (:mod:`nat_ray.experiment.judge`), against a scripted
OpenAI-compatible judge server on this machine, and a task file's ``judge:`` section."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers import free_port
from test_capture import _row

from nat_ray.core import nat_data as columns
from nat_ray.core.traffic import label_traffic
from nat_ray.errors import ConfigError
from nat_ray.experiment.judge import judge_episodes, parse_score, read_judged
from nat_ray.tasks.served import JudgeSpec
from nat_ray.tasks.task_file import load_task_file


class ScriptedJudge(BaseHTTPRequestHandler):
    """``/v1/chat/completions``: the first call is a 503 (the client must retry), then a verdict by the
    answer in the prompt: "4" right (2 of 2), "5" wrong, anything else no score at all."""

    calls: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        if len(type(self).calls) == 1:
            self.send_response(503)
            self.end_headers()
            return
        user = body["messages"][-1]["content"]
        reply = {"4": "It adds up. Score: 2", "5": "Off by one. Score: 0"}.get(
            user.rsplit("Its final answer: ", 1)[-1], "I cannot tell."
        )
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def judge_url():
    ScriptedJudge.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def _answered(episode_id: str, answer: str) -> dict:
    return {**_row(episode_id), columns.ANSWER: answer}


def test_the_judge_labels_episodes_once_keeps_its_prompts_and_retries(judge_url, tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sekrit")
    spec = JudgeSpec(
        endpoint=judge_url, model="teacher", rubric="Check the arithmetic.", scale=2, api_key_env="JUDGE_KEY"
    )
    rows = [_answered("ep-1", "4"), _answered("ep-2", "5"), _answered("ep-3", "maybe")]
    verdicts = judge_episodes(rows, {"gsm8k": spec}, tmp_path)
    assert {k: v["score"] for k, v in verdicts.items()} == {"ep-1": 1.0, "ep-2": 0.0}  # ep-3: no score
    assert len(ScriptedJudge.calls) == 4  # the 503 was retried
    first = ScriptedJudge.calls[-1]
    assert first["path"] == "/v1/chat/completions" and first["body"]["model"] == "teacher"
    assert (
        first["auth"] == "Bearer sekrit"
        and "Check the arithmetic." in first["body"]["messages"][0]["content"]
    )
    kept = read_judged(tmp_path)
    assert set(kept) == {"ep-1", "ep-2", "ep-3"} and kept["ep-3"]["reply"] == "I cannot tell."
    assert kept["ep-1"]["prompt"][1]["content"].startswith("Question: 2 + 2?")
    # Judged once: a second round asks nothing.
    assert judge_episodes(rows, {"gsm8k": spec}, tmp_path) == verdicts and len(ScriptedJudge.calls) == 4
    # Labels: feedback first, then gold, then the judge.
    labelled, counts = label_traffic(rows, {"ep-2": {"score": 1.0}}, judge=lambda waiting: verdicts)
    assert [r[columns.CORRECT_ROBUST] for r in labelled] == [True, True]
    assert (counts["feedback"], counts["judge"], counts["unlabelled"]) == (1, 1, 1)


def test_a_judge_that_cannot_be_reached_labels_nothing_and_keeps_nothing(tmp_path):
    spec = JudgeSpec(endpoint=f"http://127.0.0.1:{free_port()}/v1", model="t", rubric="r")
    assert judge_episodes([_answered("ep-1", "4")], {"gsm8k": spec}, tmp_path) == {}
    assert read_judged(tmp_path) == {}  # a later round asks again
    assert judge_episodes([_answered("ep-1", "4")], {"svamp": spec}, tmp_path) == {}  # no judge for gsm8k


@pytest.mark.parametrize(
    "reply, scale, score",
    [("Score: 3", 4, 0.75), ("score = 1\nScore: 0", 1, 0.0), ("Score: 7", 5, None), ("no verdict", 1, None)],
)
def test_scores_are_read_from_the_last_score_line(reply, scale, score):
    assert parse_score(reply, scale) == score


def test_a_task_file_names_its_judge_and_bad_sections_are_named(tmp_path):
    (tmp_path / "test.jsonl").write_text('{"question": "Name a prime.", "answer": "7"}\n')
    text = "name: open_q\ndata: {test: test.jsonl}\nscorer: exact_match\ninstruction: Answer.\n"
    (tmp_path / "a.yaml").write_text(
        text
        + "judge: {endpoint: 'http://127.0.0.1:8000/v1', model: base, rubric: Any prime is right., scale: 1}\n"
    )
    judge = load_task_file(tmp_path / "a.yaml").judge
    assert (judge.endpoint, judge.model, judge.scale) == ("http://127.0.0.1:8000/v1", "base", 1)
    assert load_task_file(tmp_path / "a.yaml").judge.rubric == "Any prime is right."
    (tmp_path / "b.yaml").write_text(text + "judge: {model: base, rubric: r, scale: 0, colour: red}\n")
    with pytest.raises(ConfigError) as err:
        load_task_file(tmp_path / "b.yaml")
    for words in ("judge.endpoint", "judge.scale", "judge.colour"):
        assert words in str(err.value)
