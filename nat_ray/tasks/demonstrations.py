"""A task's one-shot demonstration file -> :class:`~nat_ray.core.prompts.Demo` (the format: the
docstring of :mod:`nat_ray.tasks.task_file`), every mistake named with its line."""

from __future__ import annotations

import re

from nat_ray.core import prompts

_DEMO_KEYS = ("Question:", "Thought:", "Action:", "Observation:")
_ACTION_RE = re.compile(r"Action:\s*(\w+)\[(.*)\]\s*", re.DOTALL)


def parse_demonstration(text: str, tools: tuple[str, ...]) -> prompts.Demo:
    """Parse a demonstrations file (format: the module docstring) into a one-shot :class:`~nat_ray.core.prompts.Demo`.

    Raises:
        ValueError: naming the line and what is wrong.
    """
    blocks: list[tuple[str, str, int]] = []  # (keyword, text, line number)
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key = next((k for k in _DEMO_KEYS if stripped.startswith(k)), None)
        if key is None:
            if not blocks:
                raise ValueError(f"line {lineno}: expected 'Question:' first, got {stripped[:40]!r}")
            k, body, start = blocks[-1]
            blocks[-1] = (k, f"{body}\n{line.rstrip()}", start)
        else:
            blocks.append((key, line.rstrip(), lineno))
    if not blocks or blocks[0][0] != "Question:":
        raise ValueError("the file must start with a 'Question:' line")
    question = blocks[0][1].strip().removeprefix("Question:").strip()
    if not question:
        raise ValueError("the Question: line is empty")
    turns: list[tuple[str, str | None]] = []
    thought: str | None = None
    pending: str | None = None  # an action waiting for its observation
    for key, body, lineno in blocks[1:]:
        if key == "Question:":
            raise ValueError(f"line {lineno}: a second Question:; the file holds one demonstration")
        if key == "Thought:":
            if pending is not None:
                raise ValueError(f"line {lineno}: the action before this Thought: has no Observation:")
            if thought is not None:
                raise ValueError(f"line {lineno}: two Thought: blocks without an Action: between them")
            thought = body
        elif key == "Action:":
            if pending is not None:
                raise ValueError(f"line {lineno}: the action before this one has no Observation:")
            match = _ACTION_RE.fullmatch(body.strip())
            if match is None:
                raise ValueError(
                    f"line {lineno}: expected 'Action: name[argument]', got {body.strip()[:60]!r}"
                )
            if match.group(1).lower() != "finish" and match.group(1).lower() not in tools:
                raise ValueError(
                    f"line {lineno}: the action {match.group(1)!r} is not one of the task's tools {list(tools)} or finish"
                )
            action = body if thought is None else f"{thought}\n{body}"
            thought = None
            if match.group(1).lower() == "finish":
                turns.append((action, None))
                if blocks[-1][2] != lineno:
                    raise ValueError(f"line {lineno}: finish[...] must be the last action")
            else:
                pending = action
        else:  # Observation:
            if pending is None:
                raise ValueError(f"line {lineno}: an Observation: without an Action: before it")
            observation = body.removeprefix("Observation:").removeprefix(" ")
            turns.append((pending, observation))
            pending = None
    if not turns or turns[-1][1] is not None:
        raise ValueError("the last action must be finish[answer]")
    return prompts.Demo(question, tuple(turns))
