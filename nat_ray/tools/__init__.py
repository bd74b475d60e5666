"""The agent's tools, in one registry: ``REGISTRY["calculate"]("2 * 3") -> "6"``.

A tool is a plain ``str -> str`` function. Bad *input* (the model's argument) never raises: it
becomes an ``Error: ...`` observation the model can read and react to. Only a broken *backend*
(an unreachable search service, say) raises :class:`nat_ray.errors.ToolError`; the stepper turns
that into an observation too and records it on the step.

``finish`` is not a tool: the stepper ends the episode on it.
"""

from __future__ import annotations

from collections.abc import Callable

from nat_ray.tools.calculator import calculate
from nat_ray.tools.search import search

ToolFn = Callable[[str], str]

REGISTRY: dict[str, ToolFn] = {"calculate": calculate, "search": search}

FINISH = "finish"

__all__ = ["FINISH", "REGISTRY", "ToolFn", "calculate", "search"]
