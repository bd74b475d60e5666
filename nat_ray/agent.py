"""Glue between a task, the agent config and the stepper: make episodes, run one, show and score it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from nat_ray import safe_files
from nat_ray.config import AgentConfig, NatRayConfig, ToolsConfig
from nat_ray.core.react import Episode, Sampling
from nat_ray.core.scoring import Score
from nat_ray.engines import build_engine
from nat_ray.errors import ConfigError
from nat_ray.tasks import Task, register_tasks
from nat_ray.tasks.task_file import is_task_path


def prepare_tasks(refs: Sequence[str], cfg: NatRayConfig) -> tuple[list[Task], ToolsConfig]:
    """Register the tasks a stage runs (names or task files, and ``tasks_dir``) and the tools they need.

    Called by every stage before Ray or an engine starts, so a bad task file fails at once, and again
    in each worker process with the same arguments (work items carry task names).

    Returns:
        The tasks, and the ``tools`` section with every plug-in tool they name in ``plugins``.

    Raises:
        ConfigError: every bad task file and unknown name, in one error.
    """
    tasks = register_tasks(refs, cfg.tasks_dir)
    return tasks, tools_for(tasks, cfg)


def tools_for(tasks: Sequence[Task], cfg: NatRayConfig) -> ToolsConfig:
    """``cfg.tools`` with every plug-in tool ``tasks`` name added to ``plugins`` (once each, in order)."""
    specs = [*cfg.tools.plugins, *(spec for task in tasks for spec in task.tool_specs)]
    return dataclasses.replace(cfg.tools, plugins=list(dict.fromkeys(specs)))


def with_tasks_resolved(cfg: NatRayConfig, section: str) -> tuple[list[Task], NatRayConfig]:
    """Register ``cfg.<section>.tasks`` (see :func:`prepare_tasks`) and make ``cfg`` portable.

    The returned config names task files by absolute path (``tasks_dir`` too) and carries the
    tasks' plug-in tools in ``tools.plugins``, so a worker process that calls :func:`prepare_tasks`
    with it, whatever its working directory, registers the same tasks.

    Args:
        section: ``"rollout"``, ``"eval"`` or ``"serve"``: the section whose ``tasks`` to resolve.
    """
    refs = getattr(cfg, section).tasks
    tasks, tools = prepare_tasks(refs, cfg)
    portable = [task.source if is_task_path(ref) else ref for ref, task in zip(refs, tasks)]
    tasks_dir = str(Path(cfg.tasks_dir).expanduser().resolve()) if cfg.tasks_dir else None
    cfg = dataclasses.replace(
        cfg,
        **{section: dataclasses.replace(getattr(cfg, section), tasks=portable)},
        tools=tools,
        tasks_dir=tasks_dir,
    )
    return tasks, cfg


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
        prompt=task.build_messages(question, cfg.template, None, cfg.shots),
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


def run_agent(
    cfg: NatRayConfig, question: str | None, gold: str | None = None, json_path: str | None = None
) -> int:
    """``nat-ray agent``: answer one question with ``cfg``'s engine and tools, and print the episode.

    Args:
        question: the question text.
        gold: the right answer; the output then says whether the agent got it (both scoring rules).
        json_path: also write the episode as JSON here; ``-``: print it (the transcript goes to stderr).
    """
    from nat_ray.core.react import LocalTools, Stepper
    from nat_ray.tools import configure_tools

    if not question:
        raise ConfigError('nat-ray agent needs the question to answer, e.g. nat-ray agent "What is 12 * 7?"')
    (task,), tools = prepare_tasks([cfg.agent.task], cfg)
    configure_tools(tools)
    episode = new_episode(task, question, cfg.agent, "cli-0")
    engine = build_engine(cfg.engine)
    if cfg.engine.backend == "openai":
        engine.models()  # an unreachable server is a clear error now, not a failed episode later
    try:
        Stepper(engine, LocalTools(), stop_on_tool_error=cfg.agent.stop_on_tool_error).run([episode])
    finally:
        engine.close()
    score = task.score(episode.answer, gold) if gold is not None else None
    print(format_episode(episode, score), file=safe_files.tables_stream(json_path))
    if json_path:
        body = {
            "answer": episode.answer,
            "finished": episode.finished,
            "failure_reason": episode.failure_reason,
            "turns": episode.turns,
            "conversation": episode.conversation(),
            "score": None if score is None else score.__dict__,
        }
        safe_files.write_result(json_path, body)
    return 0
