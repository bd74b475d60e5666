"""The serving stage's pure parts: request validation, episodes from requests, answers, the shared agent loop.

Ray Serve itself runs in ``tests/integration/test_serve.py``.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from nat_ray.agent import new_episode
from nat_ray.config import AgentConfig, ServeConfig
from nat_ray.react import Generation, LocalTools
from nat_ray.serve.agent_loop import AgentLoop
from nat_ray.serve.api import AgentRequest, agent_response, episode_for, response_status, validation_error
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
    assert agent_response(ep, "gsm8k", "m", gold=4)["correct"] == {"paper": False, "robust": True, "f1": None}


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


EXAMPLE_TASK = str(Path(__file__).resolve().parents[1] / "examples" / "unit_convert" / "task.yaml")


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
