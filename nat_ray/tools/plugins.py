"""Tool plug-ins: a task's ``tools:`` entries, resolved, checked, imported and shipped to Ray workers.

A ``tools:`` entry takes one of five forms:

- a built-in name: ``calculate``, ``search``;
- ``mcp:SERVER/TOOL``: a tool of an MCP server the task file's ``mcp_servers`` defines
  (:mod:`nat_ray.tools.mcp`);
- ``FILE.py:function`` (``./units.py:convert``): a function or class in a Python file, relative to
  the task file's folder; :func:`resolve_tool_spec` makes the path absolute;
- ``module:function`` (``my_pkg.tools:lookup``): a function or class in an importable module;
- an entry-point name: an installed package offers the tool under the group ``nat_ray.tools``
  (``[project.entry-points."nat_ray.tools"] lookup = "my_pkg.tools:lookup"``).

The tool the model calls is named by the function's (or class's) name, lowercased because
:func:`nat_ray.core.react.parse_action` reads action names case-insensitively (``convert[...]``), or by
the entry point's name. A tool is either

- a function ``(argument: str) -> str``, or
- a class whose ``__init__`` takes no required argument and whose instances are called like that
  function. It is constructed once per process (tool actor, Serve replica, or the local process),
  so it can load a model or an index in ``__init__``.

:func:`check_tool_specs` imports every plug-in (it does not construct classes) and reports every
problem at once, before Ray or an engine starts. The contract every call is held to (timeout,
argument and observation caps, errors as observations) lives in :mod:`nat_ray.tools.guard`.

A tool file must be one self-contained module (it may import installed packages, not files next
to it): :func:`runtime_env_for` ships exactly that file to every Ray worker with ``py_modules``,
where it is importable by its file name. :func:`load_tool` loads the file from its absolute path
where that exists and, on a worker where it does not, imports the shipped module by that name.
So two tool files of one run may not share a file name, and a file name may not shadow an
importable module (``json.py``): :func:`check_tool_specs` reports both.

Plug-ins are code the user configured; nothing a model or a request says causes an import.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import keyword
import logging
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import nat_ray.tools.mcp as mcp  # the module, not the package (its __init__ imports config)
from nat_ray import __version__
from nat_ray.errors import ConfigError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "nat_ray.tools"
BUILTIN_TOOLS = ("calculate", "search")
RESERVED = ("finish",)  # ends the episode; never a tool

_FILE_MODULE_PREFIX = "nat_ray_tool_file_"


@dataclass(frozen=True)
class LoadedTool:
    """A plug-in tool ready to call in this process.

    Attributes:
        name: the name the model uses in ``Action: name[...]`` (lowercase).
        fn: ``(argument: str) -> str``; a class's instance for class tools.
        version: for lineage: ``dist==1.2.0`` for an installed package, ``sha256:<16 hex>`` of the
            file for a tool file (or a module outside any package), ``unknown`` otherwise.
        source: the spec it came from.
    """

    name: str
    fn: Callable[[str], str]
    version: str
    source: str


# --------------------------------------------------------------------------------------------
# Specs: forms and names, without importing anything


def _split(spec: str) -> tuple[str, str, str]:
    """``(kind, target, attribute)`` with kind ``builtin``, ``mcp``, ``file``, ``module`` or ``entry_point``."""
    if spec in BUILTIN_TOOLS:
        return "builtin", spec, ""
    if mcp.is_mcp(spec):
        server, _, rest = spec[len(mcp.PREFIX) :].partition("/")
        return "mcp", server, rest.partition("=")[0]
    if ":" in spec:
        target, _, attr = spec.rpartition(":")
        return ("file" if target.endswith(".py") else "module"), target, attr
    return "entry_point", spec, ""


def spec_form_problem(spec: object) -> str | None:
    """What is wrong with the *form* of a ``tools:`` entry (no file or import is looked at), or None."""
    if not isinstance(spec, str) or not spec.strip():
        return f"a tool must be a non-empty string, got {spec!r}"
    if spec != spec.strip():
        return f"tool {spec!r} has surrounding whitespace"
    kind, target, attr = _split(spec)
    if kind == "builtin":
        return None
    if kind == "mcp":
        try:
            mcp.parse_spec(spec)
        except ConfigError as err:
            return str(err)
        return None
    if kind == "entry_point":
        if not spec.isidentifier():
            return (
                f"tool {spec!r} is neither a built-in ({', '.join(BUILTIN_TOOLS)}), FILE.py:function, "
                f"module:function, nor an entry-point name (a Python identifier)"
            )
        return None
    if not attr.isidentifier() or keyword.iskeyword(attr):
        return f"tool {spec!r}: {attr!r} after ':' must be a function or class name"
    if not target:
        return f"tool {spec!r}: nothing before ':'; write FILE.py:function or module:function"
    if kind == "module" and not all(part.isidentifier() for part in target.split(".")):
        return f"tool {spec!r}: {target!r} is not a module name (or a path ending in .py)"
    if kind == "file" and not Path(target).stem.isidentifier():
        return f"tool {spec!r}: the file name {Path(target).name!r} must be a Python identifier plus .py"
    return None


def tool_name(spec: str) -> str:
    """The name the model calls ``spec``'s tool by (no import): ``./units.py:Convert`` -> ``convert``."""
    kind, target, attr = _split(spec)
    return (target if kind in ("builtin", "entry_point") else attr).lower()


def is_builtin(spec: str) -> bool:
    return spec in BUILTIN_TOOLS


def resolve_tool_spec(spec: str, base_dir: Path | None) -> str:
    """Normalise one ``tools:`` entry; relative tool files are resolved against ``base_dir``.

    A built-in name, ``module:function`` and an entry-point name stay as they are;
    ``./units.py:convert`` becomes ``/abs/dir/units.py:convert``.

    Args:
        spec: the entry as written.
        base_dir: the task file's folder; ``None`` = the current directory.

    Raises:
        ConfigError: a malformed entry, a tool file that does not exist, or an entry-point name
            that no installed package offers.
    """
    problem = spec_form_problem(spec)
    if problem is not None:
        raise ConfigError(problem)
    kind, target, attr = _split(spec)
    if kind == "mcp" and mcp.parse_spec(spec)[2] is None:
        raise ConfigError(
            f"tool {spec!r}: an MCP tool is named in a task file, whose mcp_servers defines {target!r}"
        )
    if kind == "file":
        path = Path(target).expanduser()
        if not path.is_absolute():
            path = (base_dir if base_dir is not None else Path.cwd()) / path
        path = path.resolve()
        if not path.is_file():
            raise ConfigError(f"tool {spec!r}: file {path} does not exist")
        return f"{path}:{attr}"
    if kind == "entry_point" and _entry_point(spec) is None:
        raise ConfigError(
            f"unknown tool {spec!r}: not a built-in ({', '.join(BUILTIN_TOOLS)}), not FILE.py:function or "
            f"module:function, and no installed package offers it under the entry-point group "
            f"{ENTRY_POINT_GROUP!r}"
        )
    return spec


# --------------------------------------------------------------------------------------------
# Importing


def _entry_point(name: str) -> importlib.metadata.EntryPoint | None:
    matches = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=name)
    return next(iter(matches), None)


def _file_sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _module_version(module: ModuleType) -> str:
    top = module.__name__.split(".")[0]
    dists = importlib.metadata.packages_distributions().get(top, [])
    if dists:
        return f"{dists[0]}=={importlib.metadata.version(dists[0])}"
    file = getattr(module, "__file__", None)
    return _file_sha(Path(file)) if file and Path(file).is_file() else "unknown"


_import_lock = threading.Lock()


def _import_file(path: Path) -> ModuleType:
    """Import a tool file: from its path where it exists, else the copy ``py_modules`` shipped."""
    if not path.is_file():
        # On a Ray worker: runtime_env_for shipped the file, importable by its file name.
        try:
            module = importlib.import_module(path.stem)
        except ImportError as err:
            raise ConfigError(
                f"tool file {path} does not exist here and no shipped module {path.stem!r} is importable "
                f"({err}); start the tool's workers with runtime_env_for(...)"
            ) from None
        found = getattr(module, "__file__", None)
        if found is None or Path(found).name != path.name:  # an unrelated module of that name
            raise ConfigError(
                f"tool file {path} does not exist here, and the module {path.stem!r} found instead is "
                f"{found}; start the tool's workers with runtime_env_for(...)"
            )
        return module
    # A name per path, so that two tasks' tools.py never share a module in one process.
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    name = f"{_FILE_MODULE_PREFIX}{path.stem}_{digest}"
    with _import_lock:
        if name in sys.modules:
            return sys.modules[name]
        module_spec = importlib.util.spec_from_file_location(name, path)
        assert module_spec is not None and module_spec.loader is not None  # a .py file always has one
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return module


def _import_target(spec: str) -> tuple[object, str, str]:
    """The object ``spec`` names, its tool name and its version (imports; constructs nothing).

    Raises:
        ConfigError: the module cannot be imported or lacks the attribute.
    """
    kind, target, attr = _split(spec)
    try:
        if kind == "entry_point":
            ep = _entry_point(target)
            if ep is None:
                raise ConfigError(
                    f"no installed package offers tool {spec!r} (entry-point group {ENTRY_POINT_GROUP!r})"
                )
            obj = ep.load()
            version = f"{ep.dist.name}=={ep.dist.version}" if ep.dist is not None else "unknown"
            return obj, target.lower(), version
        if kind == "file":
            module = _import_file(Path(target))
            file = getattr(module, "__file__", None)
            version = _file_sha(Path(file)) if file else "unknown"
        else:
            module = importlib.import_module(target)
            version = _module_version(module)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - any error importing user code is a config problem to report
        raise ConfigError(f"tool {spec!r} cannot be imported: {type(err).__name__}: {err}") from err
    if not hasattr(module, attr):
        raise ConfigError(f"tool {spec!r}: {module.__name__} has no attribute {attr!r}")
    return getattr(module, attr), attr.lower(), version


def _signature_problem(obj: object, spec: str) -> str | None:
    """Why ``obj`` cannot serve as a tool (a function of one argument, or such a class), or None."""
    if inspect.isclass(obj):
        try:
            inspect.signature(obj).bind()
        except TypeError:
            return f"tool {spec!r}: class {obj.__name__}'s __init__ must take no required arguments"
        except ValueError:
            pass  # a builtin without a signature: find out when it is constructed
        if not any("__call__" in vars(k) for k in obj.__mro__ if k is not object):
            return f"tool {spec!r}: class {obj.__name__} has no __call__(self, argument: str) -> str"
        call = inspect.getattr_static(obj, "__call__")
        fn = call.__func__ if isinstance(call, staticmethod | classmethod) else call
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return None
        params = list(sig.parameters.values())
        if not isinstance(call, staticmethod):
            params = params[1:]  # self (or cls)
        sig = sig.replace(parameters=params)
        what = f"{obj.__name__}.__call__"
    elif callable(obj):
        try:
            sig = inspect.signature(obj)
        except (TypeError, ValueError):
            return None
        what = getattr(obj, "__name__", repr(obj))
    else:
        return f"tool {spec!r} is a {type(obj).__name__}, not a function or class"
    try:
        sig.bind("argument")
    except TypeError:
        empty = inspect.Parameter.empty
        bare = sig.replace(
            parameters=[p.replace(annotation=empty) for p in sig.parameters.values()], return_annotation=empty
        )
        return (
            f"tool {spec!r}: {what}{bare} must take exactly one argument (the text inside name[...]) "
            f"and return a str"
        )
    return None


_loaded: dict[str, LoadedTool] = {}


def load_tool(spec: str) -> LoadedTool:
    """Import and check one normalised spec; a class is constructed here, once per process.

    Raises:
        ConfigError: a built-in name, an import error, a missing attribute, a wrong signature, or a
            class whose construction raised.
    """
    if spec in _loaded:
        return _loaded[spec]
    if is_builtin(spec):
        raise ConfigError(f"{spec!r} is a built-in tool; it is always registered")
    if mcp.is_mcp(spec):
        raise ConfigError(f"{spec!r} is an MCP tool: nat_ray.tools.configure_tools connects to its server")
    problem = spec_form_problem(spec)
    if problem is not None:
        raise ConfigError(problem)
    obj, name, version = _import_target(spec)
    problem = _signature_problem(obj, spec)
    if problem is not None:
        raise ConfigError(problem)
    fn = obj
    if inspect.isclass(obj):
        try:
            fn = obj()
        except Exception as err:  # noqa: BLE001 - user code; report it as the tool's problem
            raise ConfigError(f"tool {spec!r}: {obj.__name__}() raised {type(err).__name__}: {err}") from err
    with _import_lock:
        return _loaded.setdefault(spec, LoadedTool(name, fn, version, spec))


def check_tool_specs(specs: Sequence[str]) -> list[str]:
    """Every problem with a set of normalised specs (one task's or one run's), ``[]`` if none.

    Imports each plug-in and checks its signature, without constructing classes. Also reports two
    tools with one name, a name taken by a built-in or ``finish``, two tool files with one file
    name, and a tool file whose name would shadow an importable module on a Ray worker.
    """
    problems: list[str] = []
    names: dict[str, str] = {}
    stems: dict[str, Path] = {}
    for spec in specs:
        problem = spec_form_problem(spec)
        if problem is not None:
            problems.append(problem)
            continue
        kind, target, _ = _split(spec)
        name = tool_name(spec)
        if kind != "builtin":
            if name in RESERVED or name in BUILTIN_TOOLS:
                problems.append(
                    f"tool {spec!r}: the name {name!r} is taken by the built-in {name!r}; rename it"
                )
                continue
            if kind == "file":
                path = Path(target)
                if not path.is_absolute() or not path.is_file():
                    problems.append(f"tool {spec!r}: file {path} does not exist (or is not an absolute path)")
                    continue
                other = stems.setdefault(path.stem, path)
                if other != path:
                    problems.append(
                        f"tool files {other} and {path} share the file name {path.name!r}; a Ray worker "
                        f"imports a tool file by that name, so rename one"
                    )
                    continue
                shadow = _shadowed_module(path)
                if shadow is not None:
                    problems.append(
                        f"tool file {path}: its name {path.stem!r} is also the importable module "
                        f"{shadow}; a Ray worker would import one for the other, so rename the file"
                    )
                    continue
            # An MCP tool is not imported: nat_ray.tools.mcp.check_servers reaches its server.
            problem = None if kind == "mcp" else _import_problem(spec)
            if problem is not None:
                problems.append(problem)
                continue
        if name in names and names[name] != spec:
            problems.append(f"tools {names[name]!r} and {spec!r} are both named {name!r}")
        names.setdefault(name, spec)
    return problems


def _import_problem(spec: str) -> str | None:
    """Why ``spec``'s plug-in cannot be imported or called as a tool, or None."""
    try:
        obj, _, _ = _import_target(spec)
    except ConfigError as err:
        return str(err)
    return _signature_problem(obj, spec)


def _shadowed_module(path: Path) -> str | None:
    """The importable module (not ``path`` itself) that a module named ``path.stem`` would clash with."""
    if path.stem in sys.builtin_module_names or path.stem in sys.stdlib_module_names:
        return f"{path.stem!r} (Python's own)"
    try:
        found = importlib.util.find_spec(path.stem)
    except (ImportError, ValueError):
        return None
    # A namespace package (no origin) loses to a module on PYTHONPATH, so it cannot shadow the file.
    if found is None or not found.origin or Path(found.origin).resolve() == path:
        return None
    # The same file shipped to this Ray worker (runtime_env_for) is the tool itself, not a clash.
    if _same_content(Path(found.origin), path):
        return None
    return f"{path.stem!r} ({found.origin})"


def _same_content(a: Path, b: Path) -> bool:
    try:
        return a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()
    except OSError:
        return False


def tool_versions(specs: Sequence[str]) -> dict[str, str]:
    """``{tool name: version}`` of normalised specs, built-ins included (imports; constructs nothing).

    For lineage where the tools run elsewhere (tool actors): the driver records what it shipped.

    Raises:
        ConfigError: a plug-in cannot be imported.
    """

    versions = {}
    for spec in specs:
        if mcp.is_mcp(spec):
            versions[tool_name(spec)] = mcp.spec_version(spec)
        else:
            versions[tool_name(spec)] = __version__ if is_builtin(spec) else _import_target(spec)[2]
    return versions


# --------------------------------------------------------------------------------------------
# Shipping to Ray workers


def runtime_env_for(specs: Sequence[str]) -> dict:
    """The Ray ``runtime_env`` that ships ``specs``' tool files to every worker: ``{"py_modules": [...]}``.

    Ray uploads each file once (content-addressed) and puts it on the worker's ``PYTHONPATH``, where
    :func:`load_tool` imports it by its file name when the driver's path does not exist. ``{}``
    when no spec is a file. Pass it to the actors that call the tools (``.options(runtime_env=...)``,
    ``ray_actor_options``) or to ``ray.init``; it replaces a job's own ``py_modules``, if it has any.

    Raises:
        ConfigError: a tool file is missing, or two tool files share a file name.
    """
    files: dict[str, Path] = {}
    for spec in specs:
        kind, target, _ = _split(spec)
        if kind != "file":
            continue
        path = Path(target)
        if not path.is_file():
            raise ConfigError(f"tool {spec!r}: file {path} does not exist")
        other = files.setdefault(path.stem, path)
        if other != path:
            raise ConfigError(f"tool files {other} and {path} share the file name {path.name!r}; rename one")
    return {"py_modules": [str(p) for p in files.values()]} if files else {}
