"""Tools as Ray actors (:class:`nat_ray.tools.host.ToolHost`): a small calculator pool and a search actor.

Calls are asynchronous (:class:`RayTools` implements the stepper's ``submit``/``collect``), so an
engine keeps generating for other episodes while a tool call is out. An actor that dies is
restarted by Ray; the calls it had in flight come back as ``Error:`` observations, and the
episodes go on.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence

import ray
from ray.exceptions import RayActorError, RayTaskError

from nat_ray.config import ToolsConfig
from nat_ray.react import ToolCall, ToolResult
from nat_ray.tools.host import ToolHost

log = logging.getLogger(__name__)


# Ray restarts a dead tool actor; a call it had in flight is not run again (see RayTools).
ToolActor = ray.remote(max_restarts=-1, max_task_retries=0, num_cpus=0)(ToolHost)


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


class _Pending:
    """One call out to an actor; the ref changes when a call is resubmitted after a restart."""

    __slots__ = ("call", "actor", "ref", "submitted", "attempts")

    def __init__(self, call: ToolCall, actor, ref, submitted: float) -> None:
        self.call, self.actor, self.ref, self.submitted, self.attempts = call, actor, ref, submitted, 0


class RayTools:
    """The stepper's tool runner over actor pools (round-robin within each tool's pool).

    A call that was out when its actor died comes back as an ``Error:`` observation: it may be
    the very input that kills the tool, so it is not run again. A call sent to an actor already
    known to be down is resubmitted until the restarted actor takes it (within bounds),
    because that call did nothing wrong.
    """

    max_attempts = 40  # with the backoff below, about half a minute of restarting

    def __init__(self, pools: dict[str, list], restart_timeout_s: float = 120.0) -> None:
        self.pools = pools
        self.restart_timeout_s = restart_timeout_s
        self._next = {name: itertools.cycle(pool) for name, pool in pools.items()}
        self._by_ref: dict[object, _Pending] = {}
        self._down_since: dict[int, float] = {}  # actor id -> when a failure was first seen

    def submit(self, call: ToolCall) -> object:
        actor = next(self._next[call.name])
        pending = _Pending(call, actor, actor.call.remote(call.name, call.argument), time.monotonic())
        self._by_ref[pending.ref] = pending
        return pending

    def collect(self, handles: Sequence[object], block: bool) -> list[tuple[object, ToolResult]]:
        refs = [h.ref for h in handles]
        ready, _ = ray.wait(refs, num_returns=1 if block else len(refs), timeout=None if block else 0)
        if block:  # take whatever else has finished too
            more, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            ready = list(dict.fromkeys([*ready, *more]))
        results = []
        for ref in ready:
            pending = self._by_ref.pop(ref)
            try:
                result = ray.get(ref)
            except (RayActorError, RayTaskError) as err:
                if self._resubmit(pending):
                    continue
                result = self._failure(pending, err)
            else:
                self._down_since.pop(id(pending.actor), None)
            results.append((pending, result))
        return results

    def _resubmit(self, pending: _Pending) -> bool:
        """Send the call again if its actor was already known to be down when it was sent."""
        down = self._down_since.get(id(pending.actor))
        if (
            down is None
            or pending.submitted < down
            or pending.attempts >= self.max_attempts
            or time.monotonic() - down > self.restart_timeout_s
        ):
            return False
        time.sleep(min(0.05 * 2**pending.attempts, 1.0))  # the actor is still restarting
        pending.attempts += 1
        pending.ref = pending.actor.call.remote(pending.call.name, pending.call.argument)
        self._by_ref[pending.ref] = pending
        return True

    def _failure(self, pending: _Pending, err: Exception) -> ToolResult:
        call = pending.call
        self._down_since.setdefault(id(pending.actor), time.monotonic())
        log.warning("%s tool actor failed on %r: %s", call.name, call.argument[:80], type(err).__name__)
        return ToolResult(
            f"Error: the {call.name} tool crashed and was restarted; try again.",
            error=f"{call.name} actor failed: {type(err).__name__}",
        )
