"""The served endpoint's door on a real Serve app (vLLM on the embedded model): the API key on every
route, ``/v1/completions``, unknown chat roles, the token cap, 413 for big bodies, 429 past the
episode limit, and no key in Serve's logs.

One application serves the whole module, started with ``$NAT_RAY_API_KEY`` set and room for one
agent episode at a time (``max_concurrent_episodes=1``, no queue), so a second one is refused.
"""

from __future__ import annotations

import secrets
import threading
import time
import types
from pathlib import Path

import pytest
import requests
from helpers import free_port  # tests/helpers.py

from nat_ray.config import NatRayConfig, from_dict

pytestmark = pytest.mark.integration

KEY = secrets.token_urlsafe(24)
TOKEN_LIMIT = 24
BODY_LIMIT = 64 * 1024
TIMEOUT_S = 300
CHAT = {"messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 4, "temperature": 0}
COMPLETION = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
AGENT = {"task": "gsm8k", "question": "What is 2 + 3?", "max_turns": 1, "max_tokens": 8}


@pytest.fixture(scope="module")
def server(embedded_path, local_ray):
    from ray import serve

    from nat_ray.serve.app import APP_NAME, build_app

    port = free_port()
    cfg = from_dict(
        NatRayConfig,
        {
            "engine": {"model": embedded_path, "max_model_len": 2048, "kv_cache_gb": 1, "max_num_seqs": 16},
            "agent": {"max_turns": 2, "max_new_tokens": TOKEN_LIMIT},
            "serve": {
                "port": port,
                "tasks": ["gsm8k"],
                "tool_min_replicas": 1,
                "tool_max_replicas": 1,
                "max_concurrent_episodes": 1,
                "max_queued_episodes": 0,
                "max_tokens_limit": TOKEN_LIMIT,
                "max_body_bytes": BODY_LIMIT,
                "request_timeout_s": TIMEOUT_S,
            },
        },
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NAT_RAY_API_KEY", KEY)  # read where the app is built, as `nat-ray serve` does
        application = build_app(cfg)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application, name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        model = requests.get(f"{url}/v1/models", headers=_auth(), timeout=60).json()["data"][0]["id"]
        yield types.SimpleNamespace(url=url, model=model)
    finally:
        serve.shutdown()


def _auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


ROUTES = [
    ("GET", "/healthz", None, 200),
    ("GET", "/v1/models", None, 200),
    ("POST", "/v1/agent", AGENT, 200),
    ("POST", "/v1/chat/completions", CHAT, 200),
    ("POST", "/v1/completions", COMPLETION, 200),
    ("GET", "/no/such/route", None, 404),
]


@pytest.mark.parametrize("method, path, body, ok", ROUTES, ids=[r[1] for r in ROUTES])
def test_every_route_wants_the_key_in_the_header(server, method, path, body, ok):
    url = server.url + path
    for headers, params in [({}, {}), (_auth("wrong-" + KEY), {}), ({}, {"api_key": KEY})]:
        response = requests.request(method, url, json=body, headers=headers, params=params, timeout=60)
        assert response.status_code == 401, (headers, params, response.text)
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert response.json()["error"]["code"] == 401
    response = requests.request(method, url, json=body, headers=_auth(), timeout=TIMEOUT_S)
    assert response.status_code == ok, response.text


def test_the_openai_client_works_with_its_api_key_on_chat_and_completions(server):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, timeout=TIMEOUT_S)
    chat = client.chat.completions.create(model=server.model, **CHAT)
    assert chat.choices[0].message.content and chat.usage.completion_tokens <= 4
    completion = client.completions.create(model=server.model, **COMPLETION)
    assert completion.choices[0].text and completion.usage.completion_tokens <= 4
    stream = client.completions.create(model=server.model, stream=True, **COMPLETION)
    pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert len(pieces) >= 2 and "".join(pieces)
    stranger = openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.completions.create(model=server.model, **COMPLETION)


def test_an_unknown_role_without_max_tokens_is_refused_at_once(server):
    started = time.monotonic()
    body = {"messages": [{"role": "wizard", "content": "Cast a spell."}]}
    response = requests.post(f"{server.url}/v1/chat/completions", json=body, headers=_auth(), timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "messages.0.role"
    assert "wizard" in response.json()["error"]["message"]
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    "route, body",
    [
        ("chat/completions", {"messages": [{"role": "user", "content": "Tell me a very long story."}]}),
        ("completions", {"prompt": "Once upon a time", "max_tokens": None}),
    ],
)
def test_a_request_without_max_tokens_is_answered_within_the_servers_limit(server, route, body):
    response = requests.post(f"{server.url}/v1/{route}", json=body, headers=_auth(), timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text
    assert 0 < response.json()["usage"]["completion_tokens"] <= TOKEN_LIMIT


def test_a_body_over_the_limit_is_a_413(server):
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * BODY_LIMIT}]}
    response = requests.post(f"{server.url}/v1/chat/completions", json=big, headers=_auth(), timeout=60)
    assert response.status_code == 413, response.text
    assert "serve.max_body_bytes" in response.json()["error"]["message"]

    def chunks():  # chunked: no Content-Length, only the bytes read count
        yield b'{"task": "gsm8k", "question": "'
        for _ in range(20):
            yield b"y" * 8192
        yield b'"}'

    headers = {**_auth(), "Content-Type": "application/json"}
    response = requests.post(f"{server.url}/v1/agent", data=chunks(), headers=headers, timeout=60)
    assert response.status_code == 413, response.text
    assert requests.get(f"{server.url}/healthz", headers=_auth(), timeout=30).status_code == 200


def test_an_agent_request_past_the_episode_limit_gets_429_with_retry_after(server):
    first: dict = {}

    def run_first() -> None:
        body = {**AGENT, "max_turns": 2, "max_tokens": TOKEN_LIMIT}
        first["response"] = requests.post(
            f"{server.url}/v1/agent", json=body, headers=_auth(), timeout=TIMEOUT_S
        )

    thread = threading.Thread(target=run_first)
    thread.start()
    deadline = time.monotonic() + 60
    busy = False
    while time.monotonic() < deadline and not busy and thread.is_alive():
        health = requests.get(f"{server.url}/healthz", headers=_auth(), timeout=30).json()
        busy = health["open_episodes"] + health["queued_episodes"] >= 1
    assert busy, "the first agent request never started"
    refused = requests.post(f"{server.url}/v1/agent", json=AGENT, headers=_auth(), timeout=60)
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["Retry-After"]) >= 1
    assert "serve.max_concurrent_episodes" in refused.json()["error"]["message"]
    thread.join(timeout=TIMEOUT_S)
    assert first["response"].status_code == 200, first["response"].text
    again = requests.post(f"{server.url}/v1/agent", json=AGENT, headers=_auth(), timeout=TIMEOUT_S)
    assert again.status_code == 200, again.text  # the slot came back when the episode ended


def test_the_key_appears_in_no_log_of_the_session(server):
    import ray

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    access_lines = 0
    for path in logs.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        assert KEY.encode() not in data, f"the API key is in {path}"
        if path.parent.name == "serve":
            access_lines += data.count(b" 401 ")
    assert access_lines > 0, f"no access log line of a refused request under {logs}/serve"
