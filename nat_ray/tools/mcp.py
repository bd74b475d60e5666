"""MCP tools: a task's ``mcp:NAME/TOOL`` entries, answered by Model Context Protocol servers.

A task file names its servers and picks their tools::

    mcp_servers:
      units: {command: [python, server.py]}          # stdio: started here, in the task's folder
      remote: {url: "http://127.0.0.1:8765/mcp"}     # streamable HTTP: already running
    tools: [calculate, "mcp:units/convert_units", "mcp:units/scale"]

The agent calls the tool by its MCP name (``convert_units[3.5 km to m]``). A tool whose input
schema has one string property gets the argument text as it is; any other takes it as a JSON
object (``scale[{"value": 3, "factor": 1000}]``), and text that is not one is an ``Error:``
observation naming the arguments. An answer's text content is the observation; an MCP error
result becomes an ``Error:`` observation; the timeout and caps of :mod:`nat_ray.tools.guard` hold as
for every tool. ``python`` / ``python3`` as a stdio command is the Python running nat_ray (as it
runs the tool files), not whatever ``PATH`` finds.

A task's resolved spec carries its server's definition (``mcp:units/convert_units={...}``, JSON
with the stdio server's folder made absolute), so a tool actor or Serve replica that receives the
spec can connect without the task file. Each process connects to a server once, at
:func:`nat_ray.tools.configure_tools` (a tool actor's or replica's start), and keeps the session
until it exits; :func:`check_servers` starts each server, lists its tools and stops it, for
``--dry-run`` and the stages' checks before Ray.

The official ``mcp`` SDK's client is asynchronous: a connection runs it on an event loop of its own
in a daemon thread, in one task that opens the session and closes it (the SDK's transports must
be closed by the task that opened them), and tool calls are submitted to that loop.
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import json
import logging
import re
import sys
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from nat_ray.errors import ConfigError

log = logging.getLogger(__name__)

PREFIX = "mcp:"
_SPEC = re.compile(
    r"mcp:(?P<server>[A-Za-z][A-Za-z0-9_-]*)/(?P<tool>[A-Za-z][A-Za-z0-9_-]*)(?:=(?P<definition>\{.*\}))?",
    re.S,
)
CONNECT_TIMEOUT_S = 30.0
METHOD_NOT_FOUND = -32601  # JSON-RPC's code
PYTHONS = ("python", "python3")


# --------------------------------------------------------------------------------------------
# Specs and server definitions (no connection)


def is_mcp(spec: str) -> bool:
    return spec.startswith(PREFIX)


def parse_spec(spec: str) -> tuple[str, str, dict | None]:
    """``(server, tool, definition or None)`` of an ``mcp:NAME/TOOL[={...}]`` spec.

    Raises:
        ConfigError: not of that form.
    """
    match = _SPEC.fullmatch(spec)
    if match is None:
        raise ConfigError(
            f"tool {spec!r}: an MCP tool is written mcp:SERVER/TOOL (SERVER a key of the task's "
            "mcp_servers, TOOL the name the server gives it)"
        )
    definition = json.loads(match["definition"]) if match["definition"] else None
    return match["server"], match["tool"], definition


def server_problem(name: str, definition: Any) -> str | None:
    """What is wrong with one ``mcp_servers`` entry, or None."""
    if not isinstance(definition, dict):
        return f"mcp_servers.{name} must be a mapping with command (a list) or url, got {definition!r}"
    unknown = set(definition) - {"command", "url", "env"}
    if unknown:
        return f"mcp_servers.{name}: unknown keys {sorted(unknown)}; known: command, url, env"
    if ("command" in definition) == ("url" in definition):
        return f"mcp_servers.{name} needs exactly one of command (stdio) and url (streamable HTTP)"
    command = definition.get("command")
    if command is not None and not (
        isinstance(command, list) and command and all(isinstance(c, str) and c for c in command)
    ):
        return f"mcp_servers.{name}.command must be a non-empty list of strings, got {command!r}"
    url = definition.get("url")
    if url is not None and not (isinstance(url, str) and url.startswith(("http://", "https://"))):
        return f"mcp_servers.{name}.url must be an http(s) URL, got {url!r}"
    env = definition.get("env", {})
    if not (isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
        return f"mcp_servers.{name}.env must map names to strings, got {env!r}"
    if env and url is not None:
        return f"mcp_servers.{name}.env is for a stdio server (command); a url server has its own"
    return None


def resolve_spec(spec: str, servers: dict[str, dict], base_dir: Path) -> str:
    """``mcp:NAME/TOOL`` as a self-contained spec: the server's definition joined, its folder absolute.

    Raises:
        ConfigError: a malformed spec, or a server the task's ``mcp_servers`` does not name.
    """
    server, tool, definition = parse_spec(spec)
    if definition is None:
        if server not in servers:
            known = ", ".join(sorted(servers)) or "none"
            raise ConfigError(f"tool {spec!r}: no MCP server {server!r} in mcp_servers (known: {known})")
        definition = dict(servers[server])
        if "command" in definition:
            definition.setdefault("cwd", str(base_dir.resolve()))
    return f"{PREFIX}{server}/{tool}=" + json.dumps(definition, sort_keys=True, separators=(",", ":"))


def spec_version(spec: str) -> str:
    """Lineage without connecting: the server's name and a digest of its definition."""
    server, _, definition = parse_spec(spec)
    digest = hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:16]
    return f"mcp:{server}:sha256:{digest}"


def _describe(name: str, definition: dict) -> str:
    return f"MCP server {name!r} ({definition.get('url') or ' '.join(definition['command'])})"


# --------------------------------------------------------------------------------------------
# Connections


class Connection:
    """One MCP session, open until :meth:`close` (or the process's exit).

    Raises (from the constructor):
        ConfigError: the server did not start, could not be reached, or did not answer in time.
    """

    def __init__(self, name: str, definition: dict, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        self.name = name
        self.definition = definition
        self.tools: dict[str, dict] = {}
        self.server_version = "unknown"
        self._client = None  # the SDK's Client while the session is open
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"mcp-{name}", daemon=True)
        self._thread.start()
        self._ready: Future = Future()
        self._closing: asyncio.Event | None = None
        self._session_task = asyncio.run_coroutine_threadsafe(self._session(), self._loop)
        try:
            self._ready.result(timeout=timeout_s)
        except FutureTimeout:
            self.close()
            raise ConfigError(
                f"{_describe(name, definition)} did not answer within {timeout_s:g} s"
            ) from None
        except Exception as err:  # noqa: BLE001 - whatever the transport raised: the server is unusable
            self.close()
            raise ConfigError(f"{_describe(name, definition)} could not be reached: {_reason(err)}") from None

    def _server(self):
        from mcp import StdioServerParameters

        if "url" in self.definition:
            return self.definition["url"]
        command = list(self.definition["command"])
        if command[0] in PYTHONS:
            command[0] = sys.executable
        return StdioServerParameters(
            command=command[0],
            args=command[1:],
            env=self.definition.get("env"),
            cwd=self.definition.get("cwd"),
        )

    async def _session(self) -> None:
        from mcp import Client

        self._closing = asyncio.Event()
        try:
            async with Client(self._server()) as client:
                listed = await client.list_tools()
                self.tools = {t.name: t.input_schema or {} for t in listed.tools}
                info = client.server_info
                if info is not None:
                    self.server_version = f"{info.name}=={info.version}"
                self._client = client
                self._ready.set_result(True)
                await self._closing.wait()
        except BaseException as err:  # noqa: BLE001 - reported to the constructor, or logged after it
            if not self._ready.done():
                self._ready.set_exception(err)
            elif not isinstance(err, asyncio.CancelledError):
                log.warning("%s closed: %s", _describe(self.name, self.definition), _reason(err))
        finally:
            self._client = None

    def alive(self) -> bool:
        return self._ready.done() and not self._session_task.done() and self._client is not None

    def answers(self, timeout_s: float = 5.0) -> bool:
        """Whether the server answers a ping now (a dead stdio server leaves the session open)."""
        if not self.alive():
            return False
        from mcp.shared.exceptions import MCPError

        try:
            asyncio.run_coroutine_threadsafe(self._client.send_ping(), self._loop).result(timeout=timeout_s)
        except MCPError as err:
            # "method not found" is an answer (newer protocol versions have no ping); "connection
            # closed" and the like are the SDK's own errors about the transport.
            return err.code == METHOD_NOT_FOUND
        except Exception:  # noqa: BLE001 - a transport failure or a timeout: not answering
            return False
        return True

    def call(self, tool: str, arguments: dict, timeout_s: float) -> str:
        """The tool's answer as text.

        Raises:
            RuntimeError: the server answered with an error, or the session is gone.
        """
        if not self.alive():
            raise RuntimeError(f"the connection to {_describe(self.name, self.definition)} is closed")
        future = asyncio.run_coroutine_threadsafe(
            self._client.call_tool(tool, arguments, read_timeout_seconds=timeout_s), self._loop
        )
        result = future.result(timeout=timeout_s + 5)
        texts = [block.text for block in result.content if getattr(block, "type", None) == "text"]
        text = "\n".join(texts)
        if not texts and result.structured_content is not None:
            text = json.dumps(result.structured_content)
        if result.is_error:
            raise RuntimeError(text or f"{tool} failed")
        return text

    def close(self) -> None:
        if self._closing is not None and not self._session_task.done():
            self._loop.call_soon_threadsafe(self._closing.set)
            try:
                self._session_task.result(timeout=10)
            except Exception:  # noqa: BLE001 - closing: nothing left to do with the error
                pass
        self._loop.call_soon_threadsafe(self._loop.stop)


def _reason(err: BaseException) -> str:
    """The innermost message of an error (the SDK wraps transport errors in exception groups)."""
    while isinstance(err, BaseExceptionGroup) and err.exceptions:
        err = err.exceptions[0]
    return f"{type(err).__name__}: {err}"


_connections: dict[str, Connection] = {}
_lock = threading.Lock()


def _key(name: str, definition: dict) -> str:
    """One server: its name and its whole definition."""
    return json.dumps([name, definition], sort_keys=True)


def connect(name: str, definition: dict) -> Connection:
    """This process's connection to a server, made on first use and kept (a dead one is remade)."""
    key = _key(name, definition)
    with _lock:
        conn = _connections.get(key)
        if conn is None or not conn.alive():
            conn = _connections[key] = Connection(name, definition)
        return conn


@atexit.register
def close_all() -> None:
    """Stop every server this process started (a stdio server also ends when its stdin closes)."""
    with _lock:
        for conn in _connections.values():
            conn.close()
        _connections.clear()


def connections_alive() -> bool:
    """Whether every server this process connected to still answers a ping (a Serve replica's health)."""
    with _lock:
        conns = list(_connections.values())
    return all(conn.answers() for conn in conns)


# --------------------------------------------------------------------------------------------
# Tools


def _single_string(schema: dict) -> str | None:
    """The property name when the tool takes one string, else None."""
    props = schema.get("properties") or {}
    if len(props) == 1:
        ((name, prop),) = props.items()
        if isinstance(prop, dict) and prop.get("type") == "string":
            return name
    return None


class McpTool:
    """``(argument: str) -> str`` over one tool of a connection, as every nat_ray tool is called."""

    def __init__(self, conn: Connection, tool: str, timeout_s: float) -> None:
        if tool not in conn.tools:
            raise ConfigError(
                f"{_describe(conn.name, conn.definition)} has no tool {tool!r}; it offers: {sorted(conn.tools)}"
            )
        self.conn = conn
        self.tool = tool
        self.timeout_s = timeout_s
        self.schema = conn.tools[tool]
        self.text_param = _single_string(self.schema)

    def arguments(self, argument: str) -> dict:
        if self.text_param is not None:
            return {self.text_param: argument}
        names = list((self.schema.get("properties") or {}).keys())
        try:
            parsed = json.loads(argument) if argument.strip() else {}
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            example = json.dumps(dict.fromkeys(names, "...")) if names else "{}"
            raise ValueError(f"{self.tool} takes its arguments as a JSON object: {self.tool}[{example}]")
        return parsed

    def __call__(self, argument: str) -> str:
        return self.conn.call(self.tool, self.arguments(argument), self.timeout_s)


def load_tool(spec: str, timeout_s: float) -> tuple[str, McpTool, str]:
    """``(name, tool, version)`` of a resolved MCP spec, connecting to its server if needed.

    Raises:
        ConfigError: an unresolved spec, a server that cannot be reached, or a tool it lacks.
    """
    server, tool, definition = parse_spec(spec)
    if definition is None:
        raise ConfigError(f"tool {spec!r} is not resolved against a task's mcp_servers")
    conn = connect(server, definition)
    return tool.lower(), McpTool(conn, tool, timeout_s), f"mcp:{server}:{conn.server_version}"


def check_servers(specs: list[str], timeout_s: float = CONNECT_TIMEOUT_S) -> list[str]:
    """Start (or reach) each server the specs name, check it offers their tools, stop it again.

    Returns:
        one problem per server that would not start or lacks a tool (empty: all good).
    """
    wanted: dict[str, tuple[str, dict, set[str]]] = {}
    for spec in specs:
        if not is_mcp(spec):
            continue
        server, tool, definition = parse_spec(spec)
        if definition is None:
            continue
        wanted.setdefault(_key(server, definition), (server, definition, set()))[2].add(tool)
    problems = []
    for server, definition, tools in wanted.values():
        try:
            conn = Connection(server, definition, timeout_s)
        except ConfigError as err:
            problems.append(str(err))
            continue
        try:
            missing = sorted(tools - set(conn.tools))
            if missing:
                problems.append(
                    f"{_describe(server, definition)} has no tool {', '.join(missing)}; it offers: {sorted(conn.tools)}"
                )
        finally:
            conn.close()
    return problems


def require_servers(specs: list[str]) -> None:
    """:func:`check_servers`, raising: the stages call it before Ray starts.

    Raises:
        ConfigError: every server that would not start or lacks a tool, in one error.
    """
    problems = check_servers(specs)
    if problems:
        raise ConfigError("; ".join(problems))
