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
from nat_ray.core.react import ToolCall, ToolResult
from nat_ray.errors import ConfigError
from nat_ray.tools.host import ToolHost

log = logging.getLogger(__name__)


# Ray restarts a dead tool actor; a call it had in flight is not run again (see RayTools).
ToolActor = ray.remote(max_restarts=-1, max_task_retries=0, num_cpus=0)(ToolHost)


def actor_runtime_env(specs: Sequence[str]) -> dict:
    """:func:`~nat_ray.tools.plugins.runtime_env_for` with the tool files uploaded to the running Ray.

    Ray (2.60) takes local paths only in a job's ``runtime_env`` (``ray.init``); an actor's, a Serve
    replica's (``ray_actor_options``) or a Ray Data worker's (``map_batches(runtime_env=...)``)
    needs URIs. So the files are uploaded here the way ``ray.init`` uploads them (content-addressed:
    once per file content) and the result names ``gcs://`` packages. ``{}`` when no spec is a file.
    Call it after Ray is up.
    """
    import tempfile

    from nat_ray.tools.plugins import runtime_env_for

    env = runtime_env_for(specs)
    if not env:
        return {}
    # Ray's own uploader, the one ray.init runs for a job's py_modules (no public API does it).
    from ray._private.runtime_env.py_modules import upload_py_modules_if_needed

    with tempfile.TemporaryDirectory() as scratch:
        return upload_py_modules_if_needed(env, include_gitignore=False, scratch_dir=scratch, logger=log)


def start_tool_actors(
    tools: ToolsConfig,
    num_calculators: int,
    num_search: int,
    names: Sequence[str],
    num_plugin: int = 1,
) -> dict:
    """Actor pools for the tools ``names`` needs: ``{"calculate": [...], "search": [...], "convert": [...]}``.

    A plug-in tool (one of ``tools.plugins``) gets ``num_plugin`` actors, each constructing only
    that tool; tool files travel to the actors' workers with :func:`actor_runtime_env`. Each actor has loaded its tool's heavy state
    (the search index, a plug-in class) when this returns.

    Raises:
        ConfigError: a tool actor could not start (a plug-in that fails to import or construct).
    """
    from dataclasses import asdict

    if "search" in names and num_search:
        # Here, in the driver, with a logged estimate and ETA on every CPU of the cluster, instead
        # of silently inside the one search actor's warm-up.
        from nat_ray.tools.search.index_build import ensure_index_for

        ensure_index_for(tools)
    sizes = {"calculate": num_calculators, "search": num_search}
    env = actor_runtime_env(tools.plugins)
    actor_cls = ToolActor.options(runtime_env=env) if env else ToolActor
    config = asdict(tools)
    pools = {
        name: [actor_cls.remote(config, only=(name,)) for _ in range(sizes.get(name, num_plugin))]
        for name in sorted(set(names))
    }
    for name, pool in pools.items():
        try:
            ray.get([actor.warm_up.remote(name) for actor in pool])
        except RayActorError as err:
            for actor in (a for p in pools.values() for a in p):
                ray.kill(actor, no_restart=True)
            raise ConfigError(f"the {name} tool actor could not start: {err}") from None
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

    Inside the actor a call times out after ``tools.call_timeout_s`` (:mod:`nat_ray.tools.guard`),
    but a tool stuck in native code that never releases the GIL stops its whole process. With
    ``call_timeout_s`` set, an actor that has finished nothing for ``call_timeout_s`` +
    :attr:`stuck_grace_s` while it has calls out is killed and restarted; its calls come back as
    ``Error:`` observations.

    Args:
        pools: from :func:`start_tool_actors`.
        restart_timeout_s: how long calls sent to a dead actor wait for its restart.
        call_timeout_s: ``tools.call_timeout_s``; ``None`` = no watchdog.
    """

    max_attempts = 40  # with the backoff below, about half a minute of restarting
    stuck_grace_s = 30.0

    def __init__(
        self, pools: dict[str, list], restart_timeout_s: float = 120.0, call_timeout_s: float | None = None
    ) -> None:
        self.pools = pools
        self.restart_timeout_s = restart_timeout_s
        self.stuck_after_s = None if call_timeout_s is None else call_timeout_s + self.stuck_grace_s
        self._next = {name: itertools.cycle(pool) for name, pool in pools.items()}
        self._by_ref: dict[object, _Pending] = {}
        self._down_since: dict[int, float] = {}  # actor id -> when a failure was first seen
        self._out: dict[int, int] = {}  # actor id -> calls out to it
        self._progress: dict[int, float] = {}  # actor id -> last finish (or first call out)
        self._actors: dict[int, object] = {}
        self._killed: set[int] = set()  # actors killed as stuck, until their calls are back

    def submit(self, call: ToolCall) -> object:
        actor = next(self._next[call.name])
        now = time.monotonic()
        key = id(actor)
        if not self._out.get(key):
            self._progress[key] = now
        self._out[key] = self._out.get(key, 0) + 1
        self._actors[key] = actor
        pending = _Pending(call, actor, actor.call.remote(call.name, call.argument), now)
        self._by_ref[pending.ref] = pending
        return pending

    def collect(self, handles: Sequence[object], block: bool) -> list[tuple[object, ToolResult]]:
        refs = [h.ref for h in handles]
        if not block:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        else:
            while True:
                ready, _ = ray.wait(refs, num_returns=1, timeout=self._kill_stuck())
                if ready:
                    break
            more, _ = ray.wait(refs, num_returns=len(refs), timeout=0)  # take whatever else has finished too
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
            key = id(pending.actor)
            self._out[key] -= 1
            self._progress[key] = time.monotonic()
            if not self._out[key]:
                self._killed.discard(key)
            results.append((pending, result))
        return results

    def _kill_stuck(self) -> float | None:
        """Kill (for Ray to restart) every actor stuck past the watchdog; seconds until the next check."""
        if self.stuck_after_s is None:
            return None
        now = time.monotonic()
        wait = self.stuck_after_s
        for key, out in self._out.items():
            if not out or key in self._killed:
                continue
            left = self._progress[key] + self.stuck_after_s - now
            if left <= 0:
                log.warning(
                    "a tool actor finished nothing for %.0f s; restarting it", now - self._progress[key]
                )
                self._killed.add(key)
                self._down_since.setdefault(key, now)
                ray.kill(self._actors[key], no_restart=False)
            else:
                wait = min(wait, left)
        return max(wait, 0.05)

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
        if id(pending.actor) in self._killed:
            return ToolResult(
                f"Error: the {call.name} tool did not answer and was restarted; try again.",
                error=f"{call.name} actor stuck for over {self.stuck_after_s:g} s; restarted",
            )
        return ToolResult(
            f"Error: the {call.name} tool crashed and was restarted; try again.",
            error=f"{call.name} actor failed: {type(err).__name__}",
        )
