"""The agent route's contract: the request body, its validation, and the answer built from an episode.

Pure: pydantic and the core only, so the request rules are tested without Ray. Limits come from
:class:`nat_ray.config.ServeConfig`, passed as the validation context.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from nat_ray.agent import new_episode, sampling_from
from nat_ray.config import AgentConfig, ServeConfig
from nat_ray.core.react import GENERATION_ERROR, Episode
from nat_ray.core.records import episode_drift
from nat_ray.core.scoring import Score
from nat_ray.errors import DataError
from nat_ray.tasks import registered_task
from nat_ray.tasks.loaders import normalize_gold

MAX_TEMPERATURE = 2.0  # the OpenAI API's range; higher only produces noise
MAX_ID_CHARS = 128
MAX_MODEL_CHARS = 256
MAX_FEEDBACK_ANSWER_CHARS = 4000

# What a gold must be, per task family, in the words the client sees (``{task}``: the task name).
GOLD_RULES = {
    "math": "a {task} answer must be one number",
    "strategyqa": "a strategyqa answer must be yes/no or a boolean",
    "hotpotqa": "a hotpotqa answer must be text",
}


class AgentRequest(BaseModel):
    """Body of ``POST /v1/agent``. Limits come from :class:`ServeConfig` (the validation context).

    Attributes:
        task: the name of one of the server's tasks (``serve.tasks``: ``gsm8k``, ``hotpotqa``, a task
            file's name, ...): picks the prompt, the tools and the scorer.
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
        model: the model the whole episode runs on (default: the server's agent model), e.g.
            ``<model_id>:<adapter>`` for an adapter in ``serve.lora_dir``, so two rounds' adapters
            can be compared on one deployment. The ingress checks it (400 for a name that is not
            plain, 404 for one not served) before anything is loaded.
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
    model: str | None = Field(default=None, min_length=1, max_length=MAX_MODEL_CHARS)

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str, info: ValidationInfo) -> str:
        # Only the names the server was started with: a request never makes it read a file.
        served = _limits(info).tasks
        if value.lower() not in served:
            raise ValueError(f"unknown task {value!r}; this server answers: {sorted(served)}")
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
        family = registered_task(task).family
        if family not in GOLD_RULES:  # a task of the user's own: its scorer reads the gold as text
            if isinstance(value, bool):
                raise ValueError(f"a {task} answer must be text or a number, got {value!r}")
            return value
        # A question file may give a HotpotQA answer as a JSON number; a client must send text.
        if family == "hotpotqa" and not isinstance(value, str):
            raise _wrong_gold(family, task, value)
        try:
            normalize_gold(family, value, where=task)
        except DataError:
            raise _wrong_gold(family, task, value) from None
        return value


class FeedbackRequest(BaseModel):
    """Body of ``POST /v1/feedback``: a score for a captured episode, and optionally the right answer.

    Attributes:
        episode_id: the ``episode_id`` of a ``/v1/agent`` response of this server (404 otherwise).
        score: how good the episode was, 0 (wrong) to 1 (right); the last score given wins.
        answer: the answer the agent should have given, kept for the round that learns from it.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    episode_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    score: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    answer: str | None = Field(default=None, max_length=MAX_FEEDBACK_ANSWER_CHARS)


class CanaryRequest(BaseModel):
    """Body of ``POST /v1/canary``: start a canary (replacing one that runs).

    Attributes:
        adapter: an adapter folder in ``serve.lora_dir`` (served as ``<model_id>:<adapter>``).
        share: the fraction of ``/v1/agent`` requests naming no model it answers, in (0, 1).
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    adapter: str = Field(min_length=1, max_length=MAX_MODEL_CHARS)
    share: float = Field(gt=0.0, lt=1.0, allow_inf_nan=False)


def _wrong_gold(family: str, task: str, value: Any) -> ValueError:
    return ValueError(f"{GOLD_RULES[family].format(task=task)}, got {value!r}")


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


def validation_error(err: ValidationError, invalid_status: int = 422) -> tuple[int, dict]:
    """Status and body for a pydantic error: 400 for malformed JSON, else ``invalid_status``; every
    field named."""
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
    status = 400 if any(e["type"] == "json_invalid" for e in problems) else invalid_status
    message = "; ".join(f"{d['field']}: {d['msg']}" for d in detail)
    return status, error_body(status, message, detail[0]["field"] if detail else "body", detail)


def _field(loc: Sequence) -> str:
    return ".".join(str(p) for p in loc) or "body"


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
        registered_task(req.task),
        req.question,
        cfg,
        req.id or default_episode_id(req, cfg.seed),
        sampling_from(cfg),
    )


def response_status(ep: Episode) -> int:
    """200, or 503 when the episode ended because the LLM deployment failed (not the model's doing)."""
    return 503 if ep.failure_reason == GENERATION_ERROR else 200


def gold_score(task: str, answer: str | None, gold: Any) -> Score | None:
    """The task's verdict on ``answer`` against a request's ``gold`` (paper and robust rules, F1); None
    without a gold. Computed once per answer: the response, the canary and the capture all read it."""
    if gold is None:
        return None
    return registered_task(task).score(answer, gold if isinstance(gold, str | bool) else str(gold))


def agent_response(
    ep: Episode,
    task: str,
    model: str,
    score: Score | None = None,
    tokenizer=None,
    episode_id: str | None = None,
) -> dict:
    """JSON body of a finished episode; ``correct`` (paper and robust rules) only with a ``score``
    (:func:`gold_score`); ``token_drift`` (:func:`nat_ray.core.records.episode_drift`) when a
    ``tokenizer`` is given.

    ``id`` names the request (the sampling seeds derive from it, so two users asking the same question
    share it); ``episode_id`` names this one answer (:mod:`nat_ray.core.episode_ids`), for feedback."""
    body = {
        "id": ep.id,
        "episode_id": episode_id,
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
    ids = ep.turn_token_ids()
    if ids is not None:  # per agent turn: the ids the engine read and the ids it sampled
        body["turn_prompt_ids"], body["turn_completion_ids"] = ids
        body["token_drift"] = episode_drift(ep, tokenizer)
    if score is not None:
        body["correct"] = {"paper": score.correct_paper, "robust": score.correct_robust, "f1": score.f1}
    return body


def llm_error(item) -> tuple[int, str, str | None] | None:
    """``(status, message, param)`` when the LLM deployment answered with an error object, else None.

    Duck-typed: ray.serve.llm yields its internal ``ErrorResponse``, not the public subclass.
    """
    error = getattr(item, "error", None)
    if error is None or not hasattr(error, "message"):
        return None
    return int(getattr(error, "code", None) or 500), str(error.message), getattr(error, "param", None)
