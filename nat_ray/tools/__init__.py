"""The agent's tools, in one registry: ``REGISTRY["calculate"]("2 * 3") -> "6"``.

A tool is a plain ``str -> str`` function. Bad *input* (the model's argument) never raises: it
becomes an ``Error: ...`` observation the model can read and react to. Only a broken *backend*
(an unreachable search service, say) raises :class:`nat_ray.errors.ToolError`; the stepper turns
that into an observation too and records it on the step.

``finish`` is not a tool: the stepper ends the episode on it.
"""

from __future__ import annotations

from collections.abc import Callable

from nat_ray.config import ToolsConfig
from nat_ray.tools.calculator import calculate
from nat_ray.tools.search import configure_search, search

ToolFn = Callable[[str], str]

REGISTRY: dict[str, ToolFn] = {"calculate": calculate, "search": search}

FINISH = "finish"


def configure_tools(config: ToolsConfig) -> None:
    """Point this process's tools at the configured backends (call once per process or actor)."""
    if config.search_backend == "http":
        configure_search("http", url=config.search_url, timeout_s=config.search_timeout_s)
    else:
        configure_search("local", corpus_path=config.search_corpus, model_path=config.search_model)


__all__ = ["FINISH", "REGISTRY", "ToolFn", "calculate", "configure_tools", "search"]
