"""Glue between a task, the agent config and the stepper: make episodes, show them, score them."""

from __future__ import annotations

from nat_ray.config import AgentConfig
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
