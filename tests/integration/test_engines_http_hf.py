"""The HTTP teacher engine against a real vLLM OpenAI-compatible server, and the transformers baseline.

One ``vllm.entrypoints.openai.api_server`` subprocess on the embedded model serves the whole
module (it takes about a minute to start on the CPU build); a finalizer always stops it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import requests
from helpers import free_port  # tests/helpers.py

from nat_ray.agent import new_episode
from nat_ray.config import AgentConfig, EngineConfig
from nat_ray.core.react import CONTEXT_OVERFLOW, FAILURE_REASONS, Sampling, Stepper
from nat_ray.tasks import get_task

pytestmark = pytest.mark.integration

STARTUP_DEADLINE_S = 600
LONG_QUESTION = "How many? " + "one two three four " * 600  # far beyond max_model_len=2048


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (it forks an engine core), then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def vllm_server(embedded_path, tmp_path_factory):
    """Base URL (``http://127.0.0.1:PORT/v1``) of a vLLM CPU server on the embedded model."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm_server") / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        embedded_path,
        "--dtype",
        "float32",
        "--max-model-len",
        "2048",
        "--enforce-eager",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-uvicorn-access-log",
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    base_url = f"http://127.0.0.1:{port}/v1"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{base_url}/models", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass  # not listening yet
            if time.monotonic() > deadline:
                pytest.fail(
                    f"vLLM server not up after {STARTUP_DEADLINE_S} s:\n{log_path.read_text()[-3000:]}"
                )
            time.sleep(2)
        yield base_url
    finally:
        stop_process_group(proc)


@pytest.fixture(scope="module")
def openai_engine(vllm_server, embedded_path):
    from nat_ray.engines.openai_engine import OpenAIEngine

    cfg = EngineConfig(
        model=embedded_path, backend="openai", base_url=vllm_server, max_retries=2, request_timeout_s=300
    )
    with OpenAIEngine(cfg) as engine:
        yield engine


@pytest.fixture(scope="module")
def hf_engine(embedded_path):
    from nat_ray.engines.hf_engine import HFEngine

    engine = HFEngine(EngineConfig(model=embedded_path, backend="hf", device="cpu", max_model_len=2048))
    yield engine
    engine.close()


def assert_sane(ep, max_turns: int) -> None:
    assert ep.done and 1 <= ep.turns <= max_turns
    assert ep.finished or ep.failure_reason in FAILURE_REASONS
    assert ep.prompt_tokens > 0 and ep.completion_tokens > 0


# ---------------------------------------------------------------------------------------------
# HFEngine: transformers generate, one conversation at a time (first, before the server takes CPU)


def test_hf_engine_honours_max_tokens(hf_engine):
    conv = [{"role": "user", "content": "Write a long story about a dragon."}]
    (gen,) = hf_engine.generate([conv], [Sampling(max_tokens=8)])
    assert gen.finish_reason == "length" and gen.completion_tokens <= 8
    assert gen.prompt_tokens > 0 and gen.text


def test_hf_engine_cuts_the_stop_string(hf_engine):
    conv = [{"role": "user", "content": "List three fruits, one per line."}]
    free, stopped = hf_engine.generate(
        [conv, conv], [Sampling(max_tokens=24, stop=()), Sampling(max_tokens=24, stop=("\n",))]
    )
    assert "\n" in free.text  # the model does write a newline here, so the stop string matters
    assert "\n" not in stopped.text and stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index("\n")]  # greedy: the same text up to the stop
    assert stopped.completion_tokens < free.completion_tokens


def test_hf_engine_looks_for_stop_strings_in_the_new_text_only(hf_engine):
    # The prompt ends in "assistant\n"; a stop string of "\n" + the turn's first word must not end
    # the turn at once (as vLLM, which matches the output only; the agent's stop is "\nObservation:").
    conv = [{"role": "user", "content": "List three fruits, one per line."}]
    (free,) = hf_engine.generate([conv], [Sampling(max_tokens=24, stop=())])
    first_word = free.text.split()[0]
    stop = "\n" + first_word
    (gen,) = hf_engine.generate([conv], [Sampling(max_tokens=24, stop=(stop,))])
    assert gen.completion_tokens > 2 and gen.text.startswith(first_word)
    cut = free.text.find(stop)
    assert gen.text == (free.text if cut == -1 else free.text[:cut])  # greedy: the same text


def test_hf_engine_seeded_sampling_repeats(hf_engine):
    conv = [{"role": "user", "content": "Tell me about the sea."}]
    s = Sampling(temperature=1.0, top_p=0.95, max_tokens=12, seed=123, stop=())
    first, second = hf_engine.generate([conv, conv], [s, s])
    assert first.text == second.text and first.completion_tokens == second.completion_tokens


def test_hf_engine_context_overflow_spares_the_rest(hf_engine):
    short = [{"role": "user", "content": "What is 2 + 2?"}]
    huge = [{"role": "user", "content": LONG_QUESTION}]
    over, ok = hf_engine.generate([huge, short], [Sampling(max_tokens=4)] * 2)
    assert over.finish_reason == CONTEXT_OVERFLOW and over.prompt_tokens > 2048 and over.text == ""
    assert ok.finish_reason in ("stop", "length") and ok.completion_tokens > 0


def test_hf_engine_drives_an_episode(hf_engine):
    task = get_task("gsm8k")
    cfg = AgentConfig(max_turns=2, max_new_tokens=64)
    ep = new_episode(task, "Tom has 5 apples and buys 7 more. How many apples does he have?", cfg, "hf")
    Stepper(hf_engine).run([ep])
    assert_sane(ep, 2)


# ---------------------------------------------------------------------------------------------
# OpenAIEngine against vLLM's OpenAI-compatible server


def test_server_lists_the_model(openai_engine, embedded_path):
    assert openai_engine.models() == [embedded_path]


def test_http_engine_limits_stops_seeds_and_overflows(openai_engine):
    story = [{"role": "user", "content": "Write a long story about a dragon."}]
    fruits = [{"role": "user", "content": "List three fruits, one per line."}]
    sampled = Sampling(temperature=1.0, max_tokens=16, seed=7, stop=())
    limited, stopped, s1, s2, overflow = openai_engine.generate(
        [story, fruits, story, story, [{"role": "user", "content": LONG_QUESTION}]],
        [Sampling(max_tokens=8), Sampling(max_tokens=48, stop=("\n",)), sampled, sampled, Sampling()],
    )
    assert limited.finish_reason == "length" and 0 < limited.completion_tokens <= 8
    assert limited.prompt_tokens > 0 and limited.text
    assert "\n" not in stopped.text and stopped.finish_reason == "stop"
    assert s1.text == s2.text and s1.completion_tokens > 0
    assert overflow.finish_reason == CONTEXT_OVERFLOW and "2048" in overflow.error


def test_stepper_runs_episodes_over_http(openai_engine):
    task = get_task("gsm8k")
    questions = task.load("test", limit=2)
    cfg = AgentConfig(task="gsm8k", temperature=0.7, max_turns=3, max_new_tokens=96)
    episodes = [new_episode(task, q.question, cfg, q.id) for q in questions]
    overflow = new_episode(task, LONG_QUESTION, cfg, "too-long")
    Stepper(openai_engine).run([*episodes, overflow])
    for ep in episodes:
        assert_sane(ep, 3)
    assert overflow.failure_reason == CONTEXT_OVERFLOW and overflow.turns == 1


def test_cli_agent_with_the_openai_backend(vllm_server, embedded_path):
    cmd = [
        sys.executable,
        "-m",
        "nat_ray.cli",
        "agent",
        "--set",
        "engine.backend=openai",
        "--set",
        f"engine.base_url={vllm_server}",
        "--set",
        f"engine.model={embedded_path}",
        "--set",
        "agent.max_new_tokens=96",
        "--json",
        "-",
        "--max-turns",
        "2",
        "What is 2+3?",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout[out.stdout.index("{") :])
    assert 1 <= result["turns"] <= 2
    assert result["finished"] or result["failure_reason"] in FAILURE_REASONS
    assert result["failure_reason"] != "generation_error", out.stderr[-3000:]


def test_rollout_with_a_teacher_over_http(vllm_server, embedded_path, tmp_path, local_ray):
    """Stage 1 with engine.backend=openai: Ray Data actors call the real local server."""
    from nat_ray.config import NatRayConfig, from_dict
    from nat_ray.core import nat_data as columns
    from nat_ray.rollout.run import run_rollout

    cfg = from_dict(
        NatRayConfig,
        {
            "engine": {
                "backend": "openai",
                "base_url": vllm_server,
                "model": embedded_path,
                "max_concurrency": 4,
            },
            "agent": {"max_turns": 2, "max_new_tokens": 48},
            "rollout": {
                "tasks": ["gsm8k"],
                "limit": 3,
                "temperatures": [0.5],
                "output_dir": str(tmp_path / "t"),
            },
        },
    )
    result = run_rollout(cfg, progress=False)
    rows = result.summary
    assert result.total == 3 and rows[0]["count"] == 3
    from nat_ray.core.records import read_rows

    for row in read_rows(tmp_path / "t" / "trajectories"):
        assert row[columns.ENGINE] == "openai" and row[columns.MODEL] == embedded_path
        assert row[columns.FAILURE_REASON] != "generation_error" and row[columns.PROMPT_TOKENS] > 0
