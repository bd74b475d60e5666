"""The agent server's HTTP front: the FastAPI ingress deployment of :mod:`nat_ray.serve.app`.

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
- ``GET /v1/canary``, ``POST /v1/canary`` (``adapter``, ``share``), ``POST /v1/canary/promote`` and
  ``/rollback``: a share of the requests naming no model on an adapter on trial, its labelled successes
  beside the incumbent's, and the switch (:mod:`nat_ray.serve.canary`); 409 when there is nothing to
  switch.

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
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import RayServeException

from nat_ray.agent import prepare_tasks
from nat_ray.config import NatRayConfig, from_dict
from nat_ray.core import episode_ids, records
from nat_ray.core.storage import apply_env
from nat_ray.errors import ConfigError
from nat_ray.models import resolve_model
from nat_ray.serve.adapters import (
    ModelProblem,
    ModelRef,
    adapter_card,
    adapter_missing,
    adapter_names,
    has_adapter,
    parse_model,
)
from nat_ray.serve.agent_loop import AgentLoop, ServeChatEngine, ServeTools
from nat_ray.serve.api import (
    AgentRequest,
    CanaryRequest,
    FeedbackRequest,
    agent_response,
    episode_for,
    error_body,
    gold_score,
    llm_error,
    response_status,
    validation_error,
)
from nat_ray.serve.canary import Canary, CanaryState
from nat_ray.serve.capture import (
    CaptureWriter,
    FeedbackLog,
    Ticker,
    capture_secret,
    captured_row,
    load_redactor,
    recover_lost,
    redacted,
    stale_after,
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
from nat_ray.tasks import registered_task
from nat_ray.tools import configured_versions

log = logging.getLogger(__name__)


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
        storage_env: the driver's object-storage settings where ``capture_dir`` or ``lora_dir`` is a
            URI (:func:`nat_ray.core.storage.storage_env`); the node's own settings win.
    """

    def __init__(
        self,
        llm,
        tools: dict,
        config: dict,
        models: list[dict],
        agent_model: str,
        api_key: Secret | None = None,
        storage_env: dict[str, str] | None = None,
    ) -> None:
        apply_env(storage_env)  # before anything reads serve.capture_dir or serve.lora_dir
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
        self._cards: dict[str, object] = {}  # adapter name -> its agent card (None: it has none)
        self.tokenizer = _drift_tokenizer(self.cfg.engine.model)  # at start-up, not on a request
        canary = self.cfg.serve.canary
        # Requests naming no model: the incumbent (agent_model, until a promotion), or the canary.
        self.canary = CanaryState(
            agent_model, Canary(f"{self.base_model}:{canary.adapter}", canary.share) if canary else None
        )
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
        self.lost_at_start = recover_lost(folder, stale_after(serve_cfg.capture_flush_s))
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
        as its card says (template, shots, turns, tokens); the request's own fields still win.

        A name is published once with its card (:func:`nat_ray.serve.adapters.publish_adapter`), so
        the card read for a name is kept: a bucket is not asked again on every request."""
        if ref.adapter is None:
            return self.cfg.agent
        if ref.adapter not in self._cards:
            try:
                self._cards[ref.adapter] = adapter_card(self.lora_dir, ref.adapter)
            except OSError as err:  # unreachable storage: this request runs with the server's settings
                log.warning("cannot read the agent card of %s: %s", ref.model, err)
                return self.cfg.agent
        card = self._cards[ref.adapter]
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
                "model": self.canary.incumbent,
                "open_episodes": loop.open if loop else 0,
                "queued_episodes": loop.queued if loop else 0,
                "finished_episodes": loop.finished if loop else 0,
                "captured_episodes": None
                if self.capture is None
                else {
                    "written": self.capture.written,
                    "pending": self.capture.pending,
                    "lost": self.lost_at_start + self._ticker.lost,  # counted from dead replicas' journals
                },
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
        try:
            model, ref = self._pick(
                req.model
            )  # before anything is loaded: a plain name, an adapter that exists
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
        score = gold_score(req.task, episode.answer, req.gold)
        body = agent_response(episode, req.task, model, score, self.tokenizer, episode_id)
        if body.get("token_drift"):
            log.warning(
                "/v1/agent %s: %d turn(s) drifted: the next prompt did not continue with the ids sampled",
                episode.id,
                body["token_drift"],
            )
        status = response_status(episode)
        if status != 200:
            body.update(error_body(status, f"the LLM deployment failed: {body['error']}", None))
        else:
            if req.model is None:  # routed traffic: what the canary's report counts
                self.canary.answered(episode_id, model, None if score is None else score.correct_robust)
            if self.capture is not None:  # journalled before the answer leaves (a kill after is counted)
                await asyncio.to_thread(
                    self._capture, episode, req, model, episode_id, body, score, started_at
                )
        return JSONResponse(body, status_code=status)

    def _pick(self, named: str | None) -> tuple[str, ModelRef]:
        """The model a request runs on and its reference: the one it names, else the router's pick (a
        canary whose adapter has gone falls back to the incumbent).

        Raises:
            ModelProblem: the named model (or the incumbent) is not served.
        """
        if named is not None:
            return named, self._model_ref(named)
        model = self.canary.route()
        if model != self.canary.incumbent:
            try:
                return model, self._model_ref(model)
            except ModelProblem as err:
                log.warning(
                    "canary %s is not served (%s): the request goes to %s", model, err, self.canary.incumbent
                )
        return self.canary.incumbent, self._model_ref(self.canary.incumbent)

    def _capture(
        self, episode, req: AgentRequest, model: str, episode_id: str, body: dict, score, started_at: str
    ):
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
            score=score,
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
        self.canary.feedback(req.episode_id, entry["score"])
        return JSONResponse({"episode_id": req.episode_id, "score": entry["score"], "recorded": True})

    @api.get("/v1/canary")
    async def canary_report(self) -> JSONResponse:
        return JSONResponse(self.canary.report())

    @api.post("/v1/canary")
    async def canary_start(self, request: Request) -> JSONResponse:
        try:
            req = CanaryRequest.model_validate_json(await request.body())
        except ValidationError as err:
            status, body = validation_error(err, invalid_status=400)
            return JSONResponse(body, status_code=status)
        model = f"{self.base_model}:{req.adapter}"
        try:
            await asyncio.to_thread(self._model_ref, model)
        except ModelProblem as err:
            return JSONResponse(error_body(err.status, str(err), "adapter"), status_code=err.status)
        if model == self.canary.incumbent:
            message = f"{model} already answers the traffic (it is the incumbent)"
            return JSONResponse(error_body(409, message, "adapter"), status_code=409)
        self.canary.start(Canary(model, req.share))
        log.info("canary: %s answers %.0f%% of the agent requests naming no model", model, 100 * req.share)
        return JSONResponse(self.canary.report())

    @api.post("/v1/canary/promote")
    async def canary_promote(self) -> JSONResponse:
        return self._canary_switch(self.canary.promote, "promoted")

    @api.post("/v1/canary/rollback")
    async def canary_rollback(self) -> JSONResponse:
        return self._canary_switch(self.canary.rollback, "rolled back")

    def _canary_switch(self, switch, what: str) -> JSONResponse:
        before = self.canary.report()
        try:
            incumbent = switch()
        except LookupError as err:
            return JSONResponse(error_body(409, str(err), None), status_code=409)
        log.info("canary %s %s: requests naming no model now go to %s", before["canary"], what, incumbent)
        return JSONResponse({**before, "action": what, "incumbent": incumbent, "canary": None, "share": None})

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
    try:
        return has_adapter(lora_dir, name)
    except OSError as err:  # unreachable storage: the adapter is not there for us
        log.warning("cannot read %s/%s: %s", lora_dir, name, err)
        return False


def _adapter_names(lora_dir: str) -> list[str]:
    """The adapters ``lora_dir`` holds now."""
    try:
        return adapter_names(lora_dir)
    except OSError as err:  # unreachable storage lists nothing, and says so in the log
        log.warning("cannot list %s: %s", lora_dir, err)
        return []


@functools.cache
def ingress_class() -> type:
    """:class:`AgentIngress` wrapped as Serve's ASGI ingress of the FastAPI app ``api``."""
    return serve.ingress(api)(AgentIngress)
