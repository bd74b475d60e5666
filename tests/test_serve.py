"""The serving stage's pure parts: request validation, episodes from requests, answers, the shared agent loop.

Ray Serve itself runs in ``tests/integration/test_serve.py``.
"""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from fastapi import Request
from helpers import UNIT_CONVERT_TASK  # tests/helpers.py
from pydantic import ValidationError

from nat_ray.agent import new_episode
from nat_ray.config import AgentConfig, ServeConfig
from nat_ray.core.react import Generation, LocalTools
from nat_ray.serve.agent_loop import AgentLoop
from nat_ray.serve.api import (
    AgentRequest,
    agent_response,
    episode_for,
    gold_score,
    response_status,
    validation_error,
)
from nat_ray.tasks import get_task

LIMITS = ServeConfig(max_question_chars=20, max_turns_limit=5, max_tokens_limit=64)


def _validate(body: str) -> AgentRequest:
    return AgentRequest.model_validate_json(body, context=LIMITS)


def _error(body: str) -> tuple[int, dict]:
    with pytest.raises(ValidationError) as info:
        _validate(body)
    return validation_error(info.value)


def test_a_minimal_request_takes_the_server_defaults():
    req = _validate('{"task": "GSM8K", "question": "2 + 2?"}')
    assert req.task == "gsm8k"
    assert (req.max_turns, req.temperature, req.seed, req.gold) == (None, None, None, None)


@pytest.mark.parametrize(
    "body, status, field, words",
    [
        ('{"question": "2 + 2?"}', 422, "task", "Field required"),
        ('{"task": "gsm8k", "question": 5}', 422, "question", "valid string"),
        ('{"task": "chess", "question": "e4?"}', 422, "task", "unknown task 'chess'"),
        ('{"task": "gsm8k", "question": "' + "x" * 21 + '"}', 422, "question", "limit is 20"),
        ('{"task": "gsm8k", "question": "   "}', 422, "question", "blank"),
        ('{"task": "gsm8k", "question": "q", "max_turns": 6}', 422, "max_turns", "limit of 5"),
        ('{"task": "gsm8k", "question": "q", "max_tokens": 65}', 422, "max_tokens", "limit of 64"),
        ('{"task": "gsm8k", "question": "q", "temperature": 2.5}', 422, "temperature", "less than or equal"),
        ('{"task": "gsm8k", "question": "q", "max_turns": "3"}', 422, "max_turns", "valid integer"),
        ('{"task": "gsm8k", "question": "q", "gold": "many"}', 422, "gold", "one number"),
        ('{"task": "strategyqa", "question": "q", "gold": "maybe"}', 422, "gold", "yes/no"),
        (
            '{"task": "hotpotqa", "question": "q", "gold": 5}',
            422,
            "gold",
            "hotpotqa answer must be text, got 5",
        ),
        ('{"task": "gsm8k", "question": "q", "gold": true}', 422, "gold", "gsm8k answer must be one number"),
        ('{"task": "gsm8k", "question": "q", "qestion": "typo"}', 422, "qestion", "Extra inputs"),
        ('{"task": "gsm8k", "question": ', 400, "body", "Invalid JSON"),
        ("[1, 2]", 422, "body", "object"),
    ],
)
def test_bad_requests_name_the_field(body, status, field, words):
    got_status, payload = _error(body)
    assert got_status == status
    assert payload["error"]["param"] == field
    assert payload["error"]["message"].startswith(f"{field}: ")
    assert words in payload["error"]["message"]
    assert payload["error"]["code"] == status


def test_every_problem_is_reported_at_once():
    _, payload = _error('{"task": "chess", "question": 5, "seed": -1}')
    assert [d["field"] for d in payload["detail"]] == ["task", "question", "seed"]


def test_request_overrides_reach_the_episode_and_the_same_request_samples_the_same_episode():
    base = AgentConfig(max_turns=7, max_new_tokens=128, temperature=0.0, seed=0)
    req = _validate('{"task": "svamp", "question": "1 + 1?", "max_turns": 3, "temperature": 0.7, "seed": 5}')
    ep = episode_for(base, req)
    assert ep.max_turns == 3 and ep.tools == ("calculate",)
    assert (ep.sampling.temperature, ep.sampling.seed, ep.sampling.max_tokens) == (0.7, 5, 128)
    assert episode_for(base, req).id == ep.id
    other = _validate('{"task": "svamp", "question": "1 + 1?", "seed": 6}')
    assert episode_for(base, other).id != ep.id
    named = _validate('{"task": "svamp", "question": "1 + 1?", "id": "mine"}')
    assert episode_for(base, named).id == "mine"


def test_the_answer_carries_both_verdicts_only_with_a_gold():
    ep = new_episode(get_task("gsm8k"), "2 + 2?", AgentConfig(), "e1")
    ep.answer, ep.finished = "4.0", True
    body = agent_response(ep, "gsm8k", "m")
    assert "correct" not in body
    assert body["answer"] == "4.0" and body["finished"] and body["usage"]["total_tokens"] == 0
    scored = agent_response(ep, "gsm8k", "m", gold_score("gsm8k", ep.answer, 4))
    assert scored["correct"] == {"paper": False, "robust": True, "f1": None}
    assert gold_score("gsm8k", ep.answer, None) is None


def test_an_episode_cut_short_by_the_llm_deployment_is_a_503_not_a_wrong_answer():
    ep = new_episode(get_task("gsm8k"), "2 + 2?", AgentConfig(), "e1")
    assert response_status(ep) == 200
    ep.failure_reason = "turn_cap"
    assert response_status(ep) == 200
    ep.failure_reason = "generation_error"
    assert response_status(ep) == 503


class GatedEngine:
    """A batched engine whose first call waits for a gate, so requests pile up meanwhile.

    ``holding`` is set once that first call has its batch and waits at the gate.
    """

    def __init__(self, scripts: dict[str, list[str]]) -> None:
        self.scripts = scripts
        self.batches: list[list[str]] = []
        self.holding = threading.Event()
        self.gate = threading.Event()

    def _label(self, conversation: list[dict]) -> str:
        return next(k for k in self.scripts if any(f"Question: {k}." in m["content"] for m in conversation))

    def generate(self, conversations, sampling):
        if not self.batches:
            self.holding.set()
            self.gate.wait(timeout=10)
        labels = [self._label(c) for c in conversations]
        self.batches.append(sorted(labels))
        return [Generation(self.scripts[k].pop(0), 3, 2) for k in labels]

    def close(self) -> None:
        pass


def test_requests_that_arrive_while_the_loop_steps_share_its_next_batch():
    engine = GatedEngine(
        {
            "qa": ["Action: calculate[2+2]", "Action: finish[4]"],
            "qb": ["Action: finish[b]"],
            "qc": ["Action: finish[c]"],
        }
    )
    loop = AgentLoop(engine, LocalTools({"calculate": lambda a: "4"}), max_open=8, stop_on_tool_error=False)
    cfg = AgentConfig(shots=0)

    async def scenario():
        first = loop.submit(new_episode(get_task("gsm8k"), "qa", cfg, "a"))
        assert await asyncio.to_thread(engine.holding.wait, 10), "the loop never called the engine"
        # The loop is inside its first generate call; these wait in its inbox until that returns.
        later = [loop.submit(new_episode(get_task("gsm8k"), q, cfg, q)) for q in ("qb", "qc")]
        engine.gate.set()
        return await asyncio.wait_for(asyncio.gather(first, *later), timeout=10)

    try:
        a, b, c = asyncio.run(scenario())
    finally:
        loop.stop()
    assert (a.answer, b.answer, c.answer) == ("4", "b", "c")
    assert engine.batches == [["qa"], ["qa", "qb", "qc"]]
    assert loop.finished == 3 and loop.open == 0 and loop.queued == 0


def test_a_bug_in_a_step_fails_its_requests_and_the_loop_keeps_serving():
    class Broken:
        calls = 0

        def generate(self, conversations, sampling):
            Broken.calls += 1
            if Broken.calls == 1:
                raise KeyError("bug")
            return [Generation("Action: finish[ok]") for _ in conversations]

        def close(self) -> None:
            pass

    loop = AgentLoop(Broken(), LocalTools(), max_open=4, stop_on_tool_error=False)
    cfg = AgentConfig(shots=0)

    async def scenario():
        with pytest.raises(KeyError):
            await asyncio.wait_for(loop.submit(new_episode(get_task("gsm8k"), "q1", cfg, "1")), timeout=10)
        ep = await asyncio.wait_for(loop.submit(new_episode(get_task("gsm8k"), "q2", cfg, "2")), timeout=10)
        return ep, loop.alive

    try:
        ep, alive = asyncio.run(scenario())
    finally:
        loop.stop()
    assert ep.answer == "ok" and alive


@pytest.mark.parametrize(
    "cores, setting, expected",
    [(2, None, "0"), (4, None, "0"), (16, None, "1"), (2, 1, "1"), (16, 0, "0")],
)
def test_a_cpu_replica_computes_on_every_core_of_a_small_machine(monkeypatch, cores, setting, expected):
    import os

    from nat_ray.config import NatRayConfig, from_dict
    from nat_ray.serve.app import llm_config

    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    cfg = from_dict(NatRayConfig, {"serve": {"llm_cpu_reserved_cores": setting}})
    env = llm_config(cfg, "/models/m", "m").runtime_env["env_vars"]
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == expected
    assert env["VLLM_CPU_KVCACHE_SPACE"] == str(max(1, round(cfg.engine.kv_cache_gb)))


def test_a_gpu_replica_leaves_vllm_cpu_settings_alone():
    from nat_ray.config import NatRayConfig, from_dict
    from nat_ray.serve.app import llm_config

    cfg = from_dict(NatRayConfig, {"engine": {"device": "cuda"}, "serve": {"llm_num_gpus": 1}})
    llm = llm_config(cfg, "/models/m", "m")
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in llm.runtime_env["env_vars"]
    assert llm.placement_group_config["bundles"][0]["GPU"] == 1


def test_a_lora_replica_loads_its_adapter_and_engine_extra_has_the_last_word():
    from nat_ray.config import NatRayConfig, from_dict
    from nat_ray.serve.app import llm_config

    cfg = from_dict(NatRayConfig, {"engine": {"extra": {"block_size": 16, "max_lora_rank": 8}}})
    kwargs = llm_config(cfg, "/models/m", "m", "m-lora", "/adapters/a").engine_kwargs
    assert kwargs["lora_modules"] == [{"name": "m-lora", "path": "/adapters/a", "base_model_name": "m"}]
    assert kwargs["enable_lora"] and kwargs["max_lora_rank"] == 8 and kwargs["block_size"] == 16
    assert kwargs["enable_chunked_prefill"] is False and kwargs["dtype"] == "float32"  # CPU defaults


def test_a_cpu_lora_replica_padded_far_above_its_adapters_rank_says_what_to_set(tmp_path, caplog):
    import logging

    from nat_ray.config import NatRayConfig, from_dict
    from nat_ray.engines.vllm_args import adapter_rank, lora_rank_advice
    from nat_ray.serve.app import llm_config

    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "rank_pattern": {"q_proj": 12}}))
    assert adapter_rank(adapter) == 12 and adapter_rank(tmp_path / "missing") is None
    with caplog.at_level(logging.WARNING, logger="nat_ray.engines.vllm_args"):
        llm_config(from_dict(NatRayConfig, {}), "/models/m", "m", "m-lora", str(adapter))
    assert "set engine.max_lora_rank=16" in caplog.text and "about 4x" in caplog.text
    sized = from_dict(NatRayConfig, {"engine": {"max_lora_rank": 16}}).engine
    assert lora_rank_advice(sized, False, 12) is None  # already the smallest rank vLLM takes for it
    assert lora_rank_advice(from_dict(NatRayConfig, {}).engine, True, 12) is None  # GPU: padding is cheap


EXAMPLE_TASK = UNIT_CONVERT_TASK


@pytest.fixture
def example_task():
    """The example task registered (as a server does at start), and unregistered after the test."""
    from nat_ray.tasks import TASKS

    task = get_task(EXAMPLE_TASK)
    yield task
    TASKS.pop(task.name, None)


def test_a_request_names_only_the_tasks_the_server_was_started_with(example_task):
    own = ServeConfig(tasks=["unit_convert"])
    req = AgentRequest.model_validate_json(
        '{"task": "unit_convert", "question": "3 km in m?", "gold": 3000}', context=own
    )
    episode = episode_for(AgentConfig(shots=1), req)
    assert episode.prompt[0]["content"].startswith("Convert units") and "convert" in episode.tools
    for task in ("gsm8k", EXAMPLE_TASK, "../unit_convert"):  # not started with it; never a path
        body = '{"task": ' + json.dumps(task) + ', "question": "3 km in m?"}'
        with pytest.raises(ValidationError) as info:
            AgentRequest.model_validate_json(body, context=own)
        status, payload = validation_error(info.value)
        assert status == 422 and "this server answers: ['unit_convert']" in payload["error"]["message"]
    assert "unit_convert" not in ServeConfig().tasks  # the default server answers the six benchmarks


# The door (nat_ray.serve.guards): key, body size, roles, token cap, admission. The middleware runs
# on a small FastAPI app through starlette's in-process client: no Ray, no sockets.

KEY = "s3cret-key-\N{GREEK SMALL LETTER ALPHA}"


@pytest.fixture
def door_client():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from nat_ray.serve.guards import DoorRules, GuardMiddleware, Secret

    app = FastAPI()
    rules = {"now": DoorRules(Secret(KEY), max_body_bytes=100)}
    app.add_middleware(GuardMiddleware, rules=lambda: rules["now"])

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.post("/echo")
    async def echo(request: Request):
        return {"length": len(await request.body())}

    with TestClient(app) as client:
        client.rules = rules
        yield client


def _auth(key: str = KEY) -> dict:
    return {"Authorization": b"Bearer " + key.encode("utf-8")}


def test_without_the_key_every_path_is_a_401_with_an_openai_error(door_client):
    for method, path in [("get", "/healthz"), ("post", "/echo"), ("get", "/no/such/path")]:
        response = door_client.request(method, path)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer" in response.json()["error"]["message"]
    assert door_client.get("/no/such/path", headers=_auth()).status_code == 404


@pytest.mark.parametrize(
    "headers, params",
    [
        ({}, {"api_key": KEY}),  # the query string never counts
        ({"Authorization": "Bearer wrong"}, {}),
        ({"Authorization": "Bearer " + KEY[:-1].encode("utf-8").decode("latin-1")}, {}),  # a prefix
        ({"Authorization": "Basic " + KEY.encode("utf-8").decode("latin-1")}, {}),
        ({"Authorization": "Bearer"}, {}),
    ],
)
def test_a_wrong_or_misplaced_key_is_refused(door_client, headers, params):
    headers = {k: v.encode("latin-1") for k, v in headers.items()}
    assert door_client.get("/healthz", headers=headers, params=params).status_code == 401


def test_the_right_key_passes_whatever_the_scheme_case(door_client):
    assert door_client.get("/healthz", headers=_auth()).json() == {"status": "ok"}
    lower = {"authorization": b"bearer " + KEY.encode("utf-8")}
    assert door_client.get("/healthz", headers=lower).status_code == 200


def test_an_open_server_needs_no_key(door_client):
    from nat_ray.serve.guards import DoorRules

    door_client.rules["now"] = DoorRules(None, max_body_bytes=100)
    assert door_client.get("/healthz").status_code == 200


def test_a_body_over_the_limit_is_a_413_whether_declared_or_streamed(door_client):
    assert door_client.post("/echo", content=b"x" * 100, headers=_auth()).json() == {"length": 100}
    declared = door_client.post("/echo", content=b"x" * 101, headers=_auth())
    assert declared.status_code == 413 and declared.json()["error"]["param"] == "body"
    assert "serve.max_body_bytes" in declared.json()["error"]["message"]

    def chunks():  # no Content-Length: only the bytes read can tell
        for _ in range(5):
            yield b"y" * 40

    streamed = door_client.post("/echo", content=chunks(), headers=_auth())
    assert streamed.status_code == 413
    lying = door_client.post("/echo", content=b"z" * 150, headers={**_auth(), "Content-Length": "10"})
    assert lying.status_code in (400, 413)  # h11 itself may refuse the mismatch first


def test_the_key_never_shows_in_a_repr_and_a_blank_one_is_refused():
    from nat_ray.errors import ConfigError
    from nat_ray.serve.guards import Secret, api_key_from_env

    secret = api_key_from_env("NAT_KEY", {"NAT_KEY": f" {KEY} "})
    assert KEY not in repr(secret) and KEY not in str(secret) and KEY not in repr([secret])
    assert secret.matches(KEY.encode("utf-8")) and not secret.matches(None)
    assert api_key_from_env("NAT_KEY", {}) is None and api_key_from_env(None, {"NAT_KEY": "k"}) is None
    with pytest.raises(ConfigError, match=r"\$NAT_KEY is set but empty"):
        api_key_from_env("NAT_KEY", {"NAT_KEY": "  "})
    assert isinstance(secret, Secret)


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, None),
        (
            {"messages": [{"role": r, "content": "x"} for r in ("system", "developer", "assistant", "tool")]},
            None,
        ),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}]},
            "messages.1.role",
        ),
        ({"messages": [{"role": 5, "content": "a"}]}, "messages.0.role"),
        ({"messages": "hi"}, None),  # the request model names this one itself
        ({"messages": [{"content": "no role"}]}, None),
    ],
)
def test_an_unknown_chat_role_is_named(data, expected):
    from nat_ray.serve.guards import role_problem

    problem = role_problem(data)
    assert (problem[0] if problem else None) == expected
    if problem:
        assert problem[1].startswith(f"{expected}: unknown role") and "developer" in problem[1]


def test_a_request_without_max_tokens_gets_the_servers_limit():
    import types

    from nat_ray.serve.guards import cap_max_tokens

    fields = ("max_tokens", "max_completion_tokens")
    unbounded = types.SimpleNamespace(max_tokens=None, max_completion_tokens=None)
    assert cap_max_tokens(unbounded, 64, fields) and unbounded.max_tokens == 64
    for given in (
        {"max_tokens": 5, "max_completion_tokens": None},
        {"max_tokens": None, "max_completion_tokens": 7},
    ):
        body = types.SimpleNamespace(**given)
        assert not cap_max_tokens(body, 64, fields) and body.max_tokens == given["max_tokens"]
    completion = types.SimpleNamespace(max_tokens=None)  # no max_completion_tokens field at all
    assert cap_max_tokens(completion, 64, fields) and completion.max_tokens == 64


def test_admission_holds_the_ceiling_and_estimates_when_to_come_back():
    from nat_ray.serve.guards import MAX_RETRY_AFTER_S, Admission

    door = Admission(limit=3, concurrency=2)
    assert door.retry_after() == 1  # nothing measured yet
    assert [door.try_enter() for _ in range(4)] == [True, True, True, False]
    assert door.held == 3 and door.refused == 1
    door.leave(30.0)
    assert door.try_enter() and not door.try_enter()
    assert door.retry_after() == 15  # one of 2 running 30 s episodes ends about every 15 s
    door.leave(None)  # a request that never reached the loop frees its slot, measures nothing
    assert door.held == 2 and door.retry_after() == 15
    for _ in range(40):
        door.leave(1000.0)
    assert door.held == 0 and door.retry_after() == MAX_RETRY_AFTER_S
