"""Tool plug-ins (nat_ray.tools.plugins) and the tool contract (nat_ray.tools.guard), in-process.

The hostile tools of tests/data/plugins/hostile_tools.py run here for real; only the one that
kills its process runs in tests/integration/test_hostile_tools.py, through Ray tool actors.
"""

from __future__ import annotations

import importlib
import shutil
import sys
import time
from pathlib import Path

import pytest

from nat_ray import __version__
from nat_ray.config import ToolsConfig, from_dict
from nat_ray.core.react import Episode, Generation, LocalTools, Sampling, Stepper, ToolCall, call_tool
from nat_ray.errors import ConfigError, DataError, ToolError
from nat_ray.tools import REGISTRY, TOOL_VERSIONS, configure_tools, tool_names
from nat_ray.tools.calculator import calculate
from nat_ray.tools.guard import MAX_HUNG_CALLS, GuardedTool, ToolLimits
from nat_ray.tools.host import ToolHost
from nat_ray.tools.plugins import (
    check_tool_specs,
    load_tool,
    resolve_tool_spec,
    runtime_env_for,
    tool_name,
    tool_versions,
)
from nat_ray.tools.search.tool import set_search_backend

PLUGINS = Path(__file__).parent / "data" / "plugins"
HOSTILE = PLUGINS / "hostile_tools.py"
BAD = PLUGINS / "bad_tools.py"


def spec(path: Path, attr: str) -> str:
    return f"{path}:{attr}"


@pytest.fixture
def restore_tools():
    """configure_tools changes process-wide state: put the defaults (and the search backend) back."""
    previous = set_search_backend(None)
    set_search_backend(previous)
    yield
    configure_tools(ToolsConfig())
    set_search_backend(previous)


# --------------------------------------------------------------------------------------------
# Specs


def test_resolve_tool_spec_normalises_each_form(tmp_path):
    assert resolve_tool_spec("calculate", tmp_path) == "calculate"
    assert resolve_tool_spec("pkg.mod:fn", tmp_path) == "pkg.mod:fn"
    (tmp_path / "units.py").write_text("def convert(a):\n    return a\n")
    assert resolve_tool_spec("./units.py:convert", tmp_path) == f"{tmp_path / 'units.py'}:convert"
    assert resolve_tool_spec("units.py:convert", tmp_path) == f"{tmp_path / 'units.py'}:convert"
    assert resolve_tool_spec(f"{tmp_path}/units.py:convert", None) == f"{tmp_path / 'units.py'}:convert"


@pytest.mark.parametrize(
    "bad, words",
    [
        ("./missing.py:fn", "does not exist"),
        ("no_such_tool_entry_point", "no installed package offers it"),
        ("units.py:", "must be a function or class name"),
        (":fn", "nothing before ':'"),
        ("my-pkg.mod:fn", "not a module name"),
        ("mod:1fn", "must be a function or class name"),
        ("two words", "neither a built-in"),
        (" calculate", "whitespace"),
        ("", "non-empty string"),
        ("./my-units.py:fn", "must be a Python identifier"),
    ],
)
def test_resolve_tool_spec_names_the_problem(tmp_path, bad, words):
    with pytest.raises(ConfigError, match=words):
        resolve_tool_spec(bad, tmp_path)


def test_tool_names_are_lowercase_like_parsed_actions():
    assert tool_name("calculate") == "calculate"
    assert tool_name("/x/units.py:Convert") == "convert"
    assert tool_name("pkg.mod:lookUp") == "lookup"
    assert tool_name("shout") == "shout"
    assert tool_names(ToolsConfig(plugins=["calculate", "/x/units.py:convert"])) == [
        "calculate",
        "search",
        "convert",
    ]


# --------------------------------------------------------------------------------------------
# Loading and checking


def test_load_tool_imports_a_function_from_a_file_with_its_hash_as_version():
    tool = load_tool(spec(HOSTILE, "where"))
    assert tool.name == "where" and tool.source == spec(HOSTILE, "where")
    import hashlib

    assert tool.version == "sha256:" + hashlib.sha256(HOSTILE.read_bytes()).hexdigest()[:16]
    assert tool.fn("q").split("|")[0] == str(HOSTILE)


def test_a_class_tool_is_constructed_once_per_process():
    first = load_tool(spec(HOSTILE, "Counter"))
    second = load_tool(spec(HOSTILE, "Counter"))
    assert first.fn is second.fn and first.name == "counter"
    assert first.fn("a") == "a #1" and second.fn("b") == "b #2"


def test_load_tool_from_a_module():
    tool = load_tool("string:capwords")
    assert tool.fn("hello world") == "Hello World" and tool.version.startswith("sha256:")


def test_load_tool_refuses_what_it_cannot_call():
    with pytest.raises(ConfigError, match=r"two_args\(a, b\) must take exactly one argument"):
        load_tool(spec(BAD, "two_args"))
    with pytest.raises(ConfigError, match="FailsToStart\\(\\) raised OSError: index file missing"):
        load_tool(spec(BAD, "FailsToStart"))
    with pytest.raises(ConfigError, match="built-in"):
        load_tool("calculate")


def test_check_tool_specs_reports_every_problem_at_once(tmp_path):
    (tmp_path / "json.py").write_text("def dumps(a):\n    return a\n")
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(HOSTILE, other / "hostile_tools.py")
    specs = [
        "calculate",
        spec(HOSTILE, "where"),
        spec(BAD, "with_default"),  # fine: callable with one argument
        spec(BAD, "two_args"),
        spec(BAD, "no_args"),
        spec(BAD, "keyword_only"),
        spec(BAD, "NOT_CALLABLE"),
        spec(BAD, "NeedsPath"),
        spec(BAD, "NoCall"),
        spec(BAD, "CallTakesTwo"),
        spec(BAD, "missing_fn"),
        spec(PLUGINS / "broken_import_tools.py", "tool"),
        spec(tmp_path / "json.py", "dumps"),
        spec(other / "hostile_tools.py", "flood"),
        spec(BAD, "calculate"),
        "nat_ray_no_such_module_xyz:fn",
        spec(tmp_path / "gone.py", "fn"),
    ]
    problems = check_tool_specs(specs)
    text = "\n".join(problems)
    assert len(problems) == 14, text
    for words in [
        "two_args(a, b) must take exactly one argument",
        "no_args() must take exactly one argument",
        "keyword_only(*, text) must take exactly one argument",
        "NOT_CALLABLE' is a int, not a function or class",
        "class NeedsPath's __init__ must take no required arguments",
        "class NoCall has no __call__",
        "CallTakesTwo.__call__(a, b) must take exactly one argument",
        "has no attribute 'missing_fn'",
        "cannot be imported: ModuleNotFoundError: No module named 'nat_ray_no_such_module_xyz'",
        "'json' (Python's own)",
        "share the file name 'hostile_tools.py'",
        "the name 'calculate' is taken by the built-in",
        "gone.py does not exist",
    ]:
        assert words in text, words
    assert check_tool_specs(["calculate", "search", spec(HOSTILE, "where"), spec(HOSTILE, "Counter")]) == []


def test_check_tool_specs_finds_two_tools_with_one_name(tmp_path):
    (tmp_path / "more_tools.py").write_text("def where(a):\n    return a\n")
    problems = check_tool_specs([spec(HOSTILE, "where"), spec(tmp_path / "more_tools.py", "where")])
    assert problems == [
        f"tools {spec(HOSTILE, 'where')!r} and {spec(tmp_path / 'more_tools.py', 'where')!r} are both named 'where'"
    ]


def test_tool_versions_for_lineage_construct_nothing():
    load_tool(spec(HOSTILE, "where"))  # the file's module is loaded: its Counter can be watched
    module = next(m for name, m in sys.modules.items() if name.startswith("nat_ray_tool_file_hostile_tools"))
    constructed = module.Counter.constructed
    versions = tool_versions(["calculate", spec(HOSTILE, "Counter")])
    assert versions["calculate"] == __version__ and versions["counter"].startswith("sha256:")
    assert check_tool_specs([spec(HOSTILE, "Counter")]) == []
    assert module.Counter.constructed == constructed


def test_entry_point_tools(tmp_path, monkeypatch):
    dist = tmp_path / "fake_nat_tools-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-nat-tools\nVersion: 1.2.3\n")
    (dist / "entry_points.txt").write_text("[nat_ray.tools]\nshout = fake_nat_tools_mod:shout\n")
    (tmp_path / "fake_nat_tools_mod.py").write_text("def shout(a):\n    return a.upper()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_tool_spec("shout", None) == "shout"
    assert check_tool_specs(["shout"]) == []
    tool = load_tool("shout")
    assert tool.name == "shout" and tool.fn("hi") == "HI" and tool.version == "fake-nat-tools==1.2.3"


# --------------------------------------------------------------------------------------------
# Shipping to workers


def test_runtime_env_ships_tool_files_only(tmp_path):
    assert runtime_env_for(["calculate", "string:capwords"]) == {}
    env = runtime_env_for(["calculate", spec(HOSTILE, "where"), spec(HOSTILE, "flood")])
    assert env == {"py_modules": [str(HOSTILE)]}
    shutil.copy(HOSTILE, tmp_path / "hostile_tools.py")
    with pytest.raises(ConfigError, match="share the file name"):
        runtime_env_for([spec(HOSTILE, "where"), spec(tmp_path / "hostile_tools.py", "where")])


def test_a_worker_without_the_drivers_path_imports_the_shipped_module(tmp_path, monkeypatch):
    shipped = tmp_path / "py_modules_dir"  # what Ray's py_modules puts on a worker's PYTHONPATH
    shipped.mkdir()
    shutil.copy(HOSTILE, shipped / "nat_shipped_tools.py")
    monkeypatch.syspath_prepend(str(shipped))
    tool = load_tool("/no/such/driver/path/nat_shipped_tools.py:where")
    assert tool.fn("x").split("|")[0] == str(shipped / "nat_shipped_tools.py")
    assert tool.version == "sha256:" + __import__("hashlib").sha256(HOSTILE.read_bytes()).hexdigest()[:16]
    with pytest.raises(ConfigError, match="runtime_env_for"):
        load_tool("/no/such/driver/path/nat_never_shipped.py:where")
    with pytest.raises(ConfigError, match="the module 'json' found instead"):
        load_tool("/no/such/driver/path/json.py:dumps")  # never an unrelated module of that name


# --------------------------------------------------------------------------------------------
# The contract


LIMITS = ToolLimits(timeout_s=0.3, max_argument_chars=50, max_observation_chars=100)


def guarded(attr: str, limits: ToolLimits = LIMITS) -> GuardedTool:
    return GuardedTool(attr, load_tool(spec(HOSTILE, attr)).fn, limits)


def test_an_exception_becomes_an_error_observation():
    observation, error = guarded("explode").run("x")
    assert observation == "Error: the explode tool failed (RuntimeError: boom on x); try again or answer."
    assert error == "explode raised RuntimeError: boom on x"


def test_a_hung_tool_times_out_and_is_abandoned():
    tool = guarded("hang")
    start = time.monotonic()
    observation, error = tool.run("x")
    assert time.monotonic() - start < 2
    assert observation == "Error: the hang tool timed out after 0.3 s; try another input or answer."
    assert error == "hang timed out after 0.3 s"
    tool.limits = ToolLimits(0.01, None, None)
    for _ in range(MAX_HUNG_CALLS - 1):
        tool.run("x")
    start = time.monotonic()
    observation, error = tool.run("x")  # four calls still hang: answered at once
    assert time.monotonic() - start < 0.01
    assert observation == "Error: the hang tool is not answering; answer without it." and "4 calls" in error


def test_a_10_mb_answer_is_cut_with_a_note():
    observation, error = guarded("flood").run("x")
    assert (
        observation
        == "x" * 100 + "\n[truncated: the flood tool returned 10000000 characters; the limit is 100]"
    )
    assert error == "flood returned 10000000 characters; cut to 100"


def test_a_non_string_answer_is_an_error():
    assert guarded("number").run("x") == (
        "Error: the number tool returned int, not text.",
        "number returned int instead of str",
    )


def test_a_too_long_argument_is_refused_before_the_call():
    calls = []
    tool = GuardedTool("echo", lambda a: calls.append(a) or a, LIMITS)
    assert tool.run("y" * 51) == ("Error: the echo argument is 51 characters long; the limit is 50.", None)
    assert calls == [] and tool.run("y" * 50) == ("y" * 50, None)


def test_a_backend_failure_keeps_its_message_and_setup_errors_raise():
    def broken(_: str) -> str:
        raise ToolError("search service unreachable")

    result = call_tool(broken, ToolCall("search", "q"))
    assert (
        result.observation
        == "Error: the search tool failed (search service unreachable); try again or answer."
    )
    assert result.error == "search service unreachable"

    def no_corpus(_: str) -> str:
        raise DataError("corpus file missing")

    with pytest.raises(DataError):
        GuardedTool("search", no_corpus, LIMITS, reraise=(DataError,)).run("q")
    assert GuardedTool("plug", no_corpus, LIMITS).run("q")[1] == "plug raised DataError: corpus file missing"


def test_system_exit_in_a_tool_is_an_error_not_an_exit():
    assert GuardedTool("quit", lambda a: sys.exit(2), LIMITS).run("x")[1] == "quit raised SystemExit: 2"


def test_builtin_observations_keep_their_own_caps():
    huge = "(10^1000)^4"  # 4001 digits: over the plug-in observation cap, within the calculator's own
    assert REGISTRY["calculate"](huge) == calculate(huge) and len(calculate(huge)) == 4001
    long_input = "1+" * 1500 + "1"  # over the plug-in argument cap: the calculator's own message
    assert REGISTRY["calculate"](long_input) == calculate(long_input)
    assert REGISTRY["calculate"](long_input).startswith("Error: expression is 3001 characters long")
    assert call_tool(REGISTRY["calculate"], ToolCall("calculate", "6 * 2/3")).observation == "4"


# --------------------------------------------------------------------------------------------
# Registration, config, and the stepper


def test_tools_config_checks_plugins_and_limits():
    cfg = from_dict(ToolsConfig, {"plugins": [spec(HOSTILE, "where")], "call_timeout_s": 5})
    assert cfg.plugins == [spec(HOSTILE, "where")] and cfg.call_timeout_s == 5.0
    assert ToolsConfig().plugins == [] and ToolsConfig().call_timeout_s == 60.0
    with pytest.raises(ConfigError, match="tools.plugins: .*must be a function or class name"):
        ToolsConfig(plugins=["units.py:"])
    for field in ("call_timeout_s", "max_argument_chars", "max_observation_chars"):
        with pytest.raises(ConfigError, match=f"tools.{field} must be > 0"):
            ToolsConfig(**{field: 0})
    # Only the form: a worker's config names paths that exist on the driver.
    assert ToolsConfig(plugins=["/not/here/units.py:convert"]).plugins


def test_configure_tools_registers_plugins_with_versions(restore_tools):
    cfg = ToolsConfig(plugins=["calculate", spec(HOSTILE, "where"), spec(HOSTILE, "Counter")])
    configure_tools(cfg)
    assert set(REGISTRY) == {"calculate", "search", "where", "counter"}
    assert TOOL_VERSIONS["calculate"] == __version__ and TOOL_VERSIONS["where"].startswith("sha256:")
    assert REGISTRY["where"].limits == ToolLimits(60.0, 2000, 4000)
    assert REGISTRY["calculate"].limits == ToolLimits(60.0, None, None)
    configure_tools(cfg, only=("counter",))
    assert set(REGISTRY) == {"calculate", "search", "counter"}
    configure_tools(ToolsConfig())
    assert set(REGISTRY) == {"calculate", "search"} and set(TOOL_VERSIONS) == {"calculate", "search"}
    with pytest.raises(ConfigError, match="NeedsPath's __init__"):
        configure_tools(ToolsConfig(plugins=[spec(BAD, "NeedsPath")]))
    assert set(REGISTRY) == {"calculate", "search"}  # a failed configure leaves the registry as it was


def test_tool_host_runs_plugins_and_never_raises_for_a_call(restore_tools):
    host = ToolHost(
        {"plugins": [spec(HOSTILE, "explode"), spec(HOSTILE, "where")], "call_timeout_s": 1.0},
        only=("explode",),
    )
    assert host.call("explode", "x").error == "explode raised RuntimeError: boom on x"
    assert host.call("where", "x").error == "where is not registered in this tool host"
    assert host.call("calculate", "1+1").observation == "2"
    assert set(host.versions()) == {"calculate", "search", "explode"}


class _Script:
    """Each episode calls the tool its prompt names, then finishes."""

    def generate(self, conversations, sampling):
        out = []
        for conv in conversations:
            tool = conv[0]["content"]
            out.append(Generation("Action: finish[1]" if len(conv) > 1 else f"Action: {tool}[x]", 5, 5))
        return out

    def close(self) -> None:
        pass


HOSTILE_NAMES = ("explode", "hang", "flood", "number")


@pytest.mark.parametrize("stop_on_tool_error", [False, True])
def test_hostile_plugins_leave_every_episode_recorded(restore_tools, stop_on_tool_error):
    configure_tools(ToolsConfig(plugins=[spec(HOSTILE, name) for name in HOSTILE_NAMES], call_timeout_s=0.5))
    names = (*HOSTILE_NAMES, "calculate")
    episodes = [Episode(n, [{"role": "user", "content": n}], names, Sampling(), 3) for n in names]
    Stepper(_Script(), LocalTools(), stop_on_tool_error=stop_on_tool_error).run(episodes)
    for ep in episodes[:-1]:
        assert ep.done and ep.steps[0].error.startswith("tool error: "), ep.id
        assert ep.steps[0].observation.startswith("Error: the") or "[truncated:" in ep.steps[0].observation
        assert len(ep.steps[0].observation) < 5000
        if stop_on_tool_error:
            assert ep.failure_reason == "tool_error" and ep.turns == 1
        else:
            assert ep.finished and ep.answer == "1" and ep.turns == 2
    calc = episodes[-1]
    assert calc.finished and calc.steps[0].error is None


def test_a_tool_file_clashing_with_an_importable_module_is_reported_unless_it_is_the_shipped_copy(
    tmp_path, monkeypatch
):
    tool = tmp_path / "task" / "nat_clash_tool.py"
    tool.parent.mkdir()
    tool.write_text("def nat_clash_tool(argument: str) -> str:\n    return argument\n")
    shipped = tmp_path / "shipped"  # what a Ray worker's py_modules folder holds
    shipped.mkdir()
    monkeypatch.syspath_prepend(str(shipped))
    (shipped / tool.name).write_text(tool.read_text())  # the same file: the tool itself
    assert check_tool_specs([f"{tool}:nat_clash_tool"]) == []
    (shipped / tool.name).write_text("VALUE = 1\n")  # another module of that name: a clash
    importlib.invalidate_caches()
    problems = check_tool_specs([f"{tool}:nat_clash_tool"])
    assert len(problems) == 1 and "also the importable module 'nat_clash_tool'" in problems[0]
