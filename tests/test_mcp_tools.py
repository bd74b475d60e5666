"""MCP tools (nat_ray.tools.mcp): a task's ``mcp:SERVER/TOOL`` entries on the example's real MCP server.

The server is ``examples/mcp_units/server.py`` (the official ``mcp`` SDK), started over stdio as a
task file names it, and over streamable HTTP as a running service. Each start takes a second or
two, so the module shares one configured process where it can.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests
from helpers import free_port  # tests/helpers.py

from nat_ray.agent import prepare_tasks
from nat_ray.config import NatRayConfig
from nat_ray.errors import ConfigError
from nat_ray.tasks.task_file import load_task_file
from nat_ray.tools import REGISTRY, TOOL_VERSIONS, configure_tools, mcp
from nat_ray.tools.host import ToolHost

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mcp_units"
TASK = str(EXAMPLE / "task.yaml")


@pytest.fixture(scope="module")
def tools():
    """The example task's tools, configured in this process (its stdio server started once)."""
    (task,), tools = prepare_tasks([TASK], NatRayConfig())
    configure_tools(tools)
    yield task, tools
    mcp.close_all()
    configure_tools(NatRayConfig().tools)


def test_the_task_file_resolves_servers_into_self_contained_specs(tools):
    task, config = tools
    assert task.tools == ("convert_units", "scale", "calculate")
    spec = next(s for s in config.plugins if "convert_units" in s)
    server, tool, definition = mcp.parse_spec(spec)
    assert (server, tool) == ("units", "convert_units")
    assert definition == {"command": ["python", "server.py"], "cwd": str(EXAMPLE)}
    assert TOOL_VERSIONS["convert_units"] == "mcp:units:nat-ray-units=="  # the server's name and (no) version


def test_one_string_tools_get_the_text_and_others_json(tools):
    assert REGISTRY["convert_units"].run("3.5 km to m") == ("3500", None)
    assert REGISTRY["scale"].run('{"value": 3, "factor": 1000}') == ("3000", None)
    observation, error = REGISTRY["scale"].run("3 times 1000")
    assert observation.startswith("Error:") and 'scale[{"value": "...", "factor": "..."}]' in observation
    assert error is not None


def test_an_mcp_error_result_is_an_error_observation_and_the_session_goes_on(tools):
    observation, error = REGISTRY["convert_units"].run("3 km to kg")
    assert observation.startswith("Error:") and "cannot convert length (km) to mass (kg)" in observation
    assert error is not None
    assert REGISTRY["convert_units"].run("2 h to min") == ("120", None)


def test_the_argument_cap_holds_before_the_server_is_asked(tools):
    observation, error = REGISTRY["convert_units"].run("1 km to m" + " " * 5000)
    assert "the limit is" in observation and error is None


def _copy_of_example(tmp_path: Path, *replacements: tuple[str, str]) -> Path:
    """The example folder copied, its task file edited (its data paths made absolute first)."""
    import shutil

    folder = shutil.copytree(EXAMPLE, tmp_path / "mcp_units")
    text = (folder / "task.yaml").read_text().replace("../unit_convert", str(EXAMPLE.parent / "unit_convert"))
    for old, new in replacements:
        assert old in text
        text = text.replace(old, new)
    (folder / "task.yaml").write_text(text)
    return folder / "task.yaml"


def test_a_task_file_naming_an_unknown_server_or_a_bad_definition_is_refused(tmp_path):
    task = _copy_of_example(
        tmp_path,
        ("name: mcp_units", "name: mcp_units_bad"),
        ("mcp:units/scale", "mcp:nope/scale"),
        ("units: {command: [python, server.py]}", "units: {command: python, url: 'ftp://x'}"),
    )
    with pytest.raises(ConfigError) as err:
        load_task_file(task)
    assert "mcp_servers.units needs exactly one of command (stdio) and url" in str(err.value)
    assert "no MCP server 'nope' in mcp_servers" in str(err.value)


def test_check_servers_names_a_server_that_will_not_start_and_a_missing_tool(tools):
    _, config = tools
    spec = next(s for s in config.plugins if "convert_units" in s)
    missing_script = spec.replace("server.py", "no_such_server.py")
    missing_tool = spec.replace("units/convert_units", "units/teleport")
    nothing_there = "mcp:far/x=" + json.dumps({"url": f"http://127.0.0.1:{free_port()}/mcp"})
    problems = mcp.check_servers([missing_script, missing_tool, nothing_there], timeout_s=20)
    assert len(problems) == 3
    assert "MCP server 'units' (python no_such_server.py) could not be reached" in problems[0]
    assert "has no tool teleport" in problems[1] and "convert_units" in problems[1]
    assert "MCP server 'far'" in problems[2]


def test_dry_run_reports_an_mcp_server_that_will_not_start(tmp_path, capsys):
    from nat_ray.cli import main

    task = _copy_of_example(
        tmp_path, ("[python, server.py]", "[python, gone.py]"), ("name: mcp_units", "name: mcp_units_gone")
    )
    assert main(["rollout", "--tasks", str(task), "--output-dir", str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "rollout.tasks: MCP servers: MCP server 'units' (python gone.py) could not be reached" in err


def test_streamable_http_server(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(EXAMPLE / "server.py"), "--http", str(port)])
    try:
        url = f"http://127.0.0.1:{port}/mcp"
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                requests.get(url, timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.2)
        spec = "mcp:web/scale=" + json.dumps({"url": url})
        assert mcp.check_servers([spec]) == []
        name, tool, version = mcp.load_tool(spec, timeout_s=10)
        assert name == "scale" and tool('{"value": 2, "factor": 21}') == "42"
    finally:
        mcp.close_all()
        proc.terminate()
        proc.wait(timeout=10)


def test_a_tool_host_is_unhealthy_once_its_server_died():
    (_, config) = prepare_tasks([TASK], NatRayConfig())
    host = ToolHost(json.loads(json.dumps(config.__dict__)), only=("convert_units",))
    try:
        host.check_health()
        assert host.call("convert_units", "1 km to m").observation == "1000"
        servers = [
            p
            for p in psutil.Process().children(recursive=True)
            if any("server.py" in part for part in p.cmdline())
        ]
        assert servers
        for p in servers:
            p.kill()
        deadline = time.time() + 20
        while time.time() < deadline and mcp.connections_alive():
            time.sleep(0.2)
        with pytest.raises(RuntimeError, match="no longer connected"):
            host.check_health()
    finally:
        mcp.close_all()
        configure_tools(NatRayConfig().tools)
