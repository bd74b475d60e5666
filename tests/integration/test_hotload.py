"""Hot-loading adapters (issue 17): a running engine and a running server use an adapter published after they started.

One adapter (a tiny peft LoRA of the embedded model with random B, so greedy answers change) is
made once. The rollout engine test runs first and closes its engine before the server starts, so
the machine holds one vLLM at a time.
"""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import pytest
import requests
from helpers import free_port  # tests/helpers.py

from nat_ray.config import NatRayConfig, from_dict

pytestmark = pytest.mark.integration

TIMEOUT_S = 300
MODEL_ID = "smol"
QUESTION = [{"role": "user", "content": "What is 12 times 3? Answer with a number."}]
BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "hotload.py"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, embedded_path) -> Path:
    spec = importlib.util.spec_from_file_location("bench_hotload", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.make_adapter(embedded_path, tmp_path_factory.mktemp("adapters") / "A")


def test_a_running_rollout_engine_switches_to_an_adapter_without_a_new_engine(
    local_ray, embedded_path, adapter
):
    # In a process of its own (a Ray task whose worker exits after it): closing an in-process vLLM
    # engine tears down vLLM's process-wide state, which the session's shared engine still uses.
    # Defined here so that it is pickled by value: Ray's workers cannot import this test module.
    def _switch_adapter(model_path: str, adapter: str) -> dict:
        from nat_ray.config import EngineConfig
        from nat_ray.core.react import Sampling
        from nat_ray.engines.vllm_engine import VLLMEngine

        engine = VLLMEngine(EngineConfig(model=model_path, max_model_len=1024, kv_cache_gb=1, lora=True))
        try:
            llm = engine.llm
            greedy = [Sampling(temperature=0.0, max_tokens=16, seed=0)]
            base = engine.generate([QUESTION], greedy)[0]
            engine.load_adapter(adapter)
            tuned = engine.generate([QUESTION], greedy)[0]
            same_engine = engine.llm is llm
            engine.load_adapter(None)  # and back to the base model
            return {
                "base": base.text,
                "tuned": tuned.text,
                "tuned_tokens": tuned.completion_tokens,
                "same_engine": same_engine,
                "back_to_base": engine.lora_request is None,
            }
        finally:
            engine.close()

    run = local_ray.remote(num_cpus=1, max_calls=1)(_switch_adapter)
    got = local_ray.get(run.remote(embedded_path, str(adapter)), timeout=TIMEOUT_S)
    assert got["same_engine"]  # the same vLLM engine, not a new one
    assert got["tuned_tokens"] > 0 and got["tuned"] != got["base"]
    assert got["back_to_base"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, embedded_path, local_ray):
    from ray import serve

    from nat_ray.serve.app import APP_NAME, build_app

    port = free_port()
    lora_dir = tmp_path_factory.mktemp("lora_dir")
    cfg = from_dict(
        NatRayConfig,
        {
            "engine": {"model": embedded_path, "max_model_len": 1024, "kv_cache_gb": 1, "max_num_seqs": 16},
            "agent": {"max_turns": 2, "max_new_tokens": 32},
            "serve": {
                "model_id": MODEL_ID,
                "lora_dir": str(lora_dir),
                "port": port,
                "tool_max_replicas": 1,
                "tasks": ["gsm8k"],
                "request_timeout_s": TIMEOUT_S,
            },
        },
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
        yield types.SimpleNamespace(url=f"http://127.0.0.1:{port}", lora_dir=lora_dir)
    finally:
        serve.shutdown()


def _chat(server, model: str) -> requests.Response:
    body = {"model": model, "messages": QUESTION, "max_tokens": 16, "temperature": 0}
    return requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=TIMEOUT_S)


def _agent(server, model: str | None) -> requests.Response:
    body = {"task": "gsm8k", "question": "Tom has 3 bags of 4 apples. How many apples?", "temperature": 0}
    if model is not None:
        body["model"] = model
    return requests.post(f"{server.url}/v1/agent", json=body, timeout=TIMEOUT_S)


def _model_ids(server) -> set[str]:
    return {m["id"] for m in requests.get(f"{server.url}/v1/models", timeout=30).json()["data"]}


def test_an_adapter_published_while_serving_is_answered_by_the_same_server(server, adapter):
    from nat_ray.serve.adapters import publish_adapter

    assert _model_ids(server) == {MODEL_ID}  # lora_dir starts empty
    base = _chat(server, MODEL_ID)
    assert base.status_code == 200, base.text
    base_agent = _agent(server, None).json()
    replicas_before = _llm_replicas()

    publish_adapter(adapter, server.lora_dir, "A")  # after the server started
    assert _model_ids(server) == {MODEL_ID, f"{MODEL_ID}:A"}
    tuned = _chat(server, f"{MODEL_ID}:A")
    assert tuned.status_code == 200, tuned.text
    assert tuned.json()["usage"]["completion_tokens"] > 0
    assert tuned.json()["choices"][0]["message"]["content"] != base.json()["choices"][0]["message"]["content"]

    answer = _agent(server, f"{MODEL_ID}:A")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model"] == f"{MODEL_ID}:A" and body["usage"]["completion_tokens"] > 0
    assert body["trajectory"] != base_agent["trajectory"]  # the episode ran on the adapter
    assert _llm_replicas() == replicas_before  # no replica was restarted to get there


def test_missing_and_unsafe_adapters_are_refused_before_loading(server):
    missing = _chat(server, f"{MODEL_ID}:missing")
    assert missing.status_code == 404 and "'missing'" in missing.json()["error"]["message"]
    assert missing.json()["error"]["param"] == "model"
    for model in (f"{MODEL_ID}:../x", f"{MODEL_ID}:a/b", f"{MODEL_ID}:..", "../../etc"):
        refused = _chat(server, model)
        assert refused.status_code == 400, (model, refused.text)
    agent_missing = _agent(server, f"{MODEL_ID}:missing")
    assert agent_missing.status_code == 404 and "'missing'" in agent_missing.json()["error"]["message"]
    assert _agent(server, f"{MODEL_ID}:..\\x").status_code == 400
    assert _agent(server, "not-served").status_code == 404


def _llm_replicas() -> set[str]:
    """The names of the LLM deployment's replica actors now (a restarted replica has a new name)."""
    import ray

    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "LLMServer" in a["name"]}
    assert names, "no LLM replica found"
    return names
