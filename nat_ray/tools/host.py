"""A process that runs the agent's tools: the one class behind rollout's tool actors and serving's tool deployments.

Plain Python, no Ray: :mod:`nat_ray.tool_actors` makes it a Ray actor and :mod:`nat_ray.serve.app`
a Serve deployment. It points the tools at their configured backends once, when it starts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from nat_ray.config import ToolsConfig, from_dict
from nat_ray.react import ToolCall, ToolResult, call_tool
from nat_ray.tools import REGISTRY, configure_tools


class ToolHost:
    """Runs the agent's tools in this process.

    Args:
        tools: the ``tools`` section (:class:`nat_ray.config.ToolsConfig`) as a mapping.
        preload: tools whose heavy state (the search index) loads now, not on the first question.
    """

    def __init__(self, tools: dict, preload: Sequence[str] = ()) -> None:
        configure_tools(from_dict(ToolsConfig, tools, "tools"))
        for name in preload:
            self.warm_up(name)

    def call(self, name: str, argument: str) -> ToolResult:
        """Run tool ``name`` on the model's ``argument``; bad input comes back as an ``Error:`` observation."""
        return call_tool(REGISTRY[name], ToolCall(name, argument))

    def warm_up(self, name: str) -> bool:
        """Load tool ``name``'s heavy state (the search index) before episodes need it."""
        if name == "search":
            from nat_ray.tools.search import get_search_backend

            backend = get_search_backend()
            if hasattr(backend, "load"):
                backend.load()
        return True

    def pid(self) -> int:
        """This process's id (tests kill it to check that calls survive a dying tool)."""
        return os.getpid()
