"""Loading typed configs: dataclasses built from plain mappings, YAML files and ``--set`` overrides.

Kept apart from the config classes (:mod:`nat_ray.config`) because it knows nothing of them: it
checks any frozen dataclass tree against its annotations and reports every problem at once, naming
the dotted field, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from nat_ray.errors import ConfigError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, where: str, problems: list[str]) -> Any:
    """Check ``value`` against annotation ``tp``; build nested dataclasses; collect problems."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        sections = [a for a in args if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and len(sections) == 1:  # an optional section: its own problems, named
            return _coerce(sections[0], value, where, problems)
        for arg in (a for a in args if a is not type(None)):
            attempt: list[str] = []
            out = _coerce(arg, value, where, attempt)
            if not attempt:
                return out
        problems.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
            return value
        return _build(tp, value, f"{where}.", problems)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            problems.append(f"{where}: expected a list, got {value!r}")
            return value
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(item_tp, v, f"{where}[{i}]", problems) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}")
        return value
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        problems.append(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        problems.append(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type[T], data: dict, where: str, problems: list[str]) -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    before = len(problems)  # problems of other sections are in the list already
    for key in data:
        if key not in names:
            problems.append(f"{where}{key}: unknown key for {cls.__name__}; known keys: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        if key in names:
            count = len(problems)
            coerced = _coerce(hints[key], value, f"{where}{key}", problems)
            if len(problems) == count:  # a value of the wrong type is left out: its default stands in
                kwargs[key] = coerced
    if any(v is None and dataclasses.is_dataclass(hints[k]) for k, v in kwargs.items()):
        return None  # type: ignore[return-value]  # a section that could not be built
    built = _construct(cls, kwargs, problems)  # the range and choice checks of the good values too
    return None if len(problems) > before else built  # type: ignore[return-value]


_FIELD = re.compile(r"^(?:[a-z_]+\.)?([a-z_]+)\b")


def _construct(cls: type[T], kwargs: dict, problems: list[str]) -> T:
    """``cls(**kwargs)``, collecting every value its checks refuse, not only the first.

    A section's checks stop at the first problem; the field a message names is put back to its
    default and the section built again, until it builds or a message names no field given.
    """
    remaining = dict(kwargs)
    while True:
        try:
            built = cls(**remaining)
        except ConfigError as err:
            problems.append(str(err))
            match = _FIELD.match(str(err))
            if match is None or match.group(1) not in remaining:
                return None  # type: ignore[return-value]
            del remaining[match.group(1)]
            continue
        return None if len(remaining) < len(kwargs) else built  # type: ignore[return-value]


def from_dict(cls: type[T], data: dict | None, where: str = "") -> T:
    """Build ``cls`` from a plain mapping, or raise one ConfigError listing every problem."""
    problems: list[str] = []
    prefix = f"{where}." if where else ""
    result = _build(cls, data or {}, prefix, problems)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return result


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"agent.temperature=0.7"`` -> (["agent", "temperature"], 0.7); the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value (e.g. agent.temperature=0.7), got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({err})") from None
    return key.strip().split("."), value


def merge_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``--set`` items to a nested mapping (a copy)."""
    merged = _deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = merged
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return merged


def _deepcopy(data: dict) -> dict:
    return {k: _deepcopy(v) if isinstance(v, dict) else v for k, v in data.items()}


def read_yaml(path: str | Path) -> dict:
    """A YAML file as a mapping, with a clear error for a missing or malformed file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top, got {type(data).__name__}")
    return data


def to_dict(config: Any) -> dict:
    """Plain mapping of a config (for manifests, Ray ``train_loop_config``, YAML)."""
    return dataclasses.asdict(config)
