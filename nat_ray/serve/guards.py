"""The endpoint's door rules: who may call it, how big a body may be, which chat roles exist, how many
agent requests may wait.

Pure (the standard library and the project's error bodies, no Ray) so every rule is tested in
milliseconds; :mod:`nat_ray.serve.app` wires them into the ingress. The key and body checks run as
one ASGI middleware in front of the whole FastAPI app, so they cover every route, including paths
no route matches (a caller without the key learns nothing, not even which paths exist).
"""

from __future__ import annotations

import collections
import hmac
import json
import math
import os
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from nat_ray.errors import ConfigError
from nat_ray.serve.api import error_body

# The roles vLLM's chat template code knows; it also accepts any other string (as a "custom" message)
# and then fails or generates unbounded, so anything else is refused up front, as the OpenAI API does.
KNOWN_ROLES = ("system", "user", "assistant", "tool", "developer")
# Retry-After bounds, seconds: never "now" (the client would hammer), never so long it gives up.
MIN_RETRY_AFTER_S = 1
MAX_RETRY_AFTER_S = 60
RECENT_EPISODES = 32  # episode durations the Retry-After estimate looks at


class Secret:
    """A value that must never reach a log, a repr or a config dump (the API key)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value.encode("utf-8")

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def matches(self, candidate: bytes | None) -> bool:
        """Constant-time equality, so response times do not leak how much of a guess was right."""
        return candidate is not None and hmac.compare_digest(candidate, self._value)


def api_key_from_env(variable: str | None, environ: Mapping[str, str] | None = None) -> Secret | None:
    """The key the server demands, from the environment variable ``serve.api_key_env`` names.

    Raises:
        ConfigError: the variable is set but blank: starting an open server by accident is worse
            than not starting.
    """
    if not variable:
        return None
    value = (os.environ if environ is None else environ).get(variable)
    if value is None:
        return None
    if not value.strip():
        raise ConfigError(
            f"${variable} is set but empty; unset it to serve without a key (serve.api_key_env)"
        )
    return Secret(value.strip())


def bearer_token(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The token of the first ``Authorization: Bearer <token>`` header, as raw bytes, else None.

    Only the header counts: a key in the query string would end up in access logs and browser history.
    """
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            token = token.strip()
            return token if scheme.lower() == b"bearer" and token else None
    return None


def declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The Content-Length header as a number; None when absent or not a number (the bytes read decide)."""
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value.strip())
            except ValueError:
                return None
    return None


def too_big_message(limit: int) -> str:
    return f"the request body is over the limit of {limit} bytes (serve.max_body_bytes)"


def role_problem(data: object) -> tuple[str, str] | None:
    """``(field, message)`` for the first chat message whose role vLLM does not know, else None.

    Shapes other than a list of objects are left to the request model, which names them itself.
    """
    messages = data.get("messages") if isinstance(data, dict) else None
    if not isinstance(messages, list):
        return None
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            continue
        role = message["role"]
        if role not in KNOWN_ROLES:
            field = f"messages.{i}.role"
            return field, f"{field}: unknown role {role!r}; expected one of {', '.join(KNOWN_ROLES)}"
    return None


def cap_max_tokens(body: object, limit: int, fields: tuple[str, ...] = ("max_tokens",)) -> bool:
    """Give a request that sets none of ``fields`` ``max_tokens=limit``; True when it did.

    vLLM's default is "until the context is full": on a CPU that is minutes of one request.
    """
    if all(getattr(body, name, None) is None for name in fields):
        body.max_tokens = limit
        return True
    return False


class Admission:
    """Counts the agent episodes the ingress holds (running and waiting) against a fixed ceiling.

    A slot is taken when a request is admitted and given back when its episode ends, not when
    the request returns: an episode whose request timed out still occupies the agent loop.
    Used from the replica's event loop only, so it needs no lock.
    """

    def __init__(self, limit: int, concurrency: int) -> None:
        self.limit = limit
        self.concurrency = concurrency
        self.held = 0
        self.refused = 0
        self._durations: collections.deque[float] = collections.deque(maxlen=RECENT_EPISODES)

    def try_enter(self) -> bool:
        if self.held >= self.limit:
            self.refused += 1
            return False
        self.held += 1
        return True

    def leave(self, duration_s: float | None) -> None:
        """Give the slot back; ``duration_s`` (None: the episode never ran) feeds the Retry-After estimate."""
        self.held = max(0, self.held - 1)
        if duration_s is not None:
            self._durations.append(duration_s)

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: with ``concurrency`` episodes of typical length T
        running, one ends about every T / concurrency seconds."""
        if not self._durations:
            return MIN_RETRY_AFTER_S
        typical = statistics.median(self._durations)
        return max(MIN_RETRY_AFTER_S, min(MAX_RETRY_AFTER_S, math.ceil(typical / max(1, self.concurrency))))


@dataclass(frozen=True)
class DoorRules:
    """What :class:`GuardMiddleware` enforces: the key (None: open) and the largest body in bytes."""

    key: Secret | None
    max_body_bytes: int


class BodyTooLarge(Exception):
    """Raised into the app by the counting ``receive`` once more bytes came than the limit allows."""


class GuardMiddleware:
    """ASGI middleware: 401 without the key, 413 for a body over the limit, before any route runs.

    Args:
        app: the ASGI app behind it.
        rules: returns the :class:`DoorRules` now in force, called on each request (in Serve
            they live on the replica's ingress object, which exists only after the app was built).
    """

    def __init__(self, app, rules: Callable[[], DoorRules]) -> None:
        self.app = app
        self.rules = rules

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rules = self.rules()
        headers = scope.get("headers") or []
        if rules.key is not None and not rules.key.matches(bearer_token(headers)):
            message = "a valid API key is required: send the header 'Authorization: Bearer <key>'"
            await _answer(send, 401, error_body(401, message, None), [(b"www-authenticate", b"Bearer")])
            return
        limit = rules.max_body_bytes
        declared = declared_length(headers)
        if declared is not None and declared > limit:
            await _answer(send, 413, error_body(413, too_big_message(limit), "body"))
            return
        received = 0
        started = False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # a body sent in chunks, or longer than it said
                    raise BodyTooLarge
            return message

        async def tracking_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await _answer(send, 413, error_body(413, too_big_message(limit), "body"))


async def _answer(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
