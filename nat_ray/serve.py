"""Stage 3, serving: the tuned agent on Ray Serve, with vLLM through ``ray.serve.llm`` and tool deployments.

One Serve application, four deployments::

    HTTP -> AgentIngress (FastAPI) --chat--> LLMServer:<model_id>   (ray.serve.llm, vLLM; base + LoRA)
                                   --call--> tool-calculate          (autoscaling)
                                   --call--> tool-search             (autoscaling)

``POST /v1/agent`` runs the project's one ReAct loop (:class:`nat_ray.react.Stepper`) inside the
ingress: a single thread keeps stepping while episodes are open and admits newly arrived requests
between steps, so concurrent requests share the model instead of queueing behind each other. Each
episode's turn goes to the LLM deployment through its handle as soon as the episode is ready (the
stepper's streaming engine: vLLM's continuous batch holds every episode that is generating, and an
episode moves on the moment its own turn ends); tool calls go to the tool deployments through their
handles, asynchronously (the stepper's ``submit``/``collect``).

Routes:

- ``GET /healthz``: ``{"status", "model", "open_episodes", "queued_episodes", "finished_episodes"}``.
- ``GET /v1/models``: the base model and, with ``serve.lora``, the adapter (``<model_id>-lora``).
- ``POST /v1/chat/completions``: OpenAI-compatible (``stream`` too), so the ``openai`` client works
  unchanged; ``model`` defaults to the agent's model.
- ``POST /v1/agent``: :class:`AgentRequest` in; ``{id, model, task, answer, finished, failure_reason,
  error, turns, prompt, trajectory, usage}`` out, plus ``correct`` (paper, robust, f1) with ``gold``.

Every body is validated before anything runs: malformed JSON is a 400, a schema or limit violation a
422 (an unknown model a 404), and the error's ``param`` and message name the field. Limits come from
:class:`nat_ray.config.ServeConfig`. A 5xx means the server failed, never the input: 503 when the
LLM deployment fails (also for an agent episode it cut short), 504 past ``serve.request_timeout_s``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from nat_ray.agent import new_episode, sampling_from
from nat_ray.config import AgentConfig, NatRayConfig, ServeConfig, ToolsConfig, from_dict, load_config
from nat_ray.engines.openai_engine import is_context_overflow
from nat_ray.errors import ConfigError, ModelError
from nat_ray.react import (
    CONTEXT_OVERFLOW,
    GENERATION_ERROR,
    Episode,
    Generation,
    Sampling,
    Stepper,
    ToolCall,
    ToolResult,
)
from nat_ray.scoring import as_bool_gold, canonical_math_gold
from nat_ray.tasks import TASKS, get_task

log = logging.getLogger(__name__)

APP_NAME = "nat-ray"
MAX_TEMPERATURE = 2.0  # the OpenAI API's range; higher only produces noise
MAX_ID_CHARS = 128
# The ingress queues agent requests itself (beyond serve.max_concurrent_episodes they wait for a
# slot in the stepper), so Serve must never hold them back at the door: that would shrink batches.
INGRESS_MAX_ONGOING_REQUESTS = 4096
TOOL_MAX_ONGOING_REQUESTS = 16  # per tool replica; above 2 in flight per replica, autoscaling adds one
TOOL_TARGET_ONGOING_REQUESTS = 2
TOOL_ATTEMPTS = 2  # a call that hit a replica as it died is sent once more (tools are idempotent)
# Longest a step waits for a generation or a tool result: new requests join within this time.
POLL_S = 0.05


# --------------------------------------------------------------------------------------------
# Request validation (pure: pydantic only)


class AgentRequest(BaseModel):
    """Body of ``POST /v1/agent``. Limits come from :class:`ServeConfig` (the validation context).

    Attributes:
        task: a task name (``gsm8k``, ``hotpotqa``, ...): picks the prompt, the tools and the scorer.
        question: the question, 1 to ``serve.max_question_chars`` characters.
        id: episode id; the per-turn sampling seeds derive from it (default: a hash of task,
            question and seed, so the same request gives the same episode).
        max_turns: model calls before the episode ends as ``turn_cap`` (1 to ``serve.max_turns_limit``;
            default ``agent.max_turns``).
        max_tokens: new tokens per model turn (1 to ``serve.max_tokens_limit``; default
            ``agent.max_new_tokens``).
        temperature: 0 (greedy) to 2 (default ``agent.temperature``).
        top_p: in (0, 1] (default ``agent.top_p``).
        seed: sampling seed, >= 0 (default ``agent.seed``).
        gold: the right answer; the response then says whether the agent got it (paper and robust
            rules). Math: a number; StrategyQA: yes/no or a boolean; HotpotQA: text.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    task: str
    question: str = Field(min_length=1)
    id: str | None = Field(default=None, min_length=1, max_length=MAX_ID_CHARS)
    max_turns: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    gold: str | bool | int | float | None = None

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        if value.lower() not in TASKS:
            raise ValueError(f"unknown task {value!r}; known tasks: {sorted(TASKS)}")
        return value.lower()

    @field_validator("question")
    @classmethod
    def _question_limit(cls, value: str, info: ValidationInfo) -> str:
        limit = _limits(info).max_question_chars
        if not value.strip():
            raise ValueError("must not be blank")
        if len(value) > limit:
            raise ValueError(
                f"is {len(value)} characters long; the limit is {limit} (serve.max_question_chars)"
            )
        return value

    @field_validator("max_turns")
    @classmethod
    def _turns_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        limit = _limits(info).max_turns_limit
        if value is not None and value > limit:
            raise ValueError(f"{value} is over the limit of {limit} turns (serve.max_turns_limit)")
        return value

    @field_validator("max_tokens")
    @classmethod
    def _tokens_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        limit = _limits(info).max_tokens_limit
        if value is not None and value > limit:
            raise ValueError(f"{value} is over the limit of {limit} tokens per turn (serve.max_tokens_limit)")
        return value

    @field_validator("gold")
    @classmethod
    def _gold_fits_task(cls, value: Any, info: ValidationInfo) -> Any:
        task = info.data.get("task")
        if value is None or task is None:  # an unknown task is reported on its own field
            return value
        family = TASKS[task].family
        if family == "math" and (isinstance(value, bool) or canonical_math_gold(str(value)) is None):
            raise ValueError(f"a {task} answer must be one number, got {value!r}")
        if family == "strategyqa":
            try:
                as_bool_gold(value)
            except ValueError:
                raise ValueError(f"a strategyqa answer must be yes/no or a boolean, got {value!r}") from None
        if family == "hotpotqa" and not isinstance(value, str):
            raise ValueError(f"a hotpotqa answer must be text, got {value!r}")
        return value


def _ray_errors() -> tuple[type[BaseException], ...]:
    """How a deployment call fails: a dead or unreachable replica, an error in it, a Serve error.

    Imported on use: this module stays importable without Ray (the CLI builds its parser from it).
    """
    from ray.exceptions import RayError
    from ray.serve.exceptions import RayServeException

    return (RayError, RayServeException)


def _limits(info: ValidationInfo) -> ServeConfig:
    return info.context if isinstance(info.context, ServeConfig) else ServeConfig()


def error_body(status: int, message: str, param: str | None, detail: list | None = None) -> dict:
    """An OpenAI-style error object (the ``openai`` client shows ``error.message``)."""
    body: dict = {
        "error": {
            "message": message,
            "type": "invalid_request_error" if status < 500 else "server_error",
            "param": param,
            "code": status,
        }
    }
    if detail is not None:
        body["detail"] = detail
    return body


def validation_error(err: ValidationError) -> tuple[int, dict]:
    """Status and body for a pydantic error: 400 for malformed JSON, else 422; every field named."""
    problems = err.errors(include_url=False, include_context=False, include_input=False)
    detail = [
        {
            "loc": [str(p) for p in e["loc"]],
            "field": _field(e["loc"]),
            "msg": e["msg"].removeprefix("Value error, "),
            "type": e["type"],
        }
        for e in problems
    ]
    status = 400 if any(e["type"] == "json_invalid" for e in problems) else 422
    message = "; ".join(f"{d['field']}: {d['msg']}" for d in detail)
    return status, error_body(status, message, detail[0]["field"] if detail else "body", detail)


def _field(loc: Sequence) -> str:
    return ".".join(str(p) for p in loc) or "body"


# --------------------------------------------------------------------------------------------
# Episodes and answers (pure)


def default_episode_id(req: AgentRequest, seed: int) -> str:
    """A stable id for a request without one, so the same request samples the same episode."""
    key = json.dumps([req.task, req.question, seed])
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def agent_config_for(base: AgentConfig, req: AgentRequest) -> AgentConfig:
    """The server's agent settings with the request's overrides (AgentConfig validates them again)."""
    overrides = {
        "max_turns": req.max_turns,
        "max_new_tokens": req.max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "seed": req.seed,
    }
    return dataclasses.replace(base, task=req.task, **{k: v for k, v in overrides.items() if v is not None})


def episode_for(base: AgentConfig, req: AgentRequest) -> Episode:
    """The episode a validated request asks for."""
    cfg = agent_config_for(base, req)
    return new_episode(
        get_task(req.task), req.question, cfg, req.id or default_episode_id(req, cfg.seed), sampling_from(cfg)
    )


def response_status(ep: Episode) -> int:
    """200, or 503 when the episode ended because the LLM deployment failed (not the model's doing)."""
    return 503 if ep.failure_reason == GENERATION_ERROR else 200


def agent_response(ep: Episode, task: str, model: str, gold: Any = None) -> dict:
    """JSON body of a finished episode; ``correct`` (paper and robust rules) only when ``gold`` is given."""
    body = {
        "id": ep.id,
        "model": model,
        "task": task,
        "answer": ep.answer,
        "finished": ep.finished,
        "failure_reason": ep.failure_reason,
        "error": ep.steps[-1].error if ep.failure_reason and ep.steps else None,
        "turns": ep.turns,
        "prompt": ep.prompt,
        "trajectory": ep.trajectory(),
        "usage": {
            "prompt_tokens": ep.prompt_tokens,
            "completion_tokens": ep.completion_tokens,
            "total_tokens": ep.prompt_tokens + ep.completion_tokens,
        },
    }
    if gold is not None:
        score = get_task(task).score(ep.answer, gold if isinstance(gold, str | bool) else str(gold))
        body["correct"] = {"paper": score.correct_paper, "robust": score.correct_robust, "f1": score.f1}
    return body


# --------------------------------------------------------------------------------------------
# The stepper's engine and tool runner over Serve deployment handles (run inside the ingress)


class ServeChatEngine:
    """The stepper's streaming engine (:class:`nat_ray.react.StreamingEngine`) over the LLM deployment.

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
        """The batch form (:class:`nat_ray.react.ChatEngine`): all calls at once, answers in order."""
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
        )
        try:
            async with asyncio.timeout(self.timeout_s):
                items = [item async for item in self.handle.chat.remote(request, None)]
        except (*_ray_errors(), TimeoutError) as err:
            log.warning("LLM call failed: %s: %s", type(err).__name__, err)
            return Generation("", finish_reason="error", error=f"LLM deployment: {type(err).__name__}: {err}")
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
        )


class ServeTools:
    """The stepper's async tool runner over tool deployment handles (``{"calculate": handle, ...}``).

    ``submit`` starts the call on the ingress's event loop and returns a concurrent future;
    ``collect`` hands back the finished ones. A call that hits a dying replica is retried once,
    then becomes an ``Error:`` observation: the episode goes on, the request still succeeds.
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
                return await self.handles[call.name].call.remote(call.argument)
            except _ray_errors() as err:
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
    in arrival order), and resolves each future as its episode ends.
    """

    def __init__(self, engine, tools, *, max_open: int, stop_on_tool_error: bool) -> None:
        self.engine = engine
        self.tools = tools
        self.max_open = max_open
        self.stop_on_tool_error = stop_on_tool_error
        self.finished = 0
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._queued: collections.deque = collections.deque()
        self._futures: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._stop = threading.Event()
        self._stepper = self._new_stepper()
        self._thread = threading.Thread(target=self._run, name="nat-ray-stepper", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def open(self) -> int:
        return self._stepper.open

    @property
    def queued(self) -> int:
        return len(self._queued) + self._inbox.qsize()

    def submit(self, episode: Episode) -> asyncio.Future:
        """Queue ``episode``; the future resolves to it when it has ended."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._inbox.put((episode, loop, future))
        return future

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _new_stepper(self) -> Stepper:
        return Stepper(
            self.engine, self.tools, stop_on_tool_error=self.stop_on_tool_error, on_done=self._done
        )

    def _run(self) -> None:
        while not self._stop.is_set():
            self._take(block=self._stepper.open == 0 and not self._queued)
            while self._queued and self._stepper.open < self.max_open:
                episode = self._queued.popleft()
                if episode.done:  # the stepper ignores ended episodes; answer it here
                    self._done(episode)
                self._stepper.add(episode)
            if not self._stepper.open:
                continue
            try:
                self._stepper.step()
            except Exception as err:  # noqa: BLE001 - a bug must fail its requests, not the server
                log.exception("the agent loop failed; ending its open episodes")
                self._fail_open(err)

    def _take(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            episode, loop, future = item
            self._futures[id(episode)] = (loop, future)
            self._queued.append(episode)
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
        queued = {id(ep) for ep in self._queued}
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


# --------------------------------------------------------------------------------------------
# Deployments


class ToolDeployment:
    """One tool (``calculate`` or ``search``) as an autoscaling deployment; heavy state loads in ``__init__``."""

    def __init__(self, name: str, tools: dict) -> None:
        from nat_ray.tools import REGISTRY, configure_tools

        configure_tools(from_dict(ToolsConfig, tools, "tools"))
        self.name = name
        self.fn = REGISTRY[name]
        if name == "search":  # load the index now, not on the first question
            from nat_ray.tools.search import get_search_backend

            backend = get_search_backend()
            if hasattr(backend, "load"):
                backend.load()

    def call(self, argument: str) -> ToolResult:
        from nat_ray.react import call_tool

        return call_tool(self.fn, ToolCall(self.name, argument))

    def pid(self) -> int:
        return os.getpid()


def llm_error(item) -> tuple[int, str, str | None] | None:
    """``(status, message, param)`` when the LLM deployment answered with an error object, else None.

    Duck-typed: ray.serve.llm yields its internal ``ErrorResponse``, not the public subclass.
    """
    error = getattr(item, "error", None)
    if error is None or not hasattr(error, "message"):
        return None
    return int(getattr(error, "code", None) or 500), str(error.message), getattr(error, "param", None)


def _materialize_messages(body) -> tuple[int, str, str] | None:
    """Turn pydantic's lazy iterables in ``messages`` into lists (they cannot be pickled to the LLM
    replica); they are validated only now, so return ``(422, field, message)`` for a bad one."""
    from pydantic import ValidationError

    for i, message in enumerate(body.messages):
        message = dict(message) if isinstance(message, dict) else message.model_dump()
        for key in ("content", "tool_calls"):
            value = message.get(key)
            if value is not None and not isinstance(value, str | list):
                try:
                    message[key] = list(value)
                except (ValidationError, TypeError, ValueError) as err:
                    problem = err.errors()[0]["msg"] if isinstance(err, ValidationError) else str(err)
                    field = f"messages.{i}.{key}"
                    return 422, field, f"{field}: expected text or a list of content parts ({problem})"
        body.messages[i] = message
    return None


async def _sse(first, stream):
    """The LLM deployment's stream (batches of ``data: ...`` strings) as server-sent events."""
    done = False
    item = first
    while True:
        for packet in item if isinstance(item, list) else [item]:
            text = packet if isinstance(packet, str) else f"data: {packet.model_dump_json()}\n\n"
            done = done or text.strip().endswith("data: [DONE]")
            yield text
        try:
            item = await stream.__anext__()
        except StopAsyncIteration:
            break
    if not done:
        yield "data: [DONE]\n\n"


api = FastAPI(title="nat-ray agent server", description=__doc__.split("\n\n")[0])


class AgentIngress:
    """The HTTP front: OpenAI routes proxied to the LLM deployment, and the batched agent.

    Serve's ingress wrapper is applied by :func:`ingress_class` (it needs Ray Serve).

    Args:
        llm: handle of the ``ray.serve.llm`` LLM deployment.
        tools: tool name -> handle of its tool deployment.
        config: the :class:`NatRayConfig` as a mapping.
        models: the model cards ``/v1/models`` lists (``id``, ``root``, ``parent``).
        agent_model: the model id the agent uses (the LoRA adapter's when one is served).
    """

    def __init__(self, llm, tools: dict, config: dict, models: list[dict], agent_model: str) -> None:
        self.cfg = from_dict(NatRayConfig, config)
        self.llm = llm
        self.tool_handles = tools
        self.models = models
        self.model_ids = {m["id"] for m in models}
        self.agent_model = agent_model
        self.started = int(time.time())
        self.loop: AgentLoop | None = None
        self._chat_handle = llm.options(stream=True)
        import ray.serve.llm.openai_api_models  # noqa: F401 - imports vLLM (tens of seconds): now, not on a request

    def _agent_loop(self) -> AgentLoop:
        # Built on the first request, on the event loop every handler runs on (the handles' loop).
        if self.loop is None:
            event_loop = asyncio.get_running_loop()
            self.loop = AgentLoop(
                ServeChatEngine(self.llm, self.agent_model, event_loop, self.cfg.serve.request_timeout_s),
                ServeTools(self.tool_handles, event_loop),
                max_open=self.cfg.serve.max_concurrent_episodes,
                stop_on_tool_error=self.cfg.agent.stop_on_tool_error,
            )
        return self.loop

    def check_health(self) -> None:
        """Serve restarts the replica if the agent loop's thread has died."""
        if self.loop is not None and not self.loop.alive:
            raise RuntimeError("the agent loop thread has stopped")

    def __del__(self) -> None:
        if getattr(self, "loop", None) is not None:
            self.loop.stop()

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        loop = self.loop
        return JSONResponse(
            {
                "status": "ok" if loop is None or loop.alive else "agent loop stopped",
                "model": self.agent_model,
                "open_episodes": loop.open if loop else 0,
                "queued_episodes": loop.queued if loop else 0,
                "finished_episodes": loop.finished if loop else 0,
            },
            status_code=200 if loop is None or loop.alive else 503,
        )

    @api.get("/v1/models")
    async def list_models(self) -> JSONResponse:
        data = [
            {"id": m["id"], "object": "model", "created": self.started, "owned_by": "nat-ray", **m}
            for m in self.models
        ]
        return JSONResponse({"object": "list", "data": data})

    @api.post("/v1/agent")
    async def agent(self, request: Request) -> JSONResponse:
        try:
            req = AgentRequest.model_validate_json(await request.body(), context=self.cfg.serve)
            episode = episode_for(self.cfg.agent, req)
        except ValidationError as err:
            status, body = validation_error(err)
            return JSONResponse(body, status_code=status)
        except ConfigError as err:  # a value pydantic let through but AgentConfig refuses
            return JSONResponse(error_body(422, str(err), None), status_code=422)
        future = self._agent_loop().submit(episode)
        try:
            episode = await asyncio.wait_for(asyncio.shield(future), self.cfg.serve.request_timeout_s)
        except TimeoutError:
            message = (
                f"the episode took longer than serve.request_timeout_s={self.cfg.serve.request_timeout_s:g} s"
            )
            return JSONResponse(error_body(504, message, None), status_code=504)
        body = agent_response(episode, req.task, self.agent_model, req.gold)
        status = response_status(episode)
        if status != 200:
            body.update(error_body(status, f"the LLM deployment failed: {body['error']}", None))
        return JSONResponse(body, status_code=status)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        from ray.serve.llm.openai_api_models import ChatCompletionRequest
        from vllm.exceptions import VLLMClientError

        raw = await request.body()
        try:
            data = json.loads(raw)
        except ValueError as err:
            return JSONResponse(error_body(400, f"body: malformed JSON ({err})", "body"), status_code=400)
        if not isinstance(data, dict):
            return JSONResponse(error_body(422, "body: expected a JSON object", "body"), status_code=422)
        try:
            body = ChatCompletionRequest.model_validate(data)
        except ValidationError as err:
            status, payload = validation_error(err)
            return JSONResponse(payload, status_code=status)
        except (VLLMClientError, TypeError, ValueError) as err:  # vLLM's own checks of the body
            param = getattr(err, "parameter", None) or "body"
            return JSONResponse(error_body(400, f"{param}: {err}", param), status_code=400)
        problem = self._check_chat_limits(body) or _materialize_messages(body)
        if problem is not None:
            status, param, message = problem
            return JSONResponse(error_body(status, message, param), status_code=status)
        try:
            async with asyncio.timeout(self.cfg.serve.request_timeout_s):
                stream = self._chat_handle.chat.remote(body, None)
                first = await stream.__anext__()
        except (*_ray_errors(), TimeoutError, StopAsyncIteration) as err:
            log.warning("chat completion failed: %s: %s", type(err).__name__, err)
            message = f"the LLM deployment did not answer: {type(err).__name__}"
            return JSONResponse(error_body(503, message, None), status_code=503)
        error = llm_error(first)
        if error is not None:  # vLLM refused the request (a bad parameter value, a prompt too long)
            status, message, param = error
            return JSONResponse(error_body(status, message, param), status_code=status)
        if not body.stream:
            return JSONResponse(first.model_dump(mode="json"))
        return StreamingResponse(_sse(first, stream), media_type="text/event-stream")

    def _check_chat_limits(self, body) -> tuple[int, str, str] | None:
        """``(status, field, message)`` when a valid chat request asks for an unknown model or too many tokens."""
        if body.model is None:
            body.model = self.agent_model
        if body.model not in self.model_ids:
            return (
                404,
                "model",
                f"model: {body.model!r} is not served here; served models: {sorted(self.model_ids)}",
            )
        limit = self.cfg.serve.max_tokens_limit
        for name in ("max_tokens", "max_completion_tokens"):
            value = getattr(body, name)
            if value is not None and value > limit:
                return 422, name, f"{name}: {value} is over the limit of {limit} (serve.max_tokens_limit)"
        return None


@functools.cache
def ingress_class() -> type:
    """:class:`AgentIngress` wrapped as Serve's ASGI ingress of the FastAPI app ``api``."""
    from ray import serve

    return serve.ingress(api)(AgentIngress)


# --------------------------------------------------------------------------------------------
# Building the application


def served_model_ids(cfg: NatRayConfig, model_path: str) -> tuple[str, str | None]:
    """The base model's id and the LoRA adapter's (``<id>-lora``, or None without an adapter).

    Without ``serve.model_id`` the id is the model folder's name, or the training run's name for
    a training export (``<run>/export/model``).
    """
    path = Path(model_path)
    derived = path.parents[1].name if (path.parent / "export.json").is_file() else path.name
    model_id = cfg.serve.model_id or derived
    return model_id, (f"{model_id}-lora" if cfg.serve.lora else None)


def resolve_export(path: str, kind: str) -> str:
    """A training export folder (it holds ``export.json``) stands for its ``model/`` or ``adapter/``.

    Args:
        path: a model or adapter path as configured.
        kind: ``"model"`` or ``"adapter"``.

    Raises:
        ModelError: the export has no ``kind`` (e.g. an adapter asked of a full fine-tune).
    """
    folder = Path(path).expanduser()
    manifest = folder / "export.json"
    if not manifest.is_file():
        return path
    export = json.loads(manifest.read_text())
    if not export.get(kind) or not (folder / kind).is_dir():
        raise ModelError(
            f"{folder} is a training export (mode {export.get('mode')!r}) without {kind}/; "
            f"it holds: {sorted(k for k in ('model', 'adapter') if export.get(k))}"
        )
    log.info("%s is a training export: serving its %s/", folder, kind)
    return str(folder / kind)


def check_lora(path: str) -> str:
    """The absolute path of a peft adapter directory (or of a training export's ``adapter/``).

    Raises:
        ModelError: the directory or its ``adapter_config.json`` is missing.
    """
    lora = Path(resolve_export(path, "adapter")).expanduser().resolve()
    if not (lora / "adapter_config.json").is_file():
        raise ModelError(
            f"serve.lora={path!r} is not a peft adapter directory (no adapter_config.json); "
            "pass the folder that save_pretrained wrote, or a training export folder"
        )
    return str(lora)


def served_paths(cfg: NatRayConfig) -> tuple[str, str | None]:
    """The model path vLLM loads and the adapter path (None without ``serve.lora``).

    Raises:
        ModelError: a missing model or adapter.
    """
    from nat_ray.models import resolve_model

    model_path = resolve_model(resolve_export(cfg.engine.model, "model"))
    return model_path, (check_lora(cfg.serve.lora) if cfg.serve.lora else None)


def llm_config(
    cfg: NatRayConfig,
    model_path: str,
    model_id: str,
    lora_id: str | None = None,
    lora_path: str | None = None,
):
    """The ``ray.serve.llm`` :class:`LLMConfig` of the served model (vLLM engine settings from ``engine``).

    On CPU (``serve.llm_num_gpus == 0``) the engine gets one CPU bundle, float32, eager mode and a
    ``engine.kv_cache_gb`` KV cache; on GPU, one bundle per tensor-parallel rank. A LoRA adapter is
    loaded once at start as a static vLLM LoRA module named ``lora_id``.
    """
    from ray.serve.llm import LLMConfig

    engine, scfg = cfg.engine, cfg.serve
    gpu = scfg.llm_num_gpus > 0
    if engine.device == "cpu" and gpu:
        raise ConfigError("engine.device='cpu' but serve.llm_num_gpus > 0; set serve.llm_num_gpus=0")
    if engine.device == "cuda" and not gpu:
        raise ConfigError("engine.device='cuda' needs serve.llm_num_gpus > 0 (GPUs per vLLM replica)")
    kwargs: dict[str, Any] = {
        "dtype": engine.dtype if engine.dtype != "auto" else ("bfloat16" if gpu else "float32"),
        "max_model_len": engine.max_model_len,
        "enforce_eager": (not gpu) if engine.enforce_eager is None else engine.enforce_eager,
        "enable_prefix_caching": engine.enable_prefix_caching,
        "seed": engine.seed,
        "max_num_seqs": engine.max_num_seqs,
        "tensor_parallel_size": engine.tensor_parallel_size,
    }
    if gpu:
        kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
        bundles = [{"CPU": scfg.llm_num_cpus, "GPU": scfg.llm_num_gpus / engine.tensor_parallel_size}]
        bundles += [{"GPU": scfg.llm_num_gpus / engine.tensor_parallel_size}] * (
            engine.tensor_parallel_size - 1
        )
        env = {}
    else:
        bundles = [{"CPU": scfg.llm_num_cpus}]  # ray.serve.llm's default bundle asks for a GPU
        from nat_ray.engines.vllm_engine import CPU_ENGINE_DEFAULTS, cpu_reserved_cores

        reserved = scfg.llm_cpu_reserved_cores
        env = {
            "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(engine.kv_cache_gb))),
            # ray.serve.llm runs vLLM's multiprocess executor on CPU; this decides whether its model
            # worker computes on every core or leaves one to the scheduler (see cpu_reserved_cores).
            "VLLM_CPU_NUM_OF_RESERVED_CPU": str(cpu_reserved_cores() if reserved is None else reserved),
        }
        kwargs.update(CPU_ENGINE_DEFAULTS)  # why: see there
    if lora_path is not None or engine.lora:
        kwargs.update(enable_lora=True, max_lora_rank=engine.max_lora_rank)
    if lora_path is not None:
        kwargs["lora_modules"] = [{"name": lora_id, "path": lora_path, "base_model_name": model_id}]
    kwargs.update(engine.extra)
    return LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": model_path},
        engine_kwargs=kwargs,
        placement_group_config={"bundles": bundles},
        runtime_env={"env_vars": env},
        deployment_config={"num_replicas": scfg.llm_replicas},
    )


def check_limits(cfg: NatRayConfig) -> None:
    """The server's own agent defaults must fit the limits it enforces on requests."""
    if cfg.agent.max_turns > cfg.serve.max_turns_limit:
        raise ConfigError(
            f"agent.max_turns={cfg.agent.max_turns} is over serve.max_turns_limit={cfg.serve.max_turns_limit}"
        )
    if cfg.agent.max_new_tokens > cfg.serve.max_tokens_limit:
        raise ConfigError(
            f"agent.max_new_tokens={cfg.agent.max_new_tokens} is over "
            f"serve.max_tokens_limit={cfg.serve.max_tokens_limit}"
        )
    if cfg.engine.backend != "vllm":
        raise ConfigError(
            f"serving runs vLLM through ray.serve.llm; engine.backend must be 'vllm', got {cfg.engine.backend!r}"
        )


def build_app(cfg: NatRayConfig):
    """The Serve application (not running): LLM deployment, tool deployments and the agent ingress.

    Raises:
        ConfigError / ModelError: bad settings, a missing model or adapter, before anything starts.
    """
    from ray import serve
    from ray.serve.llm import build_llm_deployment

    from nat_ray.tools import REGISTRY

    check_limits(cfg)
    model_path, lora_path = served_paths(cfg)
    model_id, lora_id = served_model_ids(cfg, model_path)
    llm = build_llm_deployment(llm_config(cfg, model_path, model_id, lora_id, lora_path))
    autoscaling = {
        "min_replicas": cfg.serve.tool_min_replicas,
        "max_replicas": cfg.serve.tool_max_replicas,
        "initial_replicas": max(1, cfg.serve.tool_min_replicas),
        "target_ongoing_requests": TOOL_TARGET_ONGOING_REQUESTS,
    }
    tools = {
        name: serve.deployment(
            ToolDeployment,
            name=f"tool-{name}",
            autoscaling_config=autoscaling,
            max_ongoing_requests=TOOL_MAX_ONGOING_REQUESTS,
            ray_actor_options={"num_cpus": 0},
        ).bind(name, dataclasses.asdict(cfg.tools))
        for name in REGISTRY
    }
    models = [{"id": model_id, "root": model_path, "parent": None}]
    if lora_id is not None:
        models.append({"id": lora_id, "root": lora_path, "parent": model_id})
    ingress = serve.deployment(
        ingress_class(),
        name="AgentIngress",
        num_replicas=1,  # one replica = one stepper: every agent request shares its batches
        max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS,
        ray_actor_options={"num_cpus": 0},
    )
    resolved = {**dataclasses.asdict(cfg), "engine": {**dataclasses.asdict(cfg.engine), "model": model_path}}
    return ingress.bind(llm, tools, resolved, models, lora_id or model_id)


def build_app_from_args(args: dict):
    """Application builder for ``serve run`` / ``serve deploy``.

    ``args`` (YAML ``args:`` or ``serve run ... key=value``): ``config`` (a nat-ray YAML), ``model``,
    ``lora`` and ``set`` (a list of ``section.key=value`` overrides, or one string).
    """
    overrides = args.get("set") or []
    overrides = [overrides] if isinstance(overrides, str) else list(overrides)
    unknown = set(args) - {"config", "model", "lora", "set"}
    if unknown:
        raise ConfigError(f"unknown application args {sorted(unknown)}; known: config, model, lora, set")
    if args.get("model"):
        overrides.append(f"engine.model={json.dumps(args['model'])}")
    if args.get("lora"):
        overrides.append(f"serve.lora={json.dumps(args['lora'])}")
    return build_app(load_config(NatRayConfig, args.get("config"), overrides))


def start_ray_for(cfg: NatRayConfig) -> None:
    """Join ``RAY_ADDRESS``'s cluster, or start a local Ray with enough logical CPUs for the replicas."""
    from nat_ray.rollout import init_ray

    # Each vLLM replica holds its CPU bundle plus one CPU for the replica actor.
    init_ray(cfg.serve.llm_replicas * (cfg.serve.llm_num_cpus + 1) + 2)


def run_serve(cfg: NatRayConfig) -> None:
    """Start Ray if needed, deploy the application on ``serve.host:serve.port``, block until Ctrl-C."""
    import ray
    from ray import serve

    check_limits(cfg)  # settings and missing models fail before Ray starts
    served_paths(cfg)
    start_ray_for(cfg)
    application = build_app(cfg)  # ray.serve.llm reads the runtime context: Ray must be up
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    print(f"starting the LLM, tool and agent deployments (the vLLM engine takes a minute or two) for {url}")
    serve.run(application, name=APP_NAME, route_prefix="/")
    print(f"nat-ray is serving at {url}")
    print(
        f"  GET  {url}/v1/models   POST {url}/v1/chat/completions   POST {url}/v1/agent   GET {url}/healthz"
    )
    print("press Ctrl-C to stop")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping")
    finally:
        if os.environ.get("RAY_ADDRESS"):
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
            ray.shutdown()


# --------------------------------------------------------------------------------------------
# Command line


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``serve`` on the CLI's subparsers; the parser's ``func`` is :func:`run`."""
    from nat_ray.cli import _add_config_args

    p = subparsers.add_parser(
        "serve",
        help="serve the agent on Ray Serve: OpenAI routes, /v1/agent, tool deployments (stage 3)",
        description=(
            "Serve a model (the embedded one, a full fine-tune, or a base model plus a LoRA adapter) on\n"
            "vLLM through ray.serve.llm, with autoscaling calculator and search deployments and an agent\n"
            "route that batches concurrent requests in one ReAct loop. Routes: GET /v1/models,\n"
            "POST /v1/chat/completions (OpenAI-compatible, streaming), POST /v1/agent, GET /healthz.\n"
            "Set RAY_ADDRESS to deploy on a running cluster; otherwise a local Ray starts."
        ),
        epilog=(
            "examples:\n"
            "  nat-ray serve --config configs/serve.yaml\n"
            "  nat-ray serve --model runs/train/nat/export/model --port 8000\n"
            "  nat-ray serve --lora runs/train/nat/export/adapter\n"
            '  curl -s localhost:8000/v1/agent -d \'{"task": "gsm8k", "question": "2 pens of 12 hens?"}\'\n'
            "  serve run nat_ray.serve:build_app_from_args config=configs/serve.yaml"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="HF checkpoint path or hub id (default: the embedded SmolLM2-135M)")
    p.add_argument("--lora", help="peft adapter directory to serve on top of --model")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    _add_config_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """``nat-ray serve``: load the config with the flags as overrides, then :func:`run_serve`."""
    from nat_ray.cli import _overrides

    flags = {"model": "engine.model", "lora": "serve.lora", "host": "serve.host", "port": "serve.port"}
    run_serve(load_config(NatRayConfig, args.config, _overrides(args, flags)))
    return 0
