"""Glue between a task, the agent config and the stepper: make episodes, run one, show and score it."""

from __future__ import annotations

import json

from nat_ray.config import AgentConfig, NatRayConfig
from nat_ray.prompts import build_messages
from nat_ray.react import Episode, Sampling
from nat_ray.scoring import Score
from nat_ray.tasks import Task


def sampling_from(cfg: AgentConfig, temperature: float | None = None, seed: int | None = None) -> Sampling:
    """The decoding settings of an agent config, optionally with another temperature or seed."""
    return Sampling(
        temperature=cfg.temperature if temperature is None else temperature,
        top_p=cfg.top_p,
        max_tokens=cfg.max_new_tokens,
        seed=cfg.seed if seed is None else seed,
    )


def new_episode(
    task: Task,
    question: str,
    cfg: AgentConfig,
    episode_id: str,
    sampling: Sampling | None = None,
    meta: dict | None = None,
) -> Episode:
    """An episode at its start: the inference ("correct") prompt of ``cfg.template`` for ``question``."""
    return Episode(
        id=episode_id,
        prompt=build_messages(task.family, question, cfg.template, None, cfg.shots),
        tools=task.tools,
        sampling=sampling or sampling_from(cfg),
        max_turns=cfg.max_turns,
        meta=dict(meta or {}),
    )


def format_episode(ep: Episode, score: Score | None = None) -> str:
    """A readable transcript: the question turn, every step, the answer and why it ended."""
    lines = [f"Question turn: {ep.prompt[-1]['content']}", ""]
    for i, step in enumerate(ep.steps, 1):
        lines.append(f"--- turn {i} ---")
        lines.append(step.text or "(empty output)")
        if step.observation is not None:
            lines.append(f"Observation: {step.observation}")
        if step.error:
            lines.append(f"[{step.error}]")
    lines.append("")
    if ep.finished:
        lines.append(f"Answer: {ep.answer}")
    else:
        lines.append(f"No answer: the episode ended with {ep.failure_reason}")
    if score is not None:
        verdict = f"correct (paper): {score.correct_paper}, correct (robust): {score.correct_robust}"
        if score.f1 is not None:
            verdict += f", F1: {score.f1:.2f}"
        lines.append(verdict)
    lines.append(f"turns: {ep.turns}, tokens: {ep.prompt_tokens} prompt / {ep.completion_tokens} generated")
    return "\n".join(lines)


def run_agent(cfg: NatRayConfig, question: str, gold: str | None = None, as_json: bool = False) -> int:
    """``nat-ray agent``: answer one question with ``cfg``'s engine and tools, and print the episode.

    Args:
        question: the question text.
        gold: the right answer; the output then says whether the agent got it (both scoring rules).
        as_json: print the episode as JSON instead of a transcript.
    """
    from nat_ray.engines import build_engine
    from nat_ray.react import LocalTools, Stepper
    from nat_ray.tasks import get_task
    from nat_ray.tools import configure_tools

    task = get_task(cfg.agent.task)
    configure_tools(cfg.tools)
    episode = new_episode(task, question, cfg.agent, "cli-0")
    engine = build_engine(cfg.engine)
    if cfg.engine.backend == "openai":
        engine.models()  # an unreachable server is a clear error now, not a failed episode later
    try:
        Stepper(engine, LocalTools(), stop_on_tool_error=cfg.agent.stop_on_tool_error).run([episode])
    finally:
        engine.close()
    score = task.score(episode.answer, gold) if gold is not None else None
    if as_json:
        body = {
            "answer": episode.answer,
            "finished": episode.finished,
            "failure_reason": episode.failure_reason,
            "turns": episode.turns,
            "conversation": episode.conversation(),
            "score": None if score is None else score.__dict__,
        }
        print(json.dumps(body, indent=2))
    else:
        print(format_episode(episode, score))
    return 0
