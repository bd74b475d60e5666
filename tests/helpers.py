"""Plumbing the tests share: free ports, a real HTTP server on loopback, Ray's shared-machine settings,
the example task files.

``tests/`` is on ``sys.path`` (pytest's rootdir conftest), so unit and integration tests alike
write ``from helpers import serve_http``. What a fake server answers stays in each test; only
starting, answering and stopping it lives here.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# A user's own task as the repository ships it (data, plug-in tool, scorer, task file), and the same
# task with its tools on an MCP server (examples/mcp_units/server.py, over stdio).
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
UNIT_CONVERT_TASK = str(EXAMPLES_DIR / "unit_convert" / "task.yaml")
MCP_UNITS_TASK = str(EXAMPLES_DIR / "mcp_units" / "task.yaml")

# On a machine shared with other jobs (as CI's is): Ray nices its workers to 15, which starves them
# behind the others, and its memory monitor kills our workers when *other* processes fill the memory.
# Idle pooled workers (each holding vLLM's imports) are let go at once. Read by the raylet that
# ray.init starts, so they must be set before it.
SHARED_MACHINE_ENV = {
    "RAY_worker_niceness": "0",
    "RAY_memory_monitor_refresh_ms": "0",
    "RAY_num_workers_soft_limit": "0",
}


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports on 127.0.0.1 that were free a moment ago.

    All ``n`` are bound at once before any is released, so they differ from each other; another
    process may still take one before the caller binds it (good enough on a test machine).
    """
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def free_port() -> int:
    """One TCP port on 127.0.0.1 that was free a moment ago (nothing listens on it)."""
    return free_ports(1)[0]


@dataclass
class HttpRequest:
    """One request as the server saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        """The body parsed as JSON, or None when there is no body."""
        return json.loads(self.body) if self.body else None


# request -> (status, body, extra headers); a bytes body is sent as is, anything else as JSON.
Responder = Callable[[HttpRequest], tuple[int, object, dict[str, str]]]


def handler_for(respond: Responder) -> type[BaseHTTPRequestHandler]:
    """A request handler class that answers GET and POST with ``respond``."""

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            request = HttpRequest(
                self.command, self.path, dict(self.headers), self.rfile.read(length) if length else b""
            )
            status, body, headers = respond(request)
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up waiting (timeout tests, a killed caller)

        do_GET = do_POST = _serve

        def log_message(self, *args) -> None:
            pass

    return Handler


@contextlib.contextmanager
def serve_http(handler: type[BaseHTTPRequestHandler] | Responder) -> Iterator[str]:
    """A ``ThreadingHTTPServer`` on 127.0.0.1 (a free port) in a daemon thread; yields its base URL.

    Args:
        handler: a ``BaseHTTPRequestHandler`` subclass, or a function ``HttpRequest -> (status,
            body, headers)`` (see :func:`handler_for`).

    Yields:
        ``http://127.0.0.1:<port>``, without a trailing slash.

    The server is shut down on exit; handler threads still running (a deliberately slow answer)
    are daemon threads and do not hold it up.
    """
    if not (isinstance(handler, type) and issubclass(handler, BaseHTTPRequestHandler)):
        handler = handler_for(handler)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def processes_under(temp_dir: str) -> list:
    """Processes (not this one) started with ``temp_dir`` on their command line or as their cwd.

    A local Ray cluster started with ``--temp-dir`` owns exactly these, so a test can stop its own
    cluster without ``ray stop`` (which would stop every Ray on the machine).
    """
    import os

    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
        if p.pid == os.getpid():
            continue
        cmdline = " ".join(p.info["cmdline"] or [])
        if temp_dir in cmdline or (p.info["cwd"] or "").startswith(temp_dir):
            found.append(p)
    return found


def kill_processes_under(temp_dir: str) -> list[str]:
    """Kill :func:`processes_under` ``temp_dir`` (three tries), remove the folder; return survivors' command lines."""
    import shutil

    import psutil

    for _ in range(3):
        left = processes_under(temp_dir)
        if not left:
            break
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(left, timeout=10)
    left = [f"{p.pid}: {' '.join(p.info['cmdline'] or [])[:200]}" for p in processes_under(temp_dir)]
    shutil.rmtree(temp_dir, ignore_errors=True)
    return left


S3_ENV = {  # what the S3 client of a test process and of its Ray replicas reads
    "AWS_ACCESS_KEY_ID": "nat-ray-test",
    "AWS_SECRET_ACCESS_KEY": "nat-ray-test",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@contextlib.contextmanager
def s3_server(bucket: str) -> Iterator[dict[str, str]]:
    """A real S3-compatible server (moto's server mode, a child process) on a free loopback port with
    ``bucket`` made; yields the ``AWS_*`` environment that reaches it (not set here: the caller sets it)."""
    import os
    import subprocess
    import sys
    import time

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto's S3 server did not start on port {port}")
            time.sleep(0.1)
        code = (
            "import pyarrow.fs as f; "
            f"f.FileSystem.from_uri('s3://{bucket}?allow_bucket_creation=true')[0].create_dir('{bucket}')"
        )
        subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, check=True, timeout=60)
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=30)
