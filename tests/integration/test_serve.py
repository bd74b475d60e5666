"""Stage 3 on a real local Ray Serve: vLLM through ray.serve.llm on the embedded model, tool deployments, the agent.

One application serves the whole module (vLLM takes a minute or two to start here). It serves a
training-export-shaped folder (``<run>/export/{model,adapter,export.json}``, as ``nat_ray.train``
writes it): the full model as ``engine.model`` and the LoRA adapter (an untrained peft adapter of
the embedded model) as ``serve.lora``, so both the full and the LoRA path of an export are served.
Its ``serve.lora_dir`` starts empty; the module's last tests publish an adapter into it while the
server runs (hot-loading) and ask for missing and unsafe adapter names. Beside the built-in tasks it
answers two of a user's own (``examples/unit_convert``, ``examples/mcp_units``), configured by file.

``serve.capture_dir`` and ``serve.lora_dir`` are in object storage, as on a cluster whose replicas share
no folder: ``s3://`` on a real S3-compatible server (moto's server mode) started for the session. So
capture, feedback, the traffic round and the hot-loaded adapters all go through ``s3://``; the replicas
reach it with the settings the app hands them (they started before this process set ``AWS_*``). The
same code on a local folder is tested in ``tests/test_capture.py`` and ``tests/test_serve_adapters.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from helpers import MCP_UNITS_TASK, UNIT_CONVERT_TASK, free_port  # tests/helpers.py

from nat_ray.config import NatRayConfig, ServeConfig, from_dict
from nat_ray.core import nat_data as columns
from nat_ray.core import records
from nat_ray.paths import PACKAGE_DATA_DIR
from nat_ray.tasks import get_task

pytestmark = pytest.mark.integration

REQUEST_TIMEOUT_S = 300
SAMPLE_CORPUS = str(PACKAGE_DATA_DIR / "hotpotqa" / "corpus_sample.jsonl.gz")


# Every adapter here (the export's, hot_adapter, the traffic round's) has this rank, and the engine is
# sized to it: on CPU, vLLM pads each adapter to engine.max_lora_rank and every LoRA token costs in
# proportion (a 210-token prompt: 40.6 s at the default 64, 4.2 s at 8; benchmarks/lora_rank.py).
LORA_RANK = 8

MAKE_ADAPTER = f"""
import sys, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
lora = LoraConfig(r={LORA_RANK}, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
get_peft_model(base, lora).save_pretrained(sys.argv[2])
"""


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, embedded_path) -> Path:
    """``<run>/export`` with ``model/`` (the embedded checkpoint's files) and ``adapter/`` (a peft LoRA)."""
    export = tmp_path_factory.mktemp("runs") / "nat-test" / "export"
    (export / "model").mkdir(parents=True)
    for file in Path(embedded_path).iterdir():
        (export / "model" / file.name).symlink_to(file)
    # In a child process: torch and peft would otherwise stay in this process's memory all module long.
    subprocess.run(
        [sys.executable, "-c", MAKE_ADAPTER, embedded_path, str(export / "adapter")], check=True, timeout=600
    )
    paths = {"model": str(export / "model"), "adapter": str(export / "adapter")}
    (export / "export.json").write_text(json.dumps({**paths, "base_model": embedded_path, "mode": "lora"}))
    return export


@pytest.fixture(scope="module")
def server(export_dir, local_ray, s3_bucket):
    from ray import serve

    from nat_ray.serve.app import APP_NAME, build_app

    port = free_port()
    lora_dir = f"{s3_bucket}/serve/lora"  # empty until the hot-load test publishes into it
    capture_dir = f"{s3_bucket}/serve/capture"
    cfg = from_dict(
        NatRayConfig,
        {
            "engine": {
                "model": str(export_dir),
                "max_model_len": 2048,
                "kv_cache_gb": 1,
                "max_num_seqs": 32,
                "max_lora_rank": LORA_RANK,
            },
            "agent": {"max_turns": 3, "max_new_tokens": 48},
            "tools": {"search_corpus": SAMPLE_CORPUS},
            "serve": {
                # A user's own tasks beside the built-in ones (test_own_task.py takes them through the other stages).
                "tasks": [*ServeConfig().tasks, UNIT_CONVERT_TASK, MCP_UNITS_TASK],
                "lora": str(export_dir),
                "lora_dir": str(lora_dir),
                "port": port,
                "tool_min_replicas": 1,
                "tool_max_replicas": 2,
                "max_question_chars": 2000,
                "request_timeout_s": REQUEST_TIMEOUT_S,
                "capture": True,
                "capture_dir": str(capture_dir),
                "capture_flush_s": 1.0,
            },
        },
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
        yield types.SimpleNamespace(
            url=f"http://127.0.0.1:{port}",
            model="nat-test",
            lora="nat-test-lora",
            cfg=cfg,
            lora_dir=lora_dir,
            capture_dir=capture_dir,
        )
    finally:
        serve.shutdown()


def _agent(server, **body) -> requests.Response:
    return requests.post(f"{server.url}/v1/agent", json=body, timeout=REQUEST_TIMEOUT_S)


def test_health_and_models_list_the_export_and_its_adapter(server, export_dir):
    health = requests.get(f"{server.url}/healthz", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["model"] == server.lora  # the agent runs the tuned adapter
    models = requests.get(f"{server.url}/v1/models", timeout=30).json()
    cards = {m["id"]: m for m in models["data"]}
    assert models["object"] == "list" and set(cards) == {server.model, server.lora}
    assert cards[server.lora]["parent"] == server.model
    assert cards[server.lora]["root"] == str((export_dir / "adapter").resolve())


def test_the_openai_client_works_unchanged_on_the_model_and_the_adapter(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S)
    assert {m.id for m in client.models.list()} == {server.model, server.lora}
    for model in (server.model, server.lora):
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=12,
            temperature=0,
        )
        assert reply.model == model
        assert isinstance(reply.choices[0].message.content, str) and reply.choices[0].message.content
        assert reply.usage.completion_tokens > 0


def test_streaming_chat_completion(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S)
    stream = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Count from one to ten."}],
        max_tokens=16,
        temperature=0,
        stream=True,
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len(pieces) > 2 and "".join(pieces).strip()


@pytest.fixture(scope="module")
def answers(server) -> dict:
    """Three agent requests sent at once (they share the agent loop): a math question with its gold,
    the same request without gold, and a HotpotQA question with its gold."""
    math = get_task("gsm8k").load("test", limit=1)[0]
    qa = get_task("hotpotqa").load("dev", limit=1)[0]
    same = {"task": "gsm8k", "question": math.question, "seed": 1, "max_turns": 2}
    bodies = {
        "math": {**same, "gold": math.gold},
        "math_again": same,
        "qa": {"task": "hotpotqa", "question": qa.question, "gold": qa.gold, "max_turns": 2},
    }
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = dict(zip(bodies, pool.map(lambda b: _agent(server, **b), bodies.values())))
    return responses


def test_agent_answers_a_math_question_and_scores_it_with_gold(server, answers, tokenizer):
    assert answers["math"].status_code == 200, answers["math"].text
    answer = answers["math"].json()
    assert answer["model"] == server.lora and answer["task"] == "gsm8k"
    assert 1 <= answer["turns"] <= 2
    assert answer["turns"] == sum(t["role"] == "assistant" for t in answer["trajectory"])
    assert answer["finished"] == (answer["failure_reason"] is None)
    assert set(answer["correct"]) == {"paper", "robust", "f1"} and isinstance(
        answer["correct"]["robust"], bool
    )
    assert answer["usage"]["completion_tokens"] > 0
    # Token-exact served turns: per agent turn the ids vLLM read and sampled (the traffic issue's base).
    assert len(answer["turn_prompt_ids"]) == len(answer["turn_completion_ids"]) == answer["turns"]
    assert answer["token_drift"] == 0  # counted with the served model's tokenizer: every turn continued
    for turn, ids in zip(
        (t for t in answer["trajectory"] if t["role"] == "assistant"), answer["turn_completion_ids"]
    ):
        assert tokenizer.decode(ids, skip_special_tokens=True).strip().startswith(turn["content"].strip())


def test_the_same_request_samples_the_same_episode(answers):
    again = answers["math_again"]
    assert again.status_code == 200 and "correct" not in again.json()
    assert again.json()["trajectory"] == answers["math"].json()["trajectory"]


def test_agent_answers_a_qa_question_with_search(answers):
    assert answers["qa"].status_code == 200, answers["qa"].text
    body = answers["qa"].json()
    assert isinstance(body["correct"]["f1"], float) and 0.0 <= body["correct"]["f1"] <= 1.0
    assert 1 <= body["turns"] <= 2


def test_served_episodes_are_captured_with_their_token_ids_and_take_feedback(server, answers):
    from nat_ray.serve.capture import UNLABELLED, read_captured, read_feedback

    bodies = {name: r.json() for name, r in answers.items()}
    # The same request twice: the same sampled episode (one request id), two answers (two episode ids).
    assert bodies["math"]["id"] == bodies["math_again"]["id"]
    assert len({b["episode_id"] for b in bodies.values()}) == 3
    # Within capture_flush_s (1 s here) the ticker writes them.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        health = requests.get(f"{server.url}/healthz", timeout=30).json()["captured_episodes"]
        if health["pending"] == 0 and health["written"] >= 3:
            break
        time.sleep(0.5)
    rows = {r["trajectory_id"]: r for r in read_captured(server.capture_dir)}
    for name, body in bodies.items():
        row = rows[body["episode_id"]]
        assert row["question_id"] == body["id"] and row["model"] == body["model"] == server.lora
        assert row["trajectory"] == body["trajectory"] and row["answer"] == body["answer"]
        assert row["turn_completion_ids"] == body["turn_completion_ids"]
        assert (row["nat_class"] == UNLABELLED) == (name == "math_again")  # only it came without gold
    assert rows[bodies["math"]["episode_id"]]["correct_robust"] == bodies["math"]["correct"]["robust"]

    def feedback(**body) -> requests.Response:
        return requests.post(f"{server.url}/v1/feedback", json=body, timeout=30)

    unlabelled = bodies["math_again"]["episode_id"]
    assert feedback(episode_id=unlabelled, score=0.0).status_code == 200
    done = feedback(episode_id=unlabelled, score=1, answer=bodies["math"]["answer"])
    assert done.status_code == 200 and done.json() == {
        "episode_id": unlabelled,
        "score": 1.0,
        "recorded": True,
    }
    assert read_feedback(server.capture_dir)[unlabelled]["score"] == 1.0  # the last one wins
    bad = feedback(episode_id=unlabelled, score=1.5)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "score"
    forged = "ep-" + "0" * 24 + "-" + "0" * 20  # the id's shape, not this server's HMAC
    missing = feedback(episode_id=forged, score=1)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "episode_id"
    assert forged not in read_feedback(server.capture_dir)


@pytest.mark.parametrize(
    "route, body, status, field",
    [
        ("agent", {"question": "2 + 2?"}, 422, "task"),
        ("agent", {"task": "gsm8k", "question": ["2 + 2?"]}, 422, "question"),
        ("agent", {"task": "gsm8k", "question": "x" * 2001}, 422, "question"),
        ("agent", {"task": "chess", "question": "e4?"}, 422, "task"),
        ("agent", {"task": "gsm8k", "question": "2 + 2?", "max_turns": 11}, 422, "max_turns"),
        ("agent", {"task": "gsm8k", "question": "2 + 2?", "max_tokens": 5000}, 422, "max_tokens"),
        ("agent", '{"task": "gsm8k", "question": ', 400, "body"),
        (
            "chat/completions",
            {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]},
            404,
            "model",
        ),
        ("chat/completions", {"messages": "hi"}, 422, "messages"),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": {"a": 1}}]},
            422,
            "messages.0.content",
        ),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
            400,
            "max_tokens",
        ),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema"}},
            400,
            "response_format",
        ),
        ("chat/completions", "{not json", 400, "body"),
    ],
)
def test_bad_requests_get_a_4xx_naming_the_field(server, route, body, status, field):
    url = f"{server.url}/v1/{route}"
    if isinstance(body, str):
        response = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=60)
    else:
        response = requests.post(url, json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"]


def test_the_server_keeps_answering_after_bad_requests(server):
    for _ in range(5):
        requests.post(f"{server.url}/v1/agent", data="\x00garbage", timeout=60)
    assert requests.get(f"{server.url}/healthz", timeout=30).status_code == 200
    response = _agent(
        server, task="svamp", question="Tom has 3 apples and buys 4 more. How many?", max_turns=1
    )
    assert response.status_code == 200 and response.json()["turns"] == 1


def _calculator_replicas() -> list[tuple[str, str]]:
    """``(namespace, name)`` of every live calculator replica actor."""
    import ray

    return sorted(
        (a["namespace"], a["name"])
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::") and "tool-calculate" in a["name"]
    )


def test_a_calculator_replica_killed_with_a_call_in_flight_costs_no_request(server, tmp_path):
    import ray

    before = _calculator_replicas()
    assert before, "no calculator replica found"
    replicas = [ray.get_actor(name, namespace=namespace) for namespace, name in before]
    entered = tmp_path / "calculate-entered"

    def hold_calls(_replica, marker: str) -> None:
        """Runs inside a calculator replica: from now on a call there marks ``marker`` and stays."""
        import time
        from pathlib import Path

        from nat_ray import tools

        def held(argument: str) -> str:
            Path(marker).touch()
            time.sleep(600)  # until the test kills this replica
            return "unreachable"

        tools.REGISTRY["calculate"] = held

    ray.get([replica.__ray_call__.remote(hold_calls, str(entered)) for replica in replicas])
    questions = get_task("gsm8k").load("test", limit=6)
    statuses: list[int] = []
    bodies: list[dict] = []

    def client(i: int) -> None:
        response = _agent(
            server, task="gsm8k", question=questions[i].question, seed=i, temperature=0.7, max_turns=2
        )
        statuses.append(response.status_code)
        if response.status_code == 200:
            bodies.append(response.json())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(questions))]
    for thread in threads:
        thread.start()
    deadline = time.time() + REQUEST_TIMEOUT_S
    while time.time() < deadline and not entered.exists() and any(t.is_alive() for t in threads):
        time.sleep(0.1)
    assert entered.exists(), "no agent's tool call reached a calculator replica"
    for replica in replicas:  # each holds the calls it was sent
        ray.kill(replica, no_restart=True)
    for thread in threads:
        thread.join(timeout=REQUEST_TIMEOUT_S)
    assert statuses == [200] * len(questions)
    assert any(t["role"] == "user" for b in bodies for t in b["trajectory"]), "no tool call was made at all"
    deadline = time.time() + 180
    while time.time() < deadline and not (set(_calculator_replicas()) - set(before)):
        time.sleep(1)
    assert set(_calculator_replicas()) - set(before), "Serve did not replace the killed replica"
    response = _agent(server, task="gsm8k", question="What is 12 times 12?", max_turns=2)
    assert response.status_code == 200


def test_eval_against_the_endpoint_writes_parquet_and_paper_tables(server, tmp_path):
    from nat_ray.cli import main

    out = tmp_path / "eval"
    status = main(
        [
            "eval",
            "--endpoint",
            server.url,
            "--tasks",
            "gsm8k,strategyqa",
            "--seeds",
            "0,1",
            "--limit",
            "1",
            "--output-dir",
            str(out),
            "--set",
            "agent.max_turns=2",
            "--set",
            "agent.max_new_tokens=48",
            "--set",
            "tools.search_corpus=" + SAMPLE_CORPUS,
        ]
    )
    assert status == 0
    rows = records.read_rows(out / "trajectories")
    assert len(rows) == 4 and {r[columns.TASK] for r in rows} == {"gsm8k", "strategyqa"}
    assert {r[columns.SEED] for r in rows} == {0, 1} and {r[columns.MODEL] for r in rows} == {server.lora}
    assert all(r[columns.TEMPERATURE] == 0.2 and 1 <= r[columns.TURNS] <= 2 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["tasks"]["gsm8k"]["acc_paper"]["values"]) == 2
    assert summary["math_average"]["tasks"] == ["gsm8k"]
    text = (out / "results.md").read_text()
    assert "| Scoring | GSM8K | Avg (1 of 4) |" in text and "## StrategyQA" in text


# --------------------------------------------------------------------------------------------
# Hot-loading (last: they publish into serve.lora_dir, which the model listings above expect empty)

HOT_QUESTION = [{"role": "user", "content": "What is 12 times 3? Answer with a number."}]


def _chat(server, model: str) -> requests.Response:
    body = {"model": model, "messages": HOT_QUESTION, "max_tokens": 16, "temperature": 0}
    return requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S)


def _model_ids(server) -> set[str]:
    return {m["id"] for m in requests.get(f"{server.url}/v1/models", timeout=30).json()["data"]}


def _llm_replicas() -> set[str]:
    """The names of the LLM deployment's replica actors now (a restarted replica has a new name)."""
    import ray

    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "LLMServer" in a["name"]}
    assert names, "no LLM replica found"
    return names


def test_an_adapter_published_while_serving_is_answered_by_the_same_server(server, hot_adapter):
    from nat_ray.serve.adapters import publish_adapter

    apples = {"task": "gsm8k", "question": "Tom has 3 bags of 4 apples. How many apples?", "temperature": 0}
    assert _model_ids(server) == {server.model, server.lora}  # lora_dir starts empty
    base = _chat(server, server.model)
    assert base.status_code == 200, base.text
    default_agent = _agent(server, **apples).json()
    replicas_before = _llm_replicas()

    publish_adapter(hot_adapter, server.lora_dir, "A")  # after the server started
    hot = f"{server.model}:A"
    assert _model_ids(server) == {server.model, server.lora, hot}
    tuned = _chat(server, hot)
    assert tuned.status_code == 200, tuned.text
    assert tuned.json()["usage"]["completion_tokens"] > 0
    assert tuned.json()["choices"][0]["message"]["content"] != base.json()["choices"][0]["message"]["content"]

    answer = _agent(server, model=hot, **apples)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model"] == hot and body["usage"]["completion_tokens"] > 0
    assert body["trajectory"] != default_agent["trajectory"]  # the episode ran on the adapter
    assert _llm_replicas() == replicas_before  # no replica was restarted to get there


def test_missing_and_unsafe_adapters_are_refused_before_loading(server):
    missing = _chat(server, f"{server.model}:missing")
    assert missing.status_code == 404 and "'missing'" in missing.json()["error"]["message"]
    assert missing.json()["error"]["param"] == "model"
    for model in (f"{server.model}:../x", f"{server.model}:a/b", f"{server.model}:..", "../../etc"):
        refused = _chat(server, model)
        assert refused.status_code == 400, (model, refused.text)
    agent_missing = _agent(server, task="gsm8k", question="What is 2 + 3?", model=f"{server.model}:missing")
    assert agent_missing.status_code == 404 and "'missing'" in agent_missing.json()["error"]["message"]
    assert (
        _agent(server, task="gsm8k", question="What is 2 + 3?", model=f"{server.model}:..\\x").status_code
        == 400
    )
    assert _agent(server, task="gsm8k", question="What is 2 + 3?", model="not-served").status_code == 404


@pytest.fixture(scope="module")
def traffic_round(server, tmp_path_factory) -> dict:
    """One loop round on what this server captured (traffic only), publishing into its lora_dir."""
    from nat_ray.experiment.loop import run_loop

    cfg = from_dict(
        NatRayConfig,
        {
            "engine": {
                "model": "embedded",
                "max_model_len": 2048,
                "kv_cache_gb": 0.5,
                "max_num_seqs": 8,
                "max_lora_rank": LORA_RANK,
            },
            "agent": {"max_turns": 2, "max_new_tokens": 32},
            "train": {
                "mode": "lora",
                "lora_rank": LORA_RANK,
                "lora_alpha": 16,
                "max_length": 1024,
                "packing": False,  # a handful of episodes would pack into one row: one per worker needs two
                "global_batch_size": 2,
                "micro_batch_size": 1,
                "num_workers": 2,
                "warmup_ratio": 0.0,
                "zero_stage": 2,
                "max_steps": 1,
            },
            "eval": {"tasks": ["gsm8k"], "split": "test", "limit": 2, "seeds": [0]},
            "loop": {
                "name": "traffic",
                "runs_dir": str(tmp_path_factory.mktemp("runs")),
                "rounds": 1,
                "evaluate_base": False,
                "traffic_dir": server.capture_dir,
                "traffic_only": True,
                "publish_dir": server.lora_dir,
            },
        },
    )
    return run_loop(cfg)


def test_a_traffic_round_trains_on_the_captured_episodes_and_publishes_to_the_server(server, traffic_round):
    (round0,) = traffic_round["rounds"]
    counts = round0["traffic"]
    # The capture test's feedback labelled the episode asked without gold; the others carried theirs.
    assert counts["feedback"] >= 1 and counts["gold"] >= 2, counts
    assert (
        counts["new"]
        == counts["episodes"]
        == sum(counts[k] for k in ("feedback", "gold", "judge", "unlabelled"))
    )
    assert (
        round0["collected_with"] == "traffic" and round0["trained_on"] == counts["feedback"] + counts["gold"]
    )
    assert round0["published"] == f"{server.lora_dir}/traffic-round-0"
    assert f"{server.model}:traffic-round-0" in _model_ids(server)


def test_a_canary_takes_its_share_is_judged_by_labels_and_is_promoted_without_a_restart(
    server, hot_adapter, traffic_round, tmp_path
):
    """Capture -> feedback -> a traffic round -> publish -> canary -> promote. Last in the module: the
    promoted adapter answers unnamed requests from here on."""
    import shutil

    from nat_ray.serve.adapters import AdapterExists, publish_adapter

    canary = f"{server.model}:traffic-round-0"  # the traffic round's adapter, published into lora_dir
    assert publish_adapter(hot_adapter, server.lora_dir, "A") == f"{server.lora_dir}/A"  # same weights: no-op
    assert publish_adapter(hot_adapter, server.lora_dir, "A") == f"{server.lora_dir}/A"  # same weights: no-op

    def post(path: str, **body) -> requests.Response:
        return requests.post(f"{server.url}{path}", json=body, timeout=60)

    assert post("/v1/canary/promote").status_code == 409  # nothing on trial yet
    assert post("/v1/canary", adapter="missing", share=0.5).status_code == 404
    assert post("/v1/canary", adapter="traffic-round-0", share=1.5).status_code == 400
    started = post("/v1/canary", adapter="traffic-round-0", share=0.5)
    assert started.status_code == 200 and started.json()["canary"] == canary, started.text

    # Under load: other weights under the served name are refused, so no answer can come from a stale copy.
    other = tmp_path / "other"
    shutil.copytree(hot_adapter, other)
    (other / "adapter_model.safetensors").write_bytes(b"other weights")
    questions = [(f"What is {a} + {b}?", a + b) for a, b in zip(range(2, 18), range(5, 21))]
    with ThreadPoolExecutor(len(questions)) as pool:
        futures = [
            pool.submit(_agent, server, task="gsm8k", question=q, gold=g, max_turns=1, max_tokens=16)
            for q, g in questions
        ]
        with pytest.raises(AdapterExists, match="already holds other weights"):
            publish_adapter(other, server.lora_dir, "A")
        answers = [f.result() for f in futures]
    failed = [
        (a.status_code, a.json().get("model"), a.json().get("error")) for a in answers if a.status_code != 200
    ]
    assert not failed, failed
    models = [a.json()["model"] for a in answers]
    assert set(models) == {server.lora, canary}, models  # both answered (all on one side: p = 2^-15)
    # Each model asks as its own card says: the round's adapter at 0 shots, without demonstration turns.
    prompts = {a.json()["model"]: a.json()["prompt"] for a in answers}
    assert len(prompts[canary]) < len(prompts[server.lora])

    report = requests.get(f"{server.url}/v1/canary", timeout=30).json()
    for model in (server.lora, canary):
        stats = report["models"][model]
        assert stats["episodes"] == stats["labelled"] == models.count(model)  # every request had its gold
        assert 0.0 <= stats["interval"][0] <= stats["interval"][1] <= 1.0
    assert report["verdict"] in ("better", "worse", "within noise")
    # Feedback on a canary episode relabels it.
    episode = next(a.json() for a in answers if a.json()["model"] == canary)
    before = report["models"][canary]["successes"] - int(episode["correct"]["robust"])
    assert post("/v1/feedback", episode_id=episode["episode_id"], score=1.0).status_code == 200
    after = requests.get(f"{server.url}/v1/canary", timeout=30).json()["models"][canary]
    assert after["successes"] == before + 1 and after["labelled"] == report["models"][canary]["labelled"]

    promoted = post("/v1/canary/promote")
    assert promoted.status_code == 200 and promoted.json()["incumbent"] == canary, promoted.text
    again = [
        _agent(server, task="gsm8k", question="What is 1 + 1?", max_turns=1, max_tokens=8) for _ in range(3)
    ]
    assert [a.json()["model"] for a in again] == [canary] * 3
    assert requests.get(f"{server.url}/healthz", timeout=30).json()["model"] == canary
    assert post("/v1/canary/rollback").status_code == 409


def test_the_served_agent_answers_a_users_own_tasks_and_no_other(server):
    """The example tasks (configured by file) answer by name with their own prompt and tools; the MCP
    task's tool runs in a Serve deployment of its own, connected to the example's server. A task that
    is not configured, or a path, is refused. After the traffic round, so that the captured episodes it
    trains on stay the built-in tasks' the earlier tests sent."""
    from ray import serve

    from nat_ray.serve.app import APP_NAME

    question = {"question": "How many meters are in 3.5 kilometers?", "gold": "3500", "max_turns": 2}
    answer = _agent(server, task="unit_convert", **question)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["task"] == "unit_convert" and body["turns"] >= 1
    assert body["prompt"][0]["content"].startswith("Convert units with interleaving Thought")
    assert body["correct"]["robust"] in (True, False)
    handle = serve.get_deployment_handle("tool-convert_units", APP_NAME)
    assert handle.call.remote("convert_units", "3.5 km to m").result().observation == "3500"
    mcp_answer = _agent(server, task="mcp_units", **question)
    assert mcp_answer.status_code == 200, mcp_answer.text
    assert "convert_units[VALUE UNIT to UNIT]" in mcp_answer.json()["prompt"][0]["content"]
    # word_math: a task file of the repository this server was not configured with.
    for task in ("word_math", UNIT_CONVERT_TASK, "../examples/unit_convert/task.yaml"):  # never a path
        refused = _agent(server, task=task, **question)
        assert refused.status_code == 422, refused.text
        assert "unknown task" in refused.json()["error"]["message"]
