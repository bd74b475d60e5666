"""Which adapter a request's ``model`` names, and whether it may be loaded: the rules, without Ray.

With ``serve.lora_dir`` (a folder, or a bucket prefix such as ``s3://bucket/adapters`` where replicas
run on several nodes: :mod:`nat_ray.core.storage`) every sub-folder holding a peft
``adapter_config.json`` is served as ``<model_id>:<folder>``, including folders that appear after the
server started. The
model string comes from the client, so it must never steer a file read outside ``lora_dir``: an
adapter name is one plain path component (letters, digits, ``.``, ``_``, ``-``; no ``..``, no
leading dot), checked before anything looks at the disk. A leading dot is refused as well so that
a publisher can copy into ``.name.tmp`` and rename it into place: a half-written folder is never
served (in object storage, where there is no rename, ``adapter_config.json`` is written last).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from nat_ray import safe_files
from nat_ray.core.agent_card import CARD_FILE, AgentCard, parse_card
from nat_ray.core.storage import Store, is_uri

ADAPTER_CONFIG = "adapter_config.json"  # what makes a folder a peft adapter
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_NAME_CHARS = 128


@dataclass(frozen=True)
class ModelRef:
    """A served model a request named: the base model (``adapter`` None) or one of its adapters."""

    model: str
    adapter: str | None = None


class ModelProblem(ValueError):
    """A request's ``model`` is refused: ``status`` 400 (not a plain name) or 404 (not served)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def name_problem(name: str) -> str | None:
    """Why ``name`` is not a plain adapter name, or None when it is one."""
    if "/" in name or "\\" in name or ".." in name:
        return f"adapter name {name!r} must not hold '/', '\\\\' or '..'"
    if len(name) > MAX_NAME_CHARS or not NAME.fullmatch(name):
        return (
            f"adapter name {name!r} must be 1 to {MAX_NAME_CHARS} of A-Z a-z 0-9 . _ - "
            "and start with a letter or digit"
        )
    return None


def parse_model(model: str, base_id: str, static_ids: set[str] | frozenset[str], dynamic: bool) -> ModelRef:
    """The served model ``model`` names, checked by name only (nothing is read).

    Args:
        model: the request's ``model``.
        base_id: the base model's id (``serve.model_id`` or derived).
        static_ids: ids served without lookup (the base, a ``serve.lora`` adapter).
        dynamic: whether ``serve.lora_dir`` is set.

    Raises:
        ModelProblem: 400 for a name that is not plain, 404 for a model not served here.
    """
    if model in static_ids:
        return ModelRef(model)
    prefix = f"{base_id}:"
    if model.startswith(prefix):
        adapter = model[len(prefix) :]
        problem = name_problem(adapter)
        if problem is not None:
            raise ModelProblem(400, f"model: {problem}")
        if not dynamic:
            raise ModelProblem(404, f"model: {model!r} is not served here (no serve.lora_dir is set)")
        return ModelRef(model, adapter)
    if "/" in model or "\\" in model or ".." in model:
        raise ModelProblem(400, f"model: {model!r} must not hold '/', '\\\\' or '..'")
    served = sorted(static_ids) + ([f"{base_id}:<adapter>"] if dynamic else [])
    raise ModelProblem(404, f"model: {model!r} is not served here; served models: {served}")


def has_adapter(lora_dir: str, name: str) -> bool:
    """Whether ``lora_dir/name`` holds a peft adapter now (``name`` must already be plain)."""
    if name_problem(name) is not None:  # never join an unchecked name onto a path
        return False
    return Store(lora_dir).is_file(f"{name}/{ADAPTER_CONFIG}")


def adapter_names(lora_dir: str) -> list[str]:
    """Names of the adapters in ``lora_dir`` now (sorted; empty when it does not exist yet)."""
    store = Store(lora_dir)
    return [n for n in store.dirs() if name_problem(n) is None and store.is_file(f"{n}/{ADAPTER_CONFIG}")]


def adapter_card(lora_dir: str, name: str) -> AgentCard | None:
    """The agent card published with adapter ``name`` (None without one).

    Raises:
        ConfigError: the card is there but is not a card.
    """
    store = Store(lora_dir)
    if name_problem(name) is not None or not store.is_file(f"{name}/{CARD_FILE}"):
        return None
    return parse_card(store.read_text(f"{name}/{CARD_FILE}"), store.uri(f"{name}/{CARD_FILE}"))


def adapter_missing(model: str, name: str, lora_dir: str) -> ModelProblem:
    """The 404 for an adapter name that is plain but has no folder in ``lora_dir``."""
    return ModelProblem(
        404, f"model: adapter {name!r} ({model!r}) is not in serve.lora_dir (no {name}/{ADAPTER_CONFIG})"
    )


class AdapterExists(ValueError):
    """Other weights are already published under the name: a server that loaded those would keep
    answering with them (vLLM caches an adapter by name), so a name is never reused for new weights."""


def adapter_digest(folder: str) -> str | None:
    """sha256 over an adapter folder's files (relative names and contents; its ``CHECKSUMS.sha256`` left
    out), a folder here or a URI; None when it holds no adapter (an upload that stopped half-way
    included: it never wrote ``adapter_config.json``)."""
    import hashlib

    store = Store(folder)
    if not store.is_file(ADAPTER_CONFIG):
        return None
    digest = hashlib.sha256()
    for rel in store.files(recursive=True):
        if rel != safe_files.DIR_CHECKSUMS:
            digest.update(rel.encode() + b"\0" + hashlib.sha256(store.read_bytes(rel)).digest())
    return digest.hexdigest()


def publish_adapter(source: str | os.PathLike, lora_dir: str | os.PathLike, name: str) -> str:
    """Publish the peft adapter folder ``source`` as ``<lora_dir>/<name>`` (a folder, or a URI pyarrow
    reaches, e.g. ``s3://bucket/adapters``), where a running server with ``serve.lora_dir`` finds it.

    A local copy goes to a hidden folder first and is renamed into place, sealed with
    ``CHECKSUMS.sha256``, so a request never sees half an adapter. A name is published once: the same
    weights again (a resumed loop) are a no-op; other weights under a name already taken are refused,
    since a replica that loaded the old ones would go on answering with them. Version the names
    (``NAME-round-3``).

    Returns:
        the published folder.

    Raises:
        ValueError: ``name`` is not a plain name, or ``source`` is not a peft adapter folder.
        AdapterExists: other weights are already published under ``name``.
    """
    problem = name_problem(name)
    if problem is not None:
        raise ValueError(problem)
    src = Path(source)
    if not (src / ADAPTER_CONFIG).is_file():
        raise ValueError(f"{src} is not a peft adapter folder (no {ADAPTER_CONFIG})")
    target = f"{str(lora_dir).rstrip('/')}/{name}"
    published = adapter_digest(target)
    if published is not None:
        if published == adapter_digest(str(src)):
            return target
        raise AdapterExists(
            f"{target} already holds other weights; publish them under a new name (e.g. {name}-2 or "
            "NAME-round-<r>): a server that loaded the old adapter would keep answering with it"
        )
    if is_uri(target):
        _upload(src, Store(str(lora_dir)), name)
        return target
    with safe_files.staged_dir(target) as staging:
        shutil.copytree(src, staging, ignore=shutil.ignore_patterns(safe_files.DIR_CHECKSUMS))
        safe_files.seal_dir(staging)
    return target


def _upload(src: Path, store: Store, name: str) -> None:
    """Copy an adapter folder into object storage file by file, ``adapter_config.json`` last: a folder
    is an adapter only once that file exists, so a request never loads half of one."""
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.name != safe_files.DIR_CHECKSUMS)
    files.sort(key=lambda p: p.relative_to(src).as_posix() == ADAPTER_CONFIG)
    for path in files:
        store.write_bytes(f"{name}/{path.relative_to(src).as_posix()}", path.read_bytes())
