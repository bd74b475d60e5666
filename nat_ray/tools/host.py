"""A process that runs the agent's tools: the one class behind rollout's tool actors and serving's tool deployments.

Plain Python, no Ray: :mod:`nat_ray.tools.actors` makes it a Ray actor and :mod:`nat_ray.serve.app`
a Serve deployment. It sets the tools up once, when it starts: search's backend, the call limits,
and the plug-ins of ``ToolsConfig.plugins`` (a plug-in class is constructed here, once per
process). A plug-in given as a file needs the process started with
:func:`nat_ray.tools.plugins.runtime_env_for` on a cluster.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence

from nat_ray.config import ToolsConfig, from_dict
from nat_ray.core.react import ToolCall, ToolResult, call_tool
from nat_ray.tools import REGISTRY, TOOL_VERSIONS, configure_tools


class ToolHost:
    """Runs the agent's tools in this process.

    Args:
        tools: the ``tools`` section (:class:`nat_ray.config.ToolsConfig`) as a mapping.
        preload: tools whose heavy state (the search index) loads now, not on the first question.
        only: the plug-in tools this process serves (``None``: all of ``tools.plugins``), so that a
            tool actor or replica for one tool does not construct the others' classes.
    """

    def __init__(self, tools: dict, preload: Sequence[str] = (), only: Collection[str] | None = None) -> None:
        configure_tools(from_dict(ToolsConfig, tools, "tools"), only=only)
        for name in preload:
            self.warm_up(name)

    def call(self, name: str, argument: str) -> ToolResult:
        """Run tool ``name`` on the model's ``argument`` under the tool contract; never raises for the call."""
        fn = REGISTRY.get(name)
        if fn is None:
            return ToolResult(
                f"Error: no {name} tool here.", error=f"{name} is not registered in this tool host"
            )
        return call_tool(fn, ToolCall(name, argument))

    def warm_up(self, name: str) -> bool:
        """Load tool ``name``'s heavy state (the search index) before episodes need it.

        A plug-in class loaded its state when it was constructed, with the host.
        """
        if name == "search":
            from nat_ray.tools.search.tool import get_search_backend

            backend = get_search_backend()
            if hasattr(backend, "load"):
                backend.load()
        return True

    def versions(self) -> dict[str, str]:
        """``{tool name: version}`` of the tools this process runs (for lineage)."""
        return dict(TOOL_VERSIONS)

    def check_health(self) -> None:
        """Serve's health check (and a tool actor's): every MCP server this process uses still answers.

        Raises:
            RuntimeError: a server's session is gone (its process died, or the URL stopped
                answering); Serve then reports the replica unhealthy and replaces it.
        """
        from nat_ray.tools.mcp import connections_alive

        if not connections_alive():
            raise RuntimeError("an MCP server of this tool host is no longer connected")

    def pid(self) -> int:
        """This process's id (tests kill it to check that calls survive a dying tool)."""
        return os.getpid()
