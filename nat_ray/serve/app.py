"""The Serve application: the tuned agent on Ray Serve, with vLLM through ``ray.serve.llm`` and tool deployments.

One Serve application, four deployments::

    HTTP -> AgentIngress (FastAPI) --chat--> LLMServer:<model_id>   (ray.serve.llm, vLLM; base + LoRA)
                                   --call--> tool-calculate          (ToolHost, autoscaling)
                                   --call--> tool-search             (ToolHost, autoscaling)

``POST /v1/agent`` runs the project's one ReAct loop inside the ingress (:class:`AgentLoop`):
concurrent requests share one stepper and so the model's batches; each episode's turns go to the
LLM deployment and its tool calls to the tool deployments, through their handles.

Routes:

- ``GET /healthz``: ``{"status", "model", "open_episodes", "queued_episodes", "finished_episodes"}``.
- ``GET /v1/models``: the base model and, with ``serve.lora``, the adapter (``<model_id>-lora``).
- ``POST /v1/chat/completions`` and ``POST /v1/completions``: OpenAI-compatible (``stream`` too), so
  the ``openai`` client works unchanged; ``model`` defaults to the agent's model; a message role
  vLLM does not know is a 400, and a request without ``max_tokens`` gets ``serve.max_tokens_limit``.
- ``POST /v1/agent``: :class:`nat_ray.serve.api.AgentRequest` in; ``{id, episode_id, model, task,
  answer, finished, failure_reason, error, turns, prompt, trajectory, usage}`` out, plus ``correct``
  (paper, robust, f1) with ``gold``. With ``serve.capture`` each answered episode is also written to
  ``serve.capture_dir`` (:mod:`nat_ray.serve.capture`).
- ``POST /v1/feedback``: :class:`nat_ray.serve.api.FeedbackRequest` (``episode_id``, ``score`` in
  [0, 1], ``answer``) for a captured episode: 200 when recorded, 400 for a bad body, 404 for an id this
  server never issued, 409 when capture is off.

Every body is validated before anything runs: malformed JSON is a 400, a schema or limit violation a
422 (an unknown model a 404), and the error's ``param`` and message name the field. Limits come from
:class:`nat_ray.config.ServeConfig`. A 5xx means the server failed, never the input: 503 when the
LLM deployment fails (also for an agent episode it cut short), 504 past ``serve.request_timeout_s``.

The door (:mod:`nat_ray.serve.guards`, in front of every path): with ``$NAT_RAY_API_KEY`` (the
variable ``serve.api_key_env`` names) set, a request without ``Authorization: Bearer <key>`` is a 401;
a body over ``serve.max_body_bytes`` a 413; an agent request beyond ``serve.max_concurrent_episodes``
+ ``serve.max_queued_episodes`` a 429 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
import time
from pathlib import Path

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import RayServeException

from nat_ray.agent import prepare_tasks, with_tasks_resolved
from nat_ray.config import NatRayConfig, from_dict, load_config
from nat_ray.core import episode_ids, records
from nat_ray.core.agent_card import read_card
from nat_ray.engines.vllm_args import engine_kwargs, served_cpu_env
from nat_ray.errors import ConfigError
from nat_ray.models import resolve_model, served_paths
from nat_ray.ray_runtime import init_ray
from nat_ray.serve.adapters import (
    ADAPTER_CONFIG,
    ModelProblem,
    ModelRef,
    adapter_missing,
    is_remote,
    local_adapter_dir,
    local_adapters,
    name_problem,
    parse_model,
)
from nat_ray.serve.agent_loop import AgentLoop, ServeChatEngine, ServeTools
from nat_ray.serve.api import (
    AgentRequest,
    FeedbackRequest,
    agent_response,
    episode_for,
    error_body,
    llm_error,
    response_status,
    validation_error,
)
from nat_ray.serve.capture import (
    CaptureWriter,
    FeedbackLog,
    Ticker,
    capture_secret,
    captured_row,
    load_redactor,
    recover_lost,
    redacted,
    with_capture_resolved,
)
from nat_ray.serve.guards import (
    Admission,
    DoorRules,
    GuardMiddleware,
    Secret,
    api_key_from_env,
    cap_max_tokens,
    role_problem,
)
from nat_ray.serve.llm_init import LocalModelCallback
from nat_ray.tasks import registered_task
from nat_ray.tools import configured_versions
from nat_ray.tools.actors import actor_runtime_env
from nat_ray.tools.host import ToolHost
from nat_ray.tools.mcp import require_servers

log = logging.getLogger(__name__)

APP_NAME = "nat-ray"
# The ingress queues agent requests itself (beyond serve.max_concurrent_episodes they wait for a
# slot in the stepper), so Serve must never hold them back at the door: that would shrink batches.
INGRESS_MAX_ONGOING_REQUESTS = 4096
TOOL_MAX_ONGOING_REQUESTS = 16  # per tool replica; above 2 in flight per replica, autoscaling adds one
TOOL_TARGET_ONGOING_REQUESTS = 2


def _materialize_messages(body) -> tuple[int, str, str] | None:
    """Turn pydantic's lazy iterables in ``messages`` into lists (they cannot be pickled to the LLM
    replica); they are validated only now, so return ``(422, field, message)`` for a bad one."""
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


def _door_rules() -> DoorRules:
    """The rules of the replica a request reached (its ingress object holds them)."""
    return serve.get_replica_context().servable_object.door


# In front of the whole app, not per route: the key and the body size hold for every path,
# unknown ones included, and before any body is parsed.
api.add_middleware(GuardMiddleware, rules=_door_rules)


def _drift_tokenizer(model: str):
    """The served model's tokenizer, to count each episode's token drift; None (drift not counted)
    where this replica cannot load it (a model whose files are on another node)."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(resolve_model(model))
    except Exception as err:  # drift is a check, never a reason to fail the server
        log.warning("token drift is not counted: the tokenizer did not load (%s)", err)
        return None


class AgentIngress:
    """The HTTP front: OpenAI routes proxied to the LLM deployment, and the batched agent.

    Serve's ingress wrapper is applied by :func:`ingress_class`.

    Args:
        llm: handle of the ``ray.serve.llm`` LLM deployment.
        tools: tool name -> handle of its tool deployment.
        config: the :class:`NatRayConfig` as a mapping.
        models: the model cards ``/v1/models`` lists (``id``, ``root``, ``parent``).
        agent_model: the model id the agent uses (the LoRA adapter's when one is served).
        api_key: the key every request must carry (:func:`build_app` reads it where the app is
            built); None: this replica's own ``serve.api_key_env`` variable decides.
    """

    def __init__(
        self,
        llm,
        tools: dict,
        config: dict,
        models: list[dict],
        agent_model: str,
        api_key: Secret | None = None,
    ) -> None:
        self.cfg = from_dict(NatRayConfig, config)
        limits = self.cfg.serve
        self.door = DoorRules(api_key or api_key_from_env(limits.api_key_env), limits.max_body_bytes)
        # Episodes running plus those waiting for a slot; beyond that a request gets 429.
        self.admission = Admission(
            limits.max_concurrent_episodes + limits.max_queued_episodes, limits.max_concurrent_episodes
        )
        tasks, _ = prepare_tasks(self.cfg.serve.tasks, self.cfg)
        # Requests are validated against the names of the tasks the server was started with.
        self.request_limits = dataclasses.replace(self.cfg.serve, tasks=[task.name for task in tasks])
        self.llm = llm
        self.tool_handles = tools
        self.models = models
        self.model_ids = {m["id"] for m in models}
        self.agent_model = agent_model
        self.started = int(time.time())
        self.loop: AgentLoop | None = None
        self._chat_handle = llm.options(stream=True)
        self.lora_dir = self.cfg.serve.lora_dir  # adapters on demand: "<base>:<folder in lora_dir>"
        self.base_model = models[0]["id"]
        self._adapter_handles: dict[tuple[str, bool], object] = {}
        self.tokenizer = _drift_tokenizer(self.cfg.engine.model)  # at start-up, not on a request
        self._start_capture()
        import ray.serve.llm.openai_api_models  # noqa: F401 - imports vLLM (tens of seconds): now, not on a request

    def _start_capture(self) -> None:
        """With ``serve.capture``: count what a killed replica lost, then open this replica's writer."""
        serve_cfg = self.cfg.serve
        self.capture: CaptureWriter | None = None
        self.feedback: FeedbackLog | None = None
        self._ticker: Ticker | None = None
        if not serve_cfg.capture:
            # Ids stay unique and unforgeable; with nothing captured, feedback is refused (409).
            self.id_secret = episode_ids.new_secret()
            return
        folder = serve_cfg.capture_dir
        recover_lost(folder, stale_s=max(30.0, 3 * serve_cfg.capture_flush_s))
        self.id_secret = capture_secret(folder)
        self.capture = CaptureWriter(folder, serve_cfg.capture_flush_rows, serve_cfg.capture_flush_s)
        self.feedback = FeedbackLog(folder, self.capture.replica)
        self.redact = load_redactor(serve_cfg.capture_redact)
        self._ticker = Ticker(self.capture)
        self.tool_versions = configured_versions(self.cfg.tools)
        self.capture_hash = records.config_hash(
            {"engine": {"model": self.cfg.engine.model}, "agent": dataclasses.asdict(self.cfg.agent)}
        )
        log.info("capturing /v1/agent episodes in %s (replica %s)", folder, self.capture.replica)

    def _agent_loop(self) -> AgentLoop:
        # Built on the first request, on the event loop every handler runs on (the handles' loop).
        if self.loop is None:
            event_loop = asyncio.get_running_loop()
            timeout_s = self.cfg.serve.request_timeout_s
            self.loop = AgentLoop(
                ServeChatEngine(self.llm, self.agent_model, event_loop, timeout_s),
                ServeTools(self.tool_handles, event_loop),
                max_open=self.cfg.serve.max_concurrent_episodes,
                stop_on_tool_error=self.cfg.agent.stop_on_tool_error,
                engine_for=lambda model: ServeChatEngine(self._llm_for(model), model, event_loop, timeout_s),
            )
        return self.loop

    def _model_ref(self, model: str) -> ModelRef:
        """The served model ``model`` names; an adapter must be in ``serve.lora_dir`` now.

        Raises:
            ModelProblem: 400 for a name that is not plain, 404 for a model or adapter not served.
        """
        ref = parse_model(model, self.base_model, self.model_ids, self.lora_dir is not None)
        if ref.adapter is not None and not _adapter_exists(self.lora_dir, ref.adapter):
            raise adapter_missing(model, ref.adapter, self.lora_dir)
        return ref

    def _agent_settings(self, ref: ModelRef):
        """The agent settings an episode of ``ref`` starts from: an adapter with an agent card is asked
        as its card says (template, shots, turns, tokens); the request's own fields still win."""
        if ref.adapter is None or is_remote(self.lora_dir):
            return self.cfg.agent
        folder = local_adapter_dir(self.lora_dir, ref.adapter)
        card = read_card(str(folder)) if folder is not None else None
        return (
            self.cfg.agent if card is None else dataclasses.replace(self.cfg.agent, **card.agent_settings())
        )

    def _llm_for(self, model: str, stream: bool = False):
        """The LLM handle for ``model``: an adapter's requests go through Serve's model multiplexing,
        so ray.serve.llm loads the adapter on the replica that serves them (and keeps it there)."""
        ref = parse_model(model, self.base_model, self.model_ids, self.lora_dir is not None)
        if ref.adapter is None:
            return self._chat_handle if stream else self.llm
        key = (model, stream)
        if key not in self._adapter_handles:  # handles are cached: each new one sets up its own router
            self._adapter_handles[key] = self.llm.options(stream=stream, multiplexed_model_id=model)
        return self._adapter_handles[key]

    def check_health(self) -> None:
        """Serve restarts the replica if the agent loop's thread has died."""
        if self.loop is not None and not self.loop.alive:
            raise RuntimeError("the agent loop thread has stopped")

    def __del__(self) -> None:
        if getattr(self, "loop", None) is not None:
            self.loop.stop()
        if getattr(self, "_ticker", None) is not None:
            self._ticker.stop()
        if getattr(self, "capture", None) is not None:
            self.capture.close()  # a graceful stop writes what it kept

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
                "captured_episodes": None
                if self.capture is None
                else {"written": self.capture.written, "pending": self.capture.pending},
            },
            status_code=200 if loop is None or loop.alive else 503,
        )

    @api.get("/v1/models")
    async def list_models(self) -> JSONResponse:
        models = list(self.models)
        if self.lora_dir is not None:  # whatever lora_dir holds now, not what it held at start
            names = await asyncio.to_thread(_adapter_names, self.lora_dir)
            models += [
                {"id": f"{self.base_model}:{n}", "root": f"{self.lora_dir}/{n}", "parent": self.base_model}
                for n in names
            ]
        data = [
            {"id": m["id"], "object": "model", "created": self.started, "owned_by": "nat-ray", **m}
            for m in models
        ]
        return JSONResponse({"object": "list", "data": data})

    @api.post("/v1/agent")
    async def agent(self, request: Request) -> JSONResponse:
        try:
            req = AgentRequest.model_validate_json(await request.body(), context=self.request_limits)
        except ValidationError as err:
            status, body = validation_error(err)
            return JSONResponse(body, status_code=status)
        model = req.model or self.agent_model
        try:
            ref = self._model_ref(model)  # before anything is loaded: a plain name, an adapter that exists
            episode = episode_for(await asyncio.to_thread(self._agent_settings, ref), req)
        except ModelProblem as err:
            return JSONResponse(error_body(err.status, str(err), "model"), status_code=err.status)
        except ConfigError as err:  # a value pydantic let through but AgentConfig refuses, a bad card
            return JSONResponse(error_body(422, str(err), None), status_code=422)
        if not self.admission.try_enter():
            return self._busy()
        admitted, started_at = time.monotonic(), records.now_iso()
        try:
            future = self._agent_loop().submit(episode, None if model == self.agent_model else model)
        except BaseException:
            self.admission.leave(None)  # never admitted after all
            raise
        # The slot is free when the episode ends, not when this request returns (a timed-out
        # request's episode still runs in the loop).
        future.add_done_callback(lambda _: self.admission.leave(time.monotonic() - admitted))
        try:
            episode = await asyncio.wait_for(asyncio.shield(future), self.cfg.serve.request_timeout_s)
        except TimeoutError:
            message = (
                f"the episode took longer than serve.request_timeout_s={self.cfg.serve.request_timeout_s:g} s"
            )
            return JSONResponse(error_body(504, message, None), status_code=504)
        episode_id = episode_ids.issue(self.id_secret)
        body = agent_response(episode, req.task, model, req.gold, self.tokenizer, episode_id)
        if body.get("token_drift"):
            log.warning(
                "/v1/agent %s: %d turn(s) drifted: the next prompt did not continue with the ids sampled",
                episode.id,
                body["token_drift"],
            )
        status = response_status(episode)
        if status != 200:
            body.update(error_body(status, f"the LLM deployment failed: {body['error']}", None))
        elif self.capture is not None:  # journalled before the answer leaves (a kill after is counted)
            await asyncio.to_thread(self._capture, episode, req, model, episode_id, body, started_at)
        return JSONResponse(body, status_code=status)

    def _capture(self, episode, req: AgentRequest, model: str, episode_id: str, body: dict, started_at: str):
        task = registered_task(req.task)
        if not task.capture:  # the task file says its questions stay off disk
            return
        row = captured_row(
            episode,
            task,
            question=req.question,
            episode_id=episode_id,
            model=model,
            gold=req.gold,
            started_at=started_at,
            config_hash=self.capture_hash,
            tool_versions=self.tool_versions,
        )
        row["token_drift"] = body.get("token_drift")  # counted once, for the response
        if self.redact is not None:
            try:
                row = redacted(row, self.redact)
            except ValueError as err:  # never written as served when the redactor fails
                log.warning(
                    "capture: episode %s not written: serve.capture_redact failed (%s)", episode_id, err
                )
                return
        self.capture.add(row)

    @api.post("/v1/feedback")
    async def feedback_route(self, request: Request) -> JSONResponse:
        try:
            req = FeedbackRequest.model_validate_json(await request.body())
        except ValidationError as err:
            status, body = validation_error(err, invalid_status=400)
            return JSONResponse(body, status_code=status)
        if self.feedback is None:
            message = (
                "this server does not capture episodes (serve.capture is off): feedback has nowhere to go"
            )
            return JSONResponse(error_body(409, message, None), status_code=409)
        if not episode_ids.issued_with(req.episode_id, self.id_secret):
            message = f"episode_id {req.episode_id!r} was not issued by this server"
            return JSONResponse(error_body(404, message, "episode_id"), status_code=404)
        entry = await asyncio.to_thread(self.feedback.record, req.episode_id, req.score, req.answer)
        return JSONResponse({"episode_id": req.episode_id, "score": entry["score"], "recorded": True})

    def _busy(self) -> JSONResponse:
        held = self.admission.held
        message = (
            f"the server is busy: {held} agent episodes are running or waiting (serve.max_concurrent_episodes"
            " + serve.max_queued_episodes); retry later"
        )
        headers = {"Retry-After": str(self.admission.retry_after())}
        return JSONResponse(error_body(429, message, None), status_code=429, headers=headers)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        from ray.serve.llm.openai_api_models import ChatCompletionRequest

        return await self._openai_route(request, ChatCompletionRequest, "chat")

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        from ray.serve.llm.openai_api_models import CompletionRequest

        return await self._openai_route(request, CompletionRequest, "completions")

    async def _openai_route(self, request: Request, request_cls: type, method: str):
        """Check an OpenAI body against the server's rules and pass it to the LLM deployment's ``method``."""
        from vllm.exceptions import VLLMClientError

        chat = method == "chat"
        raw = await request.body()
        try:
            data = json.loads(raw)
        except ValueError as err:
            return JSONResponse(error_body(400, f"body: malformed JSON ({err})", "body"), status_code=400)
        if not isinstance(data, dict):
            return JSONResponse(error_body(422, "body: expected a JSON object", "body"), status_code=422)
        role = role_problem(data) if chat else None
        if role is not None:
            return JSONResponse(error_body(400, role[1], role[0]), status_code=400)
        try:
            body = request_cls.model_validate(data)
        except ValidationError as err:
            status, payload = validation_error(err)
            return JSONResponse(payload, status_code=status)
        except (VLLMClientError, TypeError, ValueError) as err:  # vLLM's own checks of the body
            param = getattr(err, "parameter", None) or "body"
            return JSONResponse(error_body(400, f"{param}: {err}", param), status_code=400)
        problem = self._check_chat_limits(body) or (_materialize_messages(body) if chat else None)
        if problem is not None:
            status, param, message = problem
            return JSONResponse(error_body(status, message, param), status_code=status)
        # Unbounded by default in vLLM (until the context is full): held to the server's limit.
        cap_max_tokens(body, self.cfg.serve.max_tokens_limit, ("max_tokens", "max_completion_tokens"))
        try:
            async with asyncio.timeout(self.cfg.serve.request_timeout_s):
                stream = getattr(self._llm_for(body.model, stream=True), method).remote(body, None)
                first = await stream.__anext__()
        except (RayError, RayServeException, TimeoutError, StopAsyncIteration) as err:
            log.warning("%s request failed: %s: %s", method, type(err).__name__, err)
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
        try:
            self._model_ref(body.model)
        except ModelProblem as err:
            return err.status, "model", str(err)
        limit = self.cfg.serve.max_tokens_limit
        for name in ("max_tokens", "max_completion_tokens"):
            value = getattr(body, name, None)  # a completion request has no max_completion_tokens
            if value is not None and value > limit:
                return 422, name, f"{name}: {value} is over the limit of {limit} (serve.max_tokens_limit)"
        return None


def _adapter_exists(lora_dir: str, name: str) -> bool:
    """Whether ``lora_dir/name`` holds a peft adapter now (``name`` is already a plain name)."""
    if not is_remote(lora_dir):
        return local_adapter_dir(lora_dir, name) is not None
    from ray.llm._internal.common.utils.cloud_utils import CloudFileSystem

    try:
        return CloudFileSystem.get_file(f"{lora_dir.rstrip('/')}/{name}/{ADAPTER_CONFIG}") is not None
    except Exception as err:  # noqa: BLE001 - unreachable storage: the adapter is not there for us
        log.warning("cannot read %s/%s: %s", lora_dir, name, err)
        return False


def _adapter_names(lora_dir: str) -> list[str]:
    """The adapters ``lora_dir`` holds now."""
    if not is_remote(lora_dir):
        return local_adapters(lora_dir)
    from ray.llm._internal.common.utils.cloud_utils import CloudFileSystem

    try:
        names = CloudFileSystem.list_subfolders(lora_dir)
    except Exception as err:  # noqa: BLE001 - unreachable storage lists nothing, and says so in the log
        log.warning("cannot list %s: %s", lora_dir, err)
        return []
    return sorted(name for name in names if name_problem(name) is None)


@functools.cache
def ingress_class() -> type:
    """:class:`AgentIngress` wrapped as Serve's ASGI ingress of the FastAPI app ``api``."""
    return serve.ingress(api)(AgentIngress)


def served_model_ids(cfg: NatRayConfig, model_path: str) -> tuple[str, str | None]:
    """The base model's id and the LoRA adapter's (``<id>-lora``, or None without an adapter).

    Without ``serve.model_id`` the id is the model folder's name, or the training run's name for
    a training export (``<run>/export/model``).
    """
    path = Path(model_path)
    derived = path.parents[1].name if (path.parent / "export.json").is_file() else path.name
    model_id = cfg.serve.model_id or derived
    return model_id, (f"{model_id}-lora" if cfg.serve.lora else None)


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
    loaded once at start as a static vLLM LoRA module named ``lora_id``. With ``serve.lora_dir``,
    ray.serve.llm's dynamic LoRA loading is on (``lora_config``; object storage is its
    ``dynamic_lora_loading_path``, a local folder goes through :func:`lora_bind_kwargs`' loader).
    """
    from ray.serve.llm import LLMConfig

    engine, serve_cfg = cfg.engine, cfg.serve
    gpu = serve_cfg.llm_num_gpus > 0
    if engine.device == "cpu" and gpu:
        raise ConfigError("engine.device='cpu' but serve.llm_num_gpus > 0; set serve.llm_num_gpus=0")
    if engine.device == "cuda" and not gpu:
        raise ConfigError("engine.device='cuda' needs serve.llm_num_gpus > 0 (GPUs per vLLM replica)")
    kwargs = engine_kwargs(engine, gpu, lora=lora_path is not None or serve_cfg.lora_dir is not None)
    if lora_path is not None:
        # engine.extra (applied in engine_kwargs) keeps the last word, as for every other argument.
        kwargs.setdefault("lora_modules", [{"name": lora_id, "path": lora_path, "base_model_name": model_id}])
    if gpu:
        gpus_per_rank = serve_cfg.llm_num_gpus / engine.tensor_parallel_size
        bundles = [{"CPU": serve_cfg.llm_num_cpus, "GPU": gpus_per_rank}]
        bundles += [{"GPU": gpus_per_rank}] * (engine.tensor_parallel_size - 1)
        env = {}
    else:
        bundles = [{"CPU": serve_cfg.llm_num_cpus}]  # ray.serve.llm's default bundle asks for a GPU
        # ray.serve.llm runs vLLM's multiprocess executor on CPU: its model worker computes on every
        # core or leaves one to the scheduler (see nat_ray.hardware.cpu_reserved_cores).
        env = served_cpu_env(engine, serve_cfg.llm_cpu_reserved_cores)
    lora_config = None
    if serve_cfg.lora_dir is not None:
        lora_config = {"max_num_adapters_per_replica": serve_cfg.lora_max_adapters}
        if is_remote(serve_cfg.lora_dir):
            lora_config["dynamic_lora_loading_path"] = serve_cfg.lora_dir
    return LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": model_path},
        lora_config=lora_config,
        engine_kwargs=kwargs,
        placement_group_config={"bundles": bundles},
        runtime_env={"env_vars": env},
        deployment_config={"num_replicas": serve_cfg.llm_replicas},
        callback_config={"callback_class": LocalModelCallback},
    )


def lora_bind_kwargs(cfg: NatRayConfig) -> dict:
    """Extra arguments of the LLM deployment: the local-folder adapter loader for a local ``lora_dir``."""
    if cfg.serve.lora_dir is None or is_remote(cfg.serve.lora_dir):
        return {}
    from nat_ray.serve.lora_loader import LocalLoraLoader

    return {"model_downloader": functools.partial(LocalLoraLoader, lora_dir=cfg.serve.lora_dir)}


def with_lora_dir_resolved(cfg: NatRayConfig, model_id: str) -> NatRayConfig:
    """``serve.lora_dir`` as an absolute folder that exists (replicas run in other directories)."""
    lora_dir = cfg.serve.lora_dir
    if lora_dir is None:
        return cfg
    if ":" in model_id:
        raise ConfigError(
            f"serve.lora_dir serves adapters as '<model_id>:<adapter>', so the model id {model_id!r} "
            "must not hold ':'; set serve.model_id"
        )
    if is_remote(lora_dir):
        return dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, lora_dir=lora_dir.rstrip("/")))
    folder = Path(lora_dir).expanduser().resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)  # adapters are published into it later
    except OSError as err:
        raise ConfigError(f"serve.lora_dir={lora_dir!r} is not a folder that can be created: {err}") from None
    if not folder.is_dir():
        raise ConfigError(f"serve.lora_dir={lora_dir!r} is not a folder")
    return dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, lora_dir=str(folder)))


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
    from ray.serve.llm import build_llm_deployment

    check_limits(cfg)
    tasks, cfg = with_tasks_resolved(cfg, "serve")  # the replicas read the task files by these paths
    require_servers(cfg.tools.plugins)  # a server that will not start: a clear error before Serve
    model_path, lora_path = served_paths(cfg.engine.model, cfg.serve.lora)
    model_id, lora_id = served_model_ids(cfg, model_path)
    cfg = with_lora_dir_resolved(cfg, model_id)
    cfg = with_capture_resolved(cfg)
    llm = build_llm_deployment(
        llm_config(cfg, model_path, model_id, lora_id, lora_path), bind_kwargs=lora_bind_kwargs(cfg)
    )
    autoscaling = {
        "min_replicas": cfg.serve.tool_min_replicas,
        "max_replicas": cfg.serve.tool_max_replicas,
        "initial_replicas": max(1, cfg.serve.tool_min_replicas),
        "target_ongoing_requests": TOOL_TARGET_ONGOING_REQUESTS,
    }
    names = list(dict.fromkeys(tool for task in tasks for tool in task.tools))
    env = actor_runtime_env(cfg.tools.plugins)  # plug-in tool files, for replicas on any node
    tools = {
        name: serve.deployment(
            ToolHost,
            name=f"tool-{name}",
            autoscaling_config=autoscaling,
            max_ongoing_requests=TOOL_MAX_ONGOING_REQUESTS,
            ray_actor_options={"num_cpus": 0, **({"runtime_env": env} if env else {})},
        ).bind(dataclasses.asdict(cfg.tools), preload=(name,), only=(name,))  # heavy state loads at start
        for name in names
    }
    models = [{"id": model_id, "root": model_path, "parent": None}]
    if lora_id is not None:
        models.append({"id": lora_id, "root": lora_path, "parent": model_id})
    ingress = serve.deployment(
        ingress_class(),
        name="AgentIngress",
        num_replicas=1,  # one replica = one stepper: every agent request shares its batches
        max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS,
        ray_actor_options={"num_cpus": 0, **({"runtime_env": env} if env else {})},
    )
    resolved = {**dataclasses.asdict(cfg), "engine": {**dataclasses.asdict(cfg.engine), "model": model_path}}
    # The key travels as an init argument (never in the config, a runtime_env or a log line).
    api_key = api_key_from_env(cfg.serve.api_key_env)
    return ingress.bind(llm, tools, resolved, models, lora_id or model_id, api_key=api_key)


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

    # Each vLLM replica holds its CPU bundle plus one CPU for the replica actor.
    init_ray(cfg.serve.llm_replicas * (cfg.serve.llm_num_cpus + 1) + 2)


def run_serve(cfg: NatRayConfig) -> int:
    """Start Ray if needed, deploy the application on ``serve.host:serve.port``, block until Ctrl-C.

    Returns:
        0, the exit status of ``nat-ray serve``.
    """
    check_limits(cfg)  # settings, task files and missing models fail before Ray starts
    keyed = api_key_from_env(cfg.serve.api_key_env) is not None  # a blank key fails here too
    tasks, _ = prepare_tasks(cfg.serve.tasks, cfg)
    served_paths(cfg.engine.model, cfg.serve.lora)
    start_ray_for(cfg)
    if any("search" in task.tools for task in tasks):
        from nat_ray.tools.search.index_build import ensure_index_for

        # Here, with a logged estimate and progress, not silently inside the search replica.
        ensure_index_for(cfg.tools)
    application = build_app(cfg)  # ray.serve.llm reads the runtime context: Ray must be up
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    print(f"starting the LLM, tool and agent deployments (the vLLM engine takes a minute or two) for {url}")
    serve.run(application, name=APP_NAME, route_prefix="/")
    print(f"nat-ray is serving at {url}")
    print(
        f"  GET  {url}/v1/models   POST {url}/v1/chat/completions   POST {url}/v1/completions"
        f"   POST {url}/v1/agent   GET {url}/healthz"
    )
    if keyed:
        print(
            f"  every request must carry 'Authorization: Bearer <key>' (the key in ${cfg.serve.api_key_env})"
        )
    else:
        print(f"  open to anyone who reaches the port: set ${cfg.serve.api_key_env} to require a key")
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
    return 0
