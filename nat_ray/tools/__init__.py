"""The agent's tools, in one registry: ``REGISTRY["calculate"]("2 * 3") -> "6"``.

A tool is a plain ``str -> str`` function (or a class instance called like one). The built-ins are
``calculate`` and ``search``; plug-ins (a function in a file, a module, or an installed package's
entry point; see :mod:`nat_ray.tools.plugins`) join them when :func:`configure_tools` reads
``ToolsConfig.plugins``. Every registry entry is a :class:`~nat_ray.tools.guard.GuardedTool`: a
call is timed out, capped, and any failure comes back as an ``Error: ...`` observation the model
can read and react to (see :mod:`nat_ray.tools.guard`). A broken *backend* (an unreachable search
service, say) raises :class:`nat_ray.errors.ToolError` inside the tool; that becomes an
observation too, and the stepper records it on the step.

:data:`TOOL_VERSIONS` holds each registered tool's version for the trajectories' lineage.

``finish`` is not a tool: the stepper ends the episode on it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from nat_ray import __version__
from nat_ray.config import ToolsConfig
from nat_ray.errors import ConfigError, DataError, ModelError
from nat_ray.tools import mcp
from nat_ray.tools.calculator import calculate
from nat_ray.tools.guard import GuardedTool, ToolLimits, set_default_limits
from nat_ray.tools.plugins import BUILTIN_TOOLS, LoadedTool, is_builtin, load_tool, tool_name

# The function is imported under another name: ``nat_ray.tools.search`` is the search package.
from nat_ray.tools.search.tool import configure_search, get_search_backend
from nat_ray.tools.search.tool import search as search_tool

ToolFn = Callable[[str], str]

FINISH = "finish"

REGISTRY: dict[str, ToolFn] = {}
"""Tool name -> guarded callable, in this process."""

TOOL_VERSIONS: dict[str, str] = {}
"""Tool name -> version (built-ins: nat_ray's version; plug-ins: see :class:`~nat_ray.tools.plugins.LoadedTool`)."""

# search's missing model or corpus is a broken setup, not an answer: let it raise.
_SEARCH_SETUP_ERRORS = (ConfigError, DataError, ModelError)


def _load_search_index() -> None:
    backend = get_search_backend()
    if hasattr(backend, "load"):  # the local index: minutes on a full corpus, once; not a slow call
        backend.load()


def _register_builtins(limits: ToolLimits) -> None:
    REGISTRY.clear()
    TOOL_VERSIONS.clear()
    own = limits.own_caps()  # their own argument and observation caps: their observations stay as they are
    REGISTRY["calculate"] = GuardedTool("calculate", calculate, own)
    REGISTRY["search"] = GuardedTool(
        "search", search_tool, own, prepare=_load_search_index, reraise=_SEARCH_SETUP_ERRORS
    )
    TOOL_VERSIONS.update(dict.fromkeys(BUILTIN_TOOLS, __version__))


_register_builtins(ToolLimits.from_config(ToolsConfig()))


def configure_tools(config: ToolsConfig, only: Collection[str] | None = None) -> None:
    """Set this process's tools up from ``config`` (call once per process or actor).

    Points search at its backend, applies the call limits to every tool, and registers each
    ``config.plugins`` tool in :data:`REGISTRY` (a class is constructed now) with its version in
    :data:`TOOL_VERSIONS`. Plug-ins registered by an earlier call and not in ``config`` are dropped.

    Args:
        config: the ``tools`` section.
        only: register only these plug-in names (a tool actor serving one tool constructs no other
            tool's class); ``None`` = all.

    Raises:
        ConfigError: a plug-in cannot be imported, has the wrong signature, or its class raised.
    """
    if config.search_backend == "http":
        configure_search("http", url=config.search_url, timeout_s=config.search_timeout_s)
    else:
        configure_search(
            "local",
            corpus_path=config.search_corpus,
            model_path=config.search_model,
            batch_size=config.index_batch_size,
            ann_min_paragraphs=config.ann_min_paragraphs,
            shard_rows=config.index_shard_rows,
        )
    limits = ToolLimits.from_config(config)
    set_default_limits(limits)
    wanted = [s for s in config.plugins if not is_builtin(s) and (only is None or tool_name(s) in only)]
    # An MCP tool's server is connected once per process (nat_ray.tools.mcp keeps the session).
    loaded = [
        LoadedTool(*mcp.load_tool(spec, limits.timeout_s), spec) if mcp.is_mcp(spec) else load_tool(spec)
        for spec in wanted
    ]
    _register_builtins(limits)
    for tool in loaded:
        REGISTRY[tool.name] = GuardedTool(tool.name, tool.fn, limits)
        TOOL_VERSIONS[tool.name] = tool.version


def configured_versions(config: ToolsConfig) -> dict[str, str]:
    """``{tool name: version}`` of every tool ``config`` provides, for lineage where the tools run elsewhere.

    The built-ins' from this process, the plug-ins' from their specs (imported, nothing constructed).

    Raises:
        ConfigError: a plug-in cannot be imported.
    """
    from nat_ray.tools.plugins import tool_versions

    return {**TOOL_VERSIONS, **tool_versions(config.plugins)}


def tool_names(config: ToolsConfig) -> list[str]:
    """Every tool ``config`` provides: the built-ins, then its plug-ins (no import)."""
    names = list(BUILTIN_TOOLS)
    names += [tool_name(s) for s in config.plugins if not is_builtin(s) and tool_name(s) not in names]
    return names


__all__ = [
    "FINISH",
    "REGISTRY",
    "TOOL_VERSIONS",
    "ToolFn",
    "calculate",
    "configure_tools",
    "search_tool",
    "tool_names",
]
