"""An OpenAI-compatible chat server behind the :class:`nat_ray.core.react.ChatEngine` interface.

This is how a teacher answers (GPT-3.5 for the paper's trajectories, or any server that speaks
``POST /chat/completions``, such as ``vllm serve``). A batch becomes one request per conversation,
sent from a thread pool (``engine.max_concurrency`` in flight), paced by a client-side rate limit
(``engine.requests_per_second``) and retried by urllib3 on 429 / 5xx / connection errors with
exponential backoff, honouring ``Retry-After``. Answers come back in input order.

A request that still fails is data, not an exception: it becomes a :class:`Generation` with
``finish_reason="context_overflow"`` (a 400 that names the context length) or ``"error"`` (anything
else, with the status and a short excerpt of the body), and the stepper ends that one episode.

The API key is read from the environment variable ``engine.api_key_env`` names; it is sent only in
the ``Authorization`` header and never logged. Without it no header is sent (local servers).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import requests

from nat_ray.config import EngineConfig
from nat_ray.core.react import CONTEXT_OVERFLOW, Generation, Sampling
from nat_ray.errors import ConfigError, ModelError
from nat_ray.http import retrying_session

log = logging.getLogger(__name__)

BACKOFF_FACTOR = 0.5  # urllib3 sleeps 0, 1, 2, 4, ... s (at most 120 s) between retries
_EXCERPT_CHARS = 300
# Phrases of a "prompt too long" 400: OpenAI ("maximum context length", code context_length_exceeded),
# vLLM ("This model's maximum context length is ..."), and other OpenAI-compatible servers.
_OVERFLOW_MARKERS = ("context length", "context_length", "maximum context", "context window", "max_model_len")


class RateLimiter:
    """Spaces calls at least ``1 / rate`` seconds apart across threads; ``rate <= 0`` never waits.

    Each caller reserves the next free slot under a lock, then sleeps outside it, so ``n`` calls
    at once take ``(n - 1) / rate`` seconds and none is starved.

    Args:
        rate: calls per second.
        clock: seconds on a monotonic clock (tests pass a fake one).
        sleep: waits the given seconds (tests record instead of waiting).
    """

    def __init__(
        self,
        rate: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next = 0.0

    def wait(self) -> None:
        if self.interval <= 0:
            return
        with self._lock:
            now = self._clock()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            self._sleep(slot - now)


def _excerpt(text: str) -> str:
    """A one-line, bounded piece of a response body for an error message."""
    text = " ".join(text.split())
    return text if len(text) <= _EXCERPT_CHARS else text[:_EXCERPT_CHARS] + "..."


def _error_message(body: str) -> str:
    """The server's own message (``{"error": {"message": ...}}``) if there is one, else the body."""
    try:
        data = json.loads(body)
    except ValueError:
        return _excerpt(body)
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return _excerpt(err["message"])
    if isinstance(err, str):
        return _excerpt(err)
    return _excerpt(body)


def is_context_overflow(status: int, body: str) -> bool:
    """Whether an error response says the prompt (plus ``max_tokens``) does not fit the context."""
    lowered = body.lower()
    return status == 400 and any(marker in lowered for marker in _OVERFLOW_MARKERS)


def parse_completion(data: object) -> Generation:
    """Map a ``chat.completion`` JSON object onto a :class:`Generation`.

    Raises:
        ValueError: the object has no ``choices[0].message``.
    """
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError("the response has no 'choices'")
    message = choices[0].get("message")
    if not isinstance(message, dict):
        raise ValueError("the response's choices[0] has no 'message'")
    content = message.get("content")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    # Only two ways to end a normal turn: "length", or "stop" for everything else (eos, a stop
    # string, content_filter, ...), so that the stepper treats it as an ordinary answer.
    reason = "length" if choices[0].get("finish_reason") == "length" else "stop"
    return Generation(
        content if isinstance(content, str) else "",
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        finish_reason=reason,
    )


class OpenAIEngine:
    """Chat completions from an OpenAI-compatible server, one concurrent request per conversation.

    Args:
        config: ``base_url`` (``http://host:port/v1``), ``model`` (the name the server serves; for
            ``vllm serve`` the model path unless ``--served-model-name`` is given; sent as is,
            never resolved or downloaded here), ``api_key_env``, ``max_concurrency``,
            ``requests_per_second``, ``request_timeout_s`` and ``max_retries`` are read.
        backoff_factor: urllib3's exponential backoff base in seconds (tests make it small).

    Rate limiting applies to each conversation's first attempt; urllib3's retries are paced by
    the backoff and ``Retry-After`` instead.
    """

    def __init__(self, config: EngineConfig, *, backoff_factor: float = BACKOFF_FACTOR) -> None:
        if not config.base_url:
            raise ConfigError("the openai engine needs engine.base_url, e.g. http://127.0.0.1:8000/v1")
        self.config = config
        self.base_url = config.base_url.rstrip("/")
        self.limiter = RateLimiter(config.requests_per_second)
        # 429 and 5xx retried. After the last retry the response itself comes back, so its status
        # and body reach the Generation's error instead of a bare "too many retries".
        self.session = retrying_session(
            config.max_retries, backoff_factor, methods=("POST", "GET"), pool_size=config.max_concurrency
        )
        api_key = os.environ.get(config.api_key_env) if config.api_key_env else None
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.executor = ThreadPoolExecutor(config.max_concurrency, thread_name_prefix="openai-engine")
        log.info(
            "OpenAI-compatible engine: %s, model %s, API key %s",
            self.base_url,
            config.model,
            f"from ${config.api_key_env}" if api_key else "not set",
        )

    def __enter__(self) -> OpenAIEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker threads (waiting for requests in flight) and close the connections."""
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.session.close()

    def models(self) -> list[str]:
        """The model ids the server serves (``GET {base_url}/models``).

        Raises:
            ModelError: the server cannot be reached or does not answer with a model list.
        """
        url = f"{self.base_url}/models"
        try:
            response = self.session.get(url, timeout=self.config.request_timeout_s)
        except requests.RequestException as err:
            raise ModelError(
                f"cannot reach the OpenAI-compatible server at {url} ({type(err).__name__}: {_excerpt(str(err))}); "
                "is it running, and is engine.base_url right?"
            ) from None
        if response.status_code != 200:
            raise ModelError(
                f"GET {url} answered HTTP {response.status_code}: {_error_message(response.text)}"
            )
        try:
            return [m["id"] for m in response.json()["data"]]
        except (ValueError, KeyError, TypeError):
            raise ModelError(f"GET {url} did not return a model list: {_excerpt(response.text)}") from None

    def request_body(self, conversation: list[dict], s: Sampling) -> dict:
        """The JSON body of one ``/chat/completions`` request."""
        body = {
            "model": self.config.model,
            "messages": conversation,
            "temperature": s.temperature,
            "top_p": s.top_p if s.temperature > 0 else 1.0,
            "max_tokens": s.max_tokens,
            "stop": list(s.stop),
        }
        if s.seed is not None:
            body["seed"] = s.seed
        return body

    def generate(self, conversations: Sequence[list[dict]], sampling: Sequence[Sampling]) -> list[Generation]:
        """One assistant turn per conversation, in input order; failures become generations."""
        if len(conversations) != len(sampling):
            raise ValueError(f"{len(conversations)} conversations but {len(sampling)} sampling settings")
        futures = [self.executor.submit(self._complete, c, s) for c, s in zip(conversations, sampling)]
        return [f.result() for f in futures]

    def _complete(self, conversation: list[dict], s: Sampling) -> Generation:
        url = f"{self.base_url}/chat/completions"
        self.limiter.wait()
        try:
            response = self.session.post(
                url, json=self.request_body(conversation, s), timeout=self.config.request_timeout_s
            )
        except requests.Timeout:
            return self._failed(
                f"POST {url} timed out (engine.request_timeout_s={self.config.request_timeout_s:g} s "
                f"per attempt, engine.max_retries={self.config.max_retries})"
            )
        except requests.ConnectionError as err:
            return self._failed(f"cannot connect to {url}: {_excerpt(str(err))}; is the server running?")
        except requests.RequestException as err:
            return self._failed(f"POST {url} failed: {type(err).__name__}: {_excerpt(str(err))}")
        if response.status_code != 200:
            message = f"HTTP {response.status_code} from {url}: {_error_message(response.text)}"
            if is_context_overflow(response.status_code, response.text):
                return Generation("", finish_reason=CONTEXT_OVERFLOW, error=message)
            return self._failed(message)
        try:
            return parse_completion(response.json())
        except ValueError as err:  # requests' JSONDecodeError is a ValueError too
            return self._failed(f"bad response from {url}: {err}; body: {_excerpt(response.text)}")

    @staticmethod
    def _failed(message: str) -> Generation:
        log.warning("generation failed: %s", message)
        return Generation("", finish_reason="error", error=message)
