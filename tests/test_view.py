"""``nat-ray view`` without a browser: what a run folder lists, the server-side filters and pages, path
tricks, and the key login (the browser test is in tests/integration/test_loop.py, on a real loop run)."""

from __future__ import annotations

import json
import os
import re

import pytest
from rows import math_row  # tests/rows.py
from starlette.testclient import TestClient

from nat_ray.core import nat_data, records
from nat_ray.errors import ConfigError
from nat_ray.serve.guards import Secret
from nat_ray.view import query
from nat_ray.view.app import COOKIE, check_bind, create_app
from nat_ray.view.runs import open_run


def _rows(round_: int, name: str = "") -> list[dict]:
    """Round 0 fails questions 0-5; round 1 solves the even ones. q3's wrong answer mentions 'zebra'."""
    out = []
    for i in range(6):
        ok = round_ == 1 and i % 2 == 0
        row = math_row(i, ok) | {
            nat_data.TRAJECTORY_ID: f"{name or round_}-q{i}",
            nat_data.ANSWER: "zebra" if i == 3 else str(i),
            nat_data.FAILURE_REASON: None if ok else ("turn_cap" if i == 5 else "wrong_answer"),
            nat_data.TURNS: 3 if i == 5 else 2,
            nat_data.PROMPT: [
                {"role": "system", "content": "Solve math word problems with the calculator."},
                {"role": "user", "content": f"Question: q{i}? (Please answer it correctly.)"},
            ],
        }
        out.append(row)
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs") / "loop"
    for r in (0, 1, 10):
        part = root / "rounds" / str(r) / "eval" / "trajectories"
        part.mkdir(parents=True)
        records.write_rows(_rows(min(r, 1), f"r{r}"), part / "word_math.parquet")
    table = "# loop\n\n| round | accuracy |\n|---|---|\n| 0 | 0.0 |\n| 1 | 50.0 |\n"
    (root / "results.md").write_text(table + "\n<script>alert(1)</script>\n")  # a model's words, say
    (root / "accuracy_by_round.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    train = root / "train" / "round-1"
    train.mkdir(parents=True)
    sample = {
        "objective": "sft",
        "variant": "nat",
        "examples": [{"example_id": 0, "tokens": ["Q", "A"], "loss": [0, 1]}],
    }
    (train / "loss_sample.json").write_text(json.dumps(sample))
    (root / "rounds" / "1" / "eval" / "summary.json").write_text("{}")  # not a trajectory file
    outside = tmp_path_factory.mktemp("outside")
    records.write_rows(_rows(0), outside / "secret.parquet")
    os.symlink(outside / "secret.parquet", root / "rounds" / "0" / "eval" / "trajectories" / "link.parquet")
    os.symlink(outside, root / "linked-folder")
    return root


@pytest.fixture(scope="module")
def client(run_dir):
    return TestClient(create_app(open_run(run_dir)))


def test_a_run_lists_its_sources_in_round_order_and_nothing_outside_it(run_dir):
    run = open_run(run_dir)
    assert run.kind == "loop"
    assert [s.label for s in run.sources] == ["rounds/0/eval", "rounds/1/eval", "rounds/10/eval"]
    assert all(len(s.files) == 1 and s.rows == 6 for s in run.sources)  # the symlinked file is not listed
    assert [label for label, _ in run.loss_samples] == ["train/round-1"]
    assert [p.name for p in run.plots] == ["accuracy_by_round.png"]
    with pytest.raises(ConfigError, match="no trajectory Parquet"):
        open_run(run_dir / "train")


def test_filters_and_pages_run_on_the_server(run_dir):
    run = open_run(run_dir)
    first = run.sources[0].key
    assert query.page(run, query.Filters()).total == 18
    failures = query.page(run, query.Filters(outcome="incorrect"))
    assert failures.total == 6 + 3 + 3 and all(not r["correct_robust"] for r in failures.rows)
    assert query.page(run, query.Filters(source=first, reason="turn_cap")).total == 1
    assert query.page(run, query.Filters(turns=3)).total == 3
    zebra = query.page(run, query.Filters(text="ZEBRA"))  # the answer, any case
    assert zebra.total == 3 and {r["question_id"] for r in zebra.rows} == {"q3"}
    pens = query.page(run, query.Filters(text="boxes times pens", source=first))  # a turn's text
    assert pens.total == 6
    # Pages cross source boundaries in order, without gaps or repeats.
    ids = [
        r["trajectory_id"] for off in (0, 4, 8, 12, 16) for r in query.page(run, query.Filters(), off, 4).rows
    ]
    assert len(ids) == 18 == len(set(ids))
    assert query.page(run, query.Filters(), 16, 4).rows[-1]["source_label"] == "rounds/10/eval"


def test_pages_show_the_table_a_trajectory_turn_by_turn_and_a_question_across_rounds(client):
    home = client.get("/")
    assert home.status_code == 200 and "<table>" in home.text and "rounds/10/eval" in home.text
    assert "<script>" not in home.text and "&lt;script&gt;" in home.text
    listing = client.get("/trajectories", params={"outcome": "incorrect", "source": "s1"})
    assert listing.status_code == 200 and "3 trajectories" in listing.text
    link = re.search(r'href="(/t/s1/[^"]+)"', listing.text).group(1)
    page = client.get(link)
    assert page.status_code == 200
    assert '<pre class="action">Action: calculate[' in page.text and '<pre class="observation">' in page.text
    assert "question and marker" in page.text and "wrong_answer" in page.text
    compare = client.get("/compare", params={"question_id": "q0", "task": "gsm8k"})
    assert compare.text.count('<section class="column') == 3
    assert "incorrect" in compare.text or "wrong_answer" in compare.text
    examples = client.get("/examples")
    assert "<mark>A</mark>" in examples.text and "<mark>Q</mark>" not in examples.text
    assert client.get("/plots/0").content.startswith(b"\x89PNG")


@pytest.mark.parametrize(
    "path",
    [
        "/plots/1",
        "/plots/-1",
        "/t/s9/r0-q0",
        "/t/s0/no-such-id",
        "/static/../app.py",
        "/static/%2e%2e/runs.py",
        "/static/..%2fapp.py",
        "/files/../../etc/passwd",
        "/compare?question_id=nope",
        "/trajectories?source=../../etc",
    ],
)
def test_no_path_trick_reaches_a_file_the_run_did_not_list(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert "import" not in response.text and "root:" not in response.text


def test_another_host_needs_the_key_and_the_login_sets_a_strict_http_only_cookie(run_dir):
    assert check_bind("127.0.0.1", {}) is None
    with pytest.raises(ConfigError, match="NAT_RAY_API_KEY"):
        check_bind("0.0.0.0", {})
    key = check_bind("0.0.0.0", {"NAT_RAY_API_KEY": "s3cret"})
    assert isinstance(key, Secret)
    client = TestClient(create_app(open_run(run_dir), key), follow_redirects=False)
    blocked = client.get("/trajectories?outcome=incorrect")
    assert blocked.status_code == 303 and blocked.headers["location"].startswith(
        "/login?next=%2Ftrajectories"
    )
    assert client.post("/trajectories").status_code == 401
    assert client.get("/static/view.css").status_code == 200  # the login page needs its style
    wrong = client.post("/login", data={"key": "guess", "next": "/"})
    assert wrong.status_code == 401 and COOKIE not in wrong.headers.get("set-cookie", "")
    right = client.post("/login", data={"key": "s3cret", "next": "//evil.example/"})
    assert right.status_code == 303 and right.headers["location"] == "/"  # never off-site
    cookie = right.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert "s3cret" not in cookie
    assert client.get("/").status_code == 200  # the cookie lets the browser in
    bearer = TestClient(create_app(open_run(run_dir), key), follow_redirects=False)
    assert bearer.get("/", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert bearer.get("/", headers={"Authorization": "Bearer nope"}).status_code == 303
