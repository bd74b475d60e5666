"""OpenAIEngine against a real tiny HTTP server on 127.0.0.1 (a stand-in for the paid API).

The server is a ``ThreadingHTTPServer`` (``helpers.serve_http``) whose answers each test scripts: a
function of the request number and the parsed request returning (status, body, headers, delay).
Everything the engine does goes over real sockets: retries, Retry-After, timeouts, concurrency and
the rate limit. The rate limiter's arithmetic is tested on a fake clock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from helpers import HttpRequest, serve_http  # tests/helpers.py

from nat_ray.config import EngineConfig
from nat_ray.core.react import CONTEXT_OVERFLOW, Generation, Sampling, Stepper
from nat_ray.engines.openai_engine import OpenAIEngine, RateLimiter, parse_completion
from nat_ray.errors import ModelError

KEY_ENV = "NAT_RAY_TEST_OPENAI_KEY"


def completion(text: str | None, finish: str = "stop", usage: dict | None = None) -> dict:
    body = {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
    }
    if usage is not None:
        body["usage"] = usage
    return body


@dataclass
class Request:
    method: str
    path: str
    headers: dict
    body: dict | None


# (number of this request, starting at 0; the request) -> (status, body, headers, delay in s)
Script = Callable[[int, Request], tuple[int, object, dict, float]]


def echo(n: int, req: Request) -> tuple[int, object, dict, float]:
    """Answer with the last message's content, and a usage block."""
    last = req.body["messages"][-1]["content"]
    return 200, completion(f"echo: {last}", usage={"prompt_tokens": 7, "completion_tokens": 3}), {}, 0.0


@dataclass
class FakeServer:
    """Records every request, answers with ``script``, tracks how many were in flight at once."""

    script: Script = echo
    requests: list[Request] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def handle(self, http: HttpRequest) -> tuple[int, object, dict]:
        req = Request(http.method, http.path, http.headers, http.json())
        with self.lock:
            n = len(self.requests)
            self.requests.append(req)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            status, body, headers, delay = self.script(n, req)
            time.sleep(delay)  # a slow server is the behaviour under test
            return status, body, headers
        finally:
            with self.lock:
                self.in_flight -= 1


@pytest.fixture
def server():
    fake = FakeServer()
    with serve_http(fake.handle) as url:
        fake.url = f"{url}/v1"
        yield fake


def engine_for(url: str, **overrides) -> OpenAIEngine:
    fields = dict(model="teacher-model", backend="openai", base_url=url, api_key_env=KEY_ENV, max_retries=2)
    return OpenAIEngine(EngineConfig(**{**fields, **overrides}), backoff_factor=0.01)


def conv(text: str) -> list[dict]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]


def test_request_body_and_response_mapping(server):
    with engine_for(server.url) as engine:
        gens = engine.generate(
            [conv("first"), conv("second")],
            [
                Sampling(temperature=0.7, top_p=0.9, max_tokens=64, seed=42, stop=("\nObservation:", "END")),
                Sampling(),
            ],
        )
    assert gens == [
        Generation("echo: first", prompt_tokens=7, completion_tokens=3, finish_reason="stop"),
        Generation("echo: second", prompt_tokens=7, completion_tokens=3, finish_reason="stop"),
    ]
    by_text = {r.body["messages"][-1]["content"]: r for r in server.requests}
    first, second = by_text["first"], by_text["second"]
    assert first.method == "POST" and first.path == "/v1/chat/completions"
    assert first.body == {
        "model": "teacher-model",
        "messages": conv("first"),
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 64,
        "seed": 42,
        "stop": ["\nObservation:", "END"],
    }
    # Greedy: top_p is irrelevant and sent as 1.0; no seed key when none is given.
    assert second.body["temperature"] == 0.0 and second.body["top_p"] == 1.0
    assert "seed" not in second.body and second.body["stop"] == ["\nObservation:"]


def test_response_fields_map_and_missing_ones_default():
    assert parse_completion(completion(None, "length")) == Generation("", finish_reason="length")
    gen = parse_completion(completion("x", "content_filter", {"prompt_tokens": 5}))
    assert gen == Generation("x", prompt_tokens=5, completion_tokens=0, finish_reason="stop")
    for bad in ({}, {"choices": []}, {"choices": [{"text": "x"}]}, []):
        with pytest.raises(ValueError):
            parse_completion(bad)


def test_order_is_kept_when_answers_arrive_in_reverse(server):
    n = 5

    def reverse(i: int, req: Request):
        k = int(req.body["messages"][-1]["content"][1:])
        return 200, completion(f"answer {k}"), {}, 0.1 * (n - k)  # the first asked answers last

    server.script = reverse
    with engine_for(server.url, max_concurrency=n) as engine:
        gens = engine.generate([conv(f"q{k}") for k in range(n)], [Sampling()] * n)
    assert [g.text for g in gens] == [f"answer {k}" for k in range(n)]
    assert server.max_in_flight > 1  # they really were in flight together


def test_retries_after_503_then_succeeds(server):
    server.script = lambda i, req: (503, {"error": "busy"}, {}, 0) if i < 2 else echo(i, req)
    with engine_for(server.url, max_retries=3) as engine:
        (gen,) = engine.generate([conv("hi")], [Sampling()])
    assert gen.finish_reason == "stop" and gen.text == "echo: hi"
    assert len(server.requests) == 3


def test_429_waits_for_retry_after(server):
    server.script = lambda i, req: (
        (429, {"error": {"message": "slow down"}}, {"Retry-After": "1"}, 0) if i == 0 else echo(i, req)
    )
    start = time.monotonic()
    with engine_for(server.url) as engine:
        (gen,) = engine.generate([conv("hi")], [Sampling()])
    assert gen.text == "echo: hi" and len(server.requests) == 2
    assert time.monotonic() - start >= 0.9


def test_context_length_400_is_a_context_overflow_for_that_conversation_only(server):
    message = "This model's maximum context length is 2048 tokens. However, your prompt contains 4000 tokens."

    def script(i: int, req: Request):
        if req.body["messages"][-1]["content"] == "long":
            err = {"message": message, "type": "invalid_request_error", "code": "context_length_exceeded"}
            return 400, {"error": err}, {}, 0
        return echo(i, req)

    server.script = script
    with engine_for(server.url) as engine:
        long, short = engine.generate([conv("long"), conv("short")], [Sampling()] * 2)
    assert long.finish_reason == CONTEXT_OVERFLOW and "maximum context length" in long.error
    assert short.text == "echo: short"
    assert len(server.requests) == 2  # a 400 is not retried


def test_other_400_is_an_error(server):
    server.script = lambda i, req: (400, {"error": {"message": "temperature must be <= 2"}}, {}, 0)
    with engine_for(server.url) as engine:
        (gen,) = engine.generate([conv("hi")], [Sampling()])
    assert gen.finish_reason == "error" and "HTTP 400" in gen.error and "temperature must be" in gen.error


def test_500_forever_becomes_an_error_generation(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-secret-value")
    server.script = lambda i, req: (500, b"<html>Internal Server Error: upstream crashed</html>", {}, 0)
    with engine_for(server.url, max_retries=2) as engine:
        (gen,) = engine.generate([conv("hi")], [Sampling()])
    assert gen.finish_reason == "error" and gen.text == ""
    assert "HTTP 500" in gen.error and "upstream crashed" in gen.error
    assert "sk-secret-value" not in gen.error
    assert len(server.requests) == 3  # one try plus max_retries


def test_error_ends_only_its_episode_in_the_stepper(server):
    from nat_ray.core.react import GENERATION_ERROR, Episode

    def script(i: int, req: Request):
        if "broken" in req.body["messages"][-1]["content"]:
            return 502, {"error": "bad gateway"}, {}, 0
        return 200, completion("Thought: easy.\nAction: finish[5]"), {}, 0

    server.script = script
    eps = [Episode(id=q, prompt=conv(q), tools=("calculate",)) for q in ("fine", "broken")]
    with engine_for(server.url, max_retries=1) as engine:
        Stepper(engine).run(eps)
    assert eps[0].finished and eps[0].answer == "5"
    assert eps[1].failure_reason == GENERATION_ERROR and "HTTP 502" in eps[1].steps[0].error


def test_dead_port_is_an_error(free_port):
    with engine_for(f"http://127.0.0.1:{free_port}/v1", max_retries=1) as engine:
        (gen,) = engine.generate([conv("hi")], [Sampling()])
        assert gen.finish_reason == "error" and "cannot connect" in gen.error
        with pytest.raises(ModelError, match="cannot reach"):
            engine.models()


def test_timeout_is_an_error(server):
    server.script = lambda i, req: (*echo(i, req)[:3], 2.0)
    with engine_for(server.url, request_timeout_s=0.3, max_retries=0) as engine:
        (gen,) = engine.generate([conv("hi")], [Sampling()])
    assert gen.finish_reason == "error" and "timed out" in gen.error


@pytest.mark.parametrize(
    ("body", "reason"),
    [(b"this is not json", "Expecting value"), ({"object": "chat.completion"}, "no 'choices'")],
)
def test_bad_json_is_an_error(server, body, reason):
    server.script = lambda i, req: (200, body, {}, 0)
    with engine_for(server.url) as engine:
        (gen,) = engine.generate([conv("hi")], [Sampling()])
    assert gen.finish_reason == "error" and reason in gen.error


def test_api_key_header_only_when_the_variable_is_set(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test-123")
    with engine_for(server.url) as engine:
        engine.generate([conv("a")], [Sampling()])
    monkeypatch.delenv(KEY_ENV)
    with engine_for(server.url) as engine:
        engine.generate([conv("b")], [Sampling()])
    with_key, without = server.requests
    assert with_key.headers["Authorization"] == "Bearer sk-test-123"
    assert "Authorization" not in without.headers


def test_rate_limit_spaces_requests(server):
    with engine_for(server.url, requests_per_second=10, max_concurrency=5) as engine:
        start = time.monotonic()
        engine.generate([conv(str(i)) for i in range(5)], [Sampling()] * 5)
        elapsed = time.monotonic() - start
    assert elapsed >= 0.38  # five requests at 10/s: the last starts 0.4 s after the first


class FakeClock:
    """A monotonic clock that moves only when someone sleeps on it; records every sleep."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


def test_rate_limiter_calls_at_once_take_n_minus_one_intervals():
    clock = FakeClock()
    limiter = RateLimiter(4, clock=clock, sleep=clock.sleep)  # 0.25 s apart
    for _ in range(5):
        limiter.wait()  # all at the same instant: the clock never moves
    # The first goes at once; the others wait for slots 0.25, 0.5, 0.75, 1.0 s ahead.
    assert clock.sleeps == [0.25, 0.5, 0.75, 1.0]  # (5 - 1) / 4 s for the last


def test_rate_limiter_does_not_wait_once_the_interval_has_passed():
    clock = FakeClock()
    limiter = RateLimiter(2, clock=clock, sleep=clock.sleep)  # 0.5 s apart
    limiter.wait()
    clock.now += 0.2
    limiter.wait()  # its slot is 0.5 s after the first: 0.3 s to go
    clock.now += 5.0
    limiter.wait()  # long after: no wait, and no credit saved up for later calls
    limiter.wait()
    assert clock.sleeps == pytest.approx([0.3, 0.5])


def test_rate_limiter_without_rate_never_waits():
    def no_clock() -> float:
        raise AssertionError("a limiter without a rate must not read the clock")

    for rate in (0, -1.0):
        limiter = RateLimiter(rate, clock=no_clock, sleep=no_clock)
        for _ in range(100):
            limiter.wait()
        assert limiter.interval == 0


def test_rate_limiter_gives_concurrent_callers_distinct_slots():
    clock = FakeClock()
    limiter = RateLimiter(10, clock=clock, sleep=clock.sleep)  # 0.1 s apart
    start = threading.Barrier(8)

    def caller() -> None:
        start.wait()
        limiter.wait()

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # One caller went at once; the other seven each got their own slot, none shared or skipped.
    assert sorted(clock.sleeps) == pytest.approx([0.1 * k for k in range(1, 8)])


def test_models_lists_the_served_ids(server):
    server.script = lambda i, req: (200, {"object": "list", "data": [{"id": "m1"}, {"id": "m2"}]}, {}, 0)
    with engine_for(server.url) as engine:
        assert engine.models() == ["m1", "m2"]
    assert server.requests[0].method == "GET" and server.requests[0].path == "/v1/models"


def test_mismatched_lengths_are_a_bug(server):
    with engine_for(server.url) as engine, pytest.raises(ValueError, match="2 conversations but 1"):
        engine.generate([conv("a"), conv("b")], [Sampling()])
