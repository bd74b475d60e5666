"""The served agent loop: one :class:`nat_ray.core.react.Stepper` shared by every agent request of the ingress.

A single thread keeps stepping while episodes are open and admits newly arrived requests between
steps, so concurrent requests share the model instead of queueing behind each other. The stepper's
engine and tool runner here are Serve deployment handles: each episode's turn goes to the LLM
deployment as soon as the episode is ready (vLLM's continuous batch holds every episode that is
generating, and an episode moves on the moment its own turn ends); tool calls go to the tool
deployments, asynchronously.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import queue
import threading
from collections.abc import Callable, Sequence

from nat_ray.core.react import CONTEXT_OVERFLOW, Episode, Generation, Sampling, Stepper, ToolCall, ToolResult
from nat_ray.engines.openai_engine import is_context_overflow
from nat_ray.serve.api import llm_error

log = logging.getLogger(__name__)

TOOL_ATTEMPTS = 2  # a call that hit a replica as it died is sent once more (tools are idempotent)
# Longest a step waits for a generation or a tool result: new requests join within this time.
POLL_S = 0.05


def ray_errors() -> tuple[type[BaseException], ...]:
    """How a deployment call fails: a dead or unreachable replica, an error in it, a Serve error.

    Imported on use: the agent loop runs without Ray too (its tests drive it with plain engines).
    """
    from ray.exceptions import RayError
    from ray.serve.exceptions import RayServeException

    return (RayError, RayServeException)


ADAPTER_RACE_RETRIES = 4


def is_adapter_load_race(err: BaseException) -> bool:
    """Whether ``err`` is the replica refusing a second, concurrent load of an adapter it is loading.

    Requests that arrive together for an adapter not yet loaded each ask ray.serve.llm to load it; vLLM
    accepts the first and refuses the others ("... set 'load_inplace' to True"), though the adapter is
    then loaded: a retry a moment later is answered (the canary test sends 16 at once to a new adapter).
    """
    return "load_inplace" in str(err)


class ServeChatEngine:
    """The stepper's streaming engine (:class:`nat_ray.core.react.StreamingEngine`) over the LLM deployment.

    ``submit`` and ``poll`` are called from the stepper thread: ``submit`` starts one chat call on
    the ingress's event loop (where the handle lives) and returns at once; ``poll`` hands back the
    calls that have finished, waiting a moment for the first. So each episode moves on as soon as
    its own turn ends, and vLLM's continuous batch holds every episode that is generating. A failed
    call becomes an ``error`` generation (that episode ends as ``generation_error``; the rest go on).
    """

    def __init__(self, handle, model_id: str, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        from ray.serve.llm.openai_api_models import ChatCompletionRequest

        self.handle = handle.options(stream=True)  # LLMServer.chat is an async generator
        self.model_id = model_id
        self.loop = loop
        self.timeout_s = timeout_s
        self._request_cls = ChatCompletionRequest
        self._ids = itertools.count()
        self._running: dict[str, concurrent.futures.Future] = {}

    def submit(self, conversation: list[dict], sampling: Sampling) -> str:
        request_id = f"serve-{next(self._ids)}"
        self._running[request_id] = asyncio.run_coroutine_threadsafe(
            self._one(conversation, sampling), self.loop
        )
        return request_id

    def poll(self) -> list[tuple[str, Generation]]:
        if not self._running:
            return []
        concurrent.futures.wait(
            self._running.values(), timeout=POLL_S, return_when=concurrent.futures.FIRST_COMPLETED
        )
        done = [rid for rid, future in self._running.items() if future.done()]
        return [(rid, self._running.pop(rid).result()) for rid in done]

    def generate(self, conversations: Sequence[list[dict]], sampling: Sequence[Sampling]) -> list[Generation]:
        """The batch form (:class:`nat_ray.core.react.ChatEngine`): all calls at once, answers in order."""
        futures = [
            asyncio.run_coroutine_threadsafe(self._one(c, s), self.loop)
            for c, s in zip(conversations, sampling)
        ]
        return [f.result() for f in futures]

    def close(self) -> None:
        """Nothing to release: the handle belongs to the replica."""

    async def _one(self, conversation: list[dict], s: Sampling) -> Generation:
        request = self._request_cls(
            model=self.model_id,
            messages=conversation,
            temperature=s.temperature,
            top_p=s.top_p if s.temperature > 0 else 1.0,
            max_tokens=s.max_tokens,
            seed=s.seed,
            stop=list(s.stop),
            return_token_ids=True,  # the ids the engine read and sampled: token-exact served episodes
        )
        for attempt in range(ADAPTER_RACE_RETRIES + 1):
            try:
                async with asyncio.timeout(self.timeout_s):
                    items = [item async for item in self.handle.chat.remote(request, None)]
                break
            except (*ray_errors(), TimeoutError) as err:
                if attempt < ADAPTER_RACE_RETRIES and is_adapter_load_race(err):
                    await asyncio.sleep(0.5 * 2**attempt)  # the first request's load is finishing
                    continue
                log.warning("LLM call failed: %s: %s", type(err).__name__, err)
                return Generation(
                    "", finish_reason="error", error=f"LLM deployment: {type(err).__name__}: {err}"
                )
        return self._parse(items[0] if items else None)

    def _parse(self, item) -> Generation:
        error = llm_error(item)
        if error is not None:
            status, message, _ = error
            if is_context_overflow(status, message):
                return Generation("", finish_reason=CONTEXT_OVERFLOW, error=message)
            return Generation("", finish_reason="error", error=f"HTTP {status}: {message}")
        if item is None or not getattr(item, "choices", None):
            return Generation("", finish_reason="error", error=f"unexpected LLM answer: {item!r:.200}")
        choice = item.choices[0]
        usage = item.usage
        return Generation(
            choice.message.content or "",
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=(usage.completion_tokens or 0) if usage else 0,
            finish_reason="length" if choice.finish_reason == "length" else "stop",
            prompt_ids=tuple(getattr(item, "prompt_token_ids", None) or ()),
            completion_ids=tuple(getattr(choice, "token_ids", None) or ()),
        )


class ServeTools:
    """The stepper's async tool runner over tool deployment handles (``{"calculate": handle, ...}``).

    Each deployment serves :class:`nat_ray.tools.host.ToolHost`. ``submit`` starts the call on the
    ingress's event loop and returns a concurrent future; ``collect`` hands back the finished ones.
    A call that hits a dying replica is retried once, then becomes an ``Error:`` observation: the
    episode goes on, the request still succeeds.
    """

    def __init__(self, handles: dict, loop: asyncio.AbstractEventLoop) -> None:
        self.handles = handles
        self.loop = loop

    def submit(self, call: ToolCall) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(self._call(call), self.loop)

    def collect(self, handles: Sequence[object], block: bool) -> list[tuple[object, ToolResult]]:
        done, _ = concurrent.futures.wait(
            handles, timeout=POLL_S if block else 0, return_when=concurrent.futures.FIRST_COMPLETED
        )
        return [(h, h.result()) for h in handles if h in done]

    async def _call(self, call: ToolCall) -> ToolResult:
        attempt = 1
        while True:
            try:
                return await self.handles[call.name].call.remote(call.name, call.argument)
            except ray_errors() as err:
                log.warning(
                    "%s tool call failed (attempt %d of %d): %s", call.name, attempt, TOOL_ATTEMPTS, err
                )
                if attempt == TOOL_ATTEMPTS:
                    return ToolResult(
                        f"Error: the {call.name} tool failed; try again.",
                        error=f"{call.name} deployment failed: {type(err).__name__}",
                    )
            await asyncio.sleep(0.5 * attempt)  # let Serve route around the dead replica
            attempt += 1


class AgentLoop:
    """One :class:`Stepper` on one thread, shared by every agent request of the replica.

    Requests hand in episodes with :meth:`submit` (on the event loop) and await the future it
    returns. The thread admits new episodes between steps, up to ``max_open`` at once (the rest wait
    in arrival order), and resolves each future as its episode ends. (It keeps its own admission
    loop rather than :meth:`Stepper.run_refilling`: it must wait for requests when nothing is open,
    and a failed step must not end it.)

    An episode may name another model than the default (an adapter, ``<model_id>:<adapter>``): it
    then runs in a stepper of its own over ``engine_for(model)``, since an engine call carries no
    episode to route by; all steppers step on the one thread, and every model's calls still meet
    in the same vLLM batch.
    """

    def __init__(
        self,
        engine,
        tools,
        *,
        max_open: int,
        stop_on_tool_error: bool,
        engine_for: Callable[[str], object] | None = None,
    ) -> None:
        self.engine = engine
        self.tools = tools
        self.max_open = max_open
        self.stop_on_tool_error = stop_on_tool_error
        self.engine_for = engine_for
        self.finished = 0
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._queued: collections.deque = collections.deque()
        self._futures: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._stop = threading.Event()
        self._stepper = self._new_stepper()
        self._others: dict[str, Stepper] = {}  # model -> the stepper of that model's episodes
        self._thread = threading.Thread(target=self._run, name="nat-ray-stepper", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def open(self) -> int:
        return self._stepper.open + sum(stepper.open for stepper in self._others.values())

    @property
    def queued(self) -> int:
        return len(self._queued) + self._inbox.qsize()

    def submit(self, episode: Episode, model: str | None = None) -> asyncio.Future:
        """Queue ``episode`` (on ``model``; None: the default engine's); the future resolves to it when it has ended."""
        if model is not None and self.engine_for is None:
            raise ValueError("this agent loop serves one model; it was built without engine_for")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._inbox.put((episode, model, loop, future))
        return future

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _new_stepper(self, engine=None) -> Stepper:
        return Stepper(
            engine if engine is not None else self.engine,
            self.tools,
            stop_on_tool_error=self.stop_on_tool_error,
            on_done=self._done,
        )

    def _stepper_for(self, model: str | None) -> Stepper:
        if model is None:
            return self._stepper
        if model not in self._others:
            self._others[model] = self._new_stepper(self.engine_for(model))
        return self._others[model]

    def _run(self) -> None:
        while not self._stop.is_set():
            self._take(block=self.open == 0 and not self._queued)
            while self._queued and self.open < self.max_open:
                episode, model = self._queued.popleft()
                if episode.done:  # the stepper ignores ended episodes; answer it here
                    self._done(episode)
                self._stepper_for(model).add(episode)
            busy = [stepper for stepper in (self._stepper, *self._others.values()) if stepper.open]
            try:
                for stepper in busy:
                    stepper.step()
            except Exception as err:  # noqa: BLE001 - a bug must fail its requests, not the server
                log.exception("the agent loop failed; ending its open episodes")
                self._fail_open(err)

    def _take(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            episode, model, loop, future = item
            self._futures[id(episode)] = (loop, future)
            self._queued.append((episode, model))
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _done(self, episode: Episode) -> None:
        self.finished += 1
        loop, future = self._futures.pop(id(episode))
        loop.call_soon_threadsafe(_resolve, future, episode, None)

    def _fail_open(self, err: Exception) -> None:
        # The failed step may have taken its batch out of the stepper, so fail every admitted
        # episode (all but the queued ones) and start over with an empty stepper.
        self._stepper = self._new_stepper()
        self._others = {model: self._new_stepper(stepper.engine) for model, stepper in self._others.items()}
        queued = {id(ep) for ep, _ in self._queued}
        for key in [k for k in self._futures if k not in queued]:
            loop, future = self._futures.pop(key)
            loop.call_soon_threadsafe(_resolve, future, None, err)


def _resolve(future: asyncio.Future, episode: Episode | None, err: Exception | None) -> None:
    if future.done():  # the request timed out and went away
        return
    if err is not None:
        future.set_exception(err)
    else:
        future.set_result(episode)
