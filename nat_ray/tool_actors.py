"""Tools as Ray actors: a small calculator pool and a search actor that loads its index once.

Calls are asynchronous (:class:`RayTools` implements the stepper's ``submit``/``collect``), so an
engine keeps generating for other episodes while a tool call is out. An actor that dies is
restarted by Ray; the calls it had in flight come back as ``Error:`` observations, and the
episodes go on.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

import ray
from ray.exceptions import RayActorError, RayTaskError

from nat_ray.config import ToolsConfig
from nat_ray.react import ToolCall, ToolResult, call_tool

log = logging.getLogger(__name__)


@ray.remote(max_restarts=-1, max_task_retries=0, num_cpus=0)
class ToolActor:
    """Runs one kind of tool; configured once (the search index loads on its first query)."""

    def __init__(self, tools: dict) -> None:
        from nat_ray.config import from_dict
        from nat_ray.tools import configure_tools

        configure_tools(from_dict(ToolsConfig, tools, "tools"))

    def call(self, name: str, argument: str) -> ToolResult:
        from nat_ray.tools import REGISTRY

        return call_tool(REGISTRY[name], ToolCall(name, argument))

    def warm_up(self, name: str) -> bool:
        """Load heavy state (the search index) before episodes need it."""
        if name == "search":
            from nat_ray.tools.search import get_search_backend

            backend = get_search_backend()
            if hasattr(backend, "load"):
                backend.load()
        return True

    def pid(self) -> int:
        import os

        return os.getpid()


def start_tool_actors(
    tools: ToolsConfig, num_calculators: int, num_search: int, names: Sequence[str]
) -> dict:
    """Actor pools for the tools ``names`` needs: ``{"calculate": [...], "search": [...]}``."""
    from dataclasses import asdict

    sizes = {"calculate": num_calculators, "search": num_search}
    pools = {
        name: [ToolActor.remote(asdict(tools)) for _ in range(sizes[name])] for name in sorted(set(names))
    }
    ray.get([actor.warm_up.remote(name) for name, pool in pools.items() for actor in pool])
    return pools


class RayTools:
    """The stepper's tool runner over actor pools (round-robin within each tool's pool)."""

    def __init__(self, pools: dict[str, list]) -> None:
        self.pools = pools
        self._next = {name: itertools.cycle(pool) for name, pool in pools.items()}
        self._calls: dict[object, ToolCall] = {}

    def submit(self, call: ToolCall) -> object:
        ref = next(self._next[call.name]).call.remote(call.name, call.argument)
        self._calls[ref] = call
        return ref

    def collect(self, handles: Sequence[object], block: bool) -> list[tuple[object, ToolResult]]:
        ready, _ = ray.wait(
            list(handles), num_returns=1 if block else len(handles), timeout=None if block else 0
        )
        if block:  # take whatever else has finished too
            more, _ = ray.wait(list(handles), num_returns=len(handles), timeout=0)
            ready = list(dict.fromkeys([*ready, *more]))
        results = []
        for ref in ready:
            call = self._calls.pop(ref)
            try:
                results.append((ref, ray.get(ref)))
            except (RayActorError, RayTaskError) as err:
                log.warning(
                    "%s tool actor failed on %r: %s", call.name, call.argument[:80], type(err).__name__
                )
                results.append(
                    (
                        ref,
                        ToolResult(
                            f"Error: the {call.name} tool crashed and was restarted; try again.",
                            error=f"{call.name} actor failed: {type(err).__name__}",
                        ),
                    )
                )
        return results
