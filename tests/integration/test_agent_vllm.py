"""The agent end to end on the real vLLM CPU engine and the embedded model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nat_ray.agent import new_episode
from nat_ray.config import AgentConfig
from nat_ray.core.react import CONTEXT_OVERFLOW, FAILURE_REASONS, LocalTools, Sampling, Stepper, parse_action
from nat_ray.paths import PACKAGE_DATA_DIR
from nat_ray.tasks import get_task

pytestmark = pytest.mark.integration


def test_batched_math_episodes_run_to_an_end(vllm_engine):
    task = get_task("gsm8k")
    questions = task.load("test", limit=4)
    cfg = AgentConfig(task="gsm8k", temperature=0.7, max_turns=3, max_new_tokens=96)
    episodes = [new_episode(task, q.question, cfg, q.id) for q in questions]
    Stepper(vllm_engine, LocalTools()).run(episodes)
    for ep in episodes:
        assert ep.done and 1 <= ep.turns <= 3
        assert ep.finished or ep.failure_reason in FAILURE_REASONS
        assert ep.prompt_tokens > 0 and ep.completion_tokens > 0
        for step in ep.steps:
            if step.action is not None and step.action.name == "calculate":
                assert step.observation is not None  # every tool call got its observation
            if step.error is None and step.action is not None:
                assert parse_action(step.text, task.tools) == step.action
        if ep.finished:
            assert isinstance(task.score(ep.answer, questions[0].gold).correct_robust, bool)


def test_same_seed_repeats_the_episode(vllm_engine):
    task = get_task("gsm8k")
    cfg = AgentConfig(temperature=0.9, max_turns=2, max_new_tokens=48, seed=11)
    q = "Tom has 5 apples and buys 7 more. How many apples does he have?"
    runs = [Stepper(vllm_engine).run([new_episode(task, q, cfg, "same")])[0] for _ in range(2)]
    assert [s.text for s in runs[0].steps] == [s.text for s in runs[1].steps]


def test_overlong_prompt_is_a_context_overflow_not_a_crash(vllm_engine):
    task = get_task("gsm8k")
    cfg = AgentConfig(max_turns=2, max_new_tokens=32)
    long_q = "How many? " + "one two three four " * 600  # far beyond max_model_len=2048
    short, huge = (new_episode(task, q, cfg, i) for i, q in (("s", "What is 2 + 2?"), ("h", long_q)))
    Stepper(vllm_engine).run([short, huge])
    assert huge.failure_reason == CONTEXT_OVERFLOW and short.turns >= 1


def test_engine_honours_stop_and_token_limits(vllm_engine):
    conv = [{"role": "user", "content": "Write a long story about a dragon."}]
    (gen,) = vllm_engine.generate([conv], [Sampling(max_tokens=8)])
    assert gen.completion_tokens <= 8 and gen.finish_reason == "length"


def test_cli_agent_hotpotqa_uses_the_search_tool(tmp_path):
    """`nat-ray agent --task hotpotqa` in a subprocess, like a user runs it (the engine starts anew)."""
    # The shipped 592-paragraph corpus: the full one takes minutes to embed the first time.
    corpus = PACKAGE_DATA_DIR / "hotpotqa" / "corpus_sample.jsonl.gz"
    cmd = [
        sys.executable,
        "-m",
        "nat_ray.cli",
        "agent",
        "--task",
        "hotpotqa",
        "--json",
        "-",
        "--max-turns",
        "2",
        "--set",
        "engine.max_model_len=2048",
        "--set",
        "engine.kv_cache_gb=1",
        "--set",
        "agent.max_new_tokens=64",
        "--set",
        f"tools.search_corpus={corpus}",
        "--gold",
        "Seine",
        "Which river flows through Paris?",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout[out.stdout.index("{") :])
    assert result["turns"] >= 1 and set(result["score"]) >= {"correct_paper", "correct_robust", "f1"}
    searches = [
        m
        for m in result["conversation"]
        if m["role"] == "user" and m["content"].startswith("Observation:  #1:")
    ]
    actions = [m["content"] for m in result["conversation"][4:] if m["role"] == "assistant"]
    # The model's first action either searched (and the real index answered) or failed to parse.
    if any("Action: search[" in a for a in actions[-result["turns"] :]):
        assert searches, "a search action got no ' #1: ...' observation"


def test_cli_rejects_bad_input_clearly():
    out = subprocess.run(
        [sys.executable, "-m", "nat_ray.cli", "agent", "--task", "chess", "q"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "unknown task" in out.stderr.lower()
    out = subprocess.run(
        [sys.executable, "-m", "nat_ray.cli", "agent", "--set", "agent.max_turns=0", "q"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "agent.max_turns" in out.stderr
