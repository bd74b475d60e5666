"""The vLLM engine arguments a config asks for: one builder for rollout, evaluation and serving.

The in-process engine (:class:`nat_ray.engines.vllm_engine.VLLMEngine`) and the served one
(``ray.serve.llm``'s ``LLMConfig``) must run the same engine, so both take their keyword
arguments and environment from here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from nat_ray.config import EngineConfig
from nat_ray.hardware import cpu_reserved_cores, cuda_available

# vLLM engine arguments for its CPU build:
# - prefix caching reuses only whole KV blocks, and the CPU default of 128 tokens a block makes
#   every agent turn prefill again up to 127 tokens of its own conversation; 32 is the smallest
#   size the CPU backend runs well (benchmarks/rollout.py measures the agent loop);
# - the CPU build kills its engine when a seeded request shares a step with a chunked prefill
#   ("CPU Generator does not use offset"), and every agent turn is seeded.
CPU_ENGINE_DEFAULTS = {"block_size": 32, "enable_chunked_prefill": False}

# On CPU, vLLM by default runs its model in a worker process of its own and keeps one core for the
# engine-core (scheduler) process, so on a small machine the model computes on too few threads.
# With this, ``vllm.LLM`` runs its engine core and model in the caller. (ray.serve.llm asks for the
# multiprocess executor on CPU; the served engine gets VLLM_CPU_NUM_OF_RESERVED_CPU instead.)
CPU_IN_PROCESS_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}

# The ``max_lora_rank`` values vLLM accepts.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

log = logging.getLogger(__name__)


def on_gpu(config: EngineConfig) -> bool:
    """Whether this engine config resolves to CUDA on this machine."""
    return config.device == "cuda" or (config.device == "auto" and cuda_available())


def engine_kwargs(config: EngineConfig, gpu: bool, lora: bool = False) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` / ``LLMConfig.engine_kwargs`` (without the model).

    Args:
        config: the ``engine`` section.
        gpu: whether the engine runs on CUDA (see :func:`on_gpu`).
        lora: enable LoRA even when ``engine.lora`` is off (an adapter is served or evaluated).
    """
    kwargs: dict[str, Any] = {
        "dtype": config.dtype if config.dtype != "auto" else ("bfloat16" if gpu else "float32"),
        "max_model_len": config.max_model_len,
        "enforce_eager": (not gpu) if config.enforce_eager is None else config.enforce_eager,
        "enable_prefix_caching": config.enable_prefix_caching,
        "seed": config.seed,
        "max_num_seqs": config.max_num_seqs,
        "tensor_parallel_size": config.tensor_parallel_size,
    }
    if gpu:
        kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
    else:
        kwargs.update(CPU_ENGINE_DEFAULTS)
    if lora or config.lora:
        kwargs.update(enable_lora=True, max_lora_rank=config.max_lora_rank)
    kwargs.update(config.extra)
    return kwargs


def kv_cache_env(config: EngineConfig) -> dict[str, str]:
    """The CPU build's KV cache size (it reads a variable, not an engine argument)."""
    return {"VLLM_CPU_KVCACHE_SPACE": str(max(1, round(config.kv_cache_gb)))}


def served_cpu_env(config: EngineConfig, reserved_cores: int | None) -> dict[str, str]:
    """Environment of a CPU engine in vLLM's multiprocess mode (the one ray.serve.llm starts).

    Args:
        reserved_cores: cores left to the scheduler process; None: :func:`cpu_reserved_cores`.
    """
    reserved = cpu_reserved_cores() if reserved_cores is None else reserved_cores
    return {**kv_cache_env(config), "VLLM_CPU_NUM_OF_RESERVED_CPU": str(reserved)}


def adapter_rank(path: str | Path) -> int | None:
    """A peft adapter's rank (``r``, or the largest of its ``rank_pattern``); None when unreadable."""
    try:
        config = json.loads((Path(path) / "adapter_config.json").read_text())
        ranks = [config.get("r") or 0, *(config.get("rank_pattern") or {}).values()]
        return int(max(ranks)) or None
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def lora_rank_advice(config: EngineConfig, gpu: bool, rank: int | None) -> str | None:
    """Why and how to lower ``engine.max_lora_rank`` for an adapter of ``rank`` on CPU, or None.

    vLLM pads every adapter to ``max_lora_rank``, and its CPU LoRA ops cost in proportion to it at
    every token (a 210-token prompt through a rank-8 adapter of the embedded model: 40.6 s at 64,
    4.2 s at 8, ``benchmarks/lora_rank.py``); on GPU the padding costs little.
    """
    if gpu or not rank:
        return None
    need = next((r for r in VLLM_LORA_RANKS if r >= rank), None)
    current = config.extra.get("max_lora_rank", config.max_lora_rank)
    if need is None or current <= need:
        return None
    return (
        f"engine.max_lora_rank={current} but the adapter has rank {rank}: vLLM pads every adapter to "
        f"max_lora_rank and on CPU each LoRA token costs in proportion (about {current // need}x here); "
        f"set engine.max_lora_rank={need} unless adapters of a larger rank will be loaded later"
    )


def warn_lora_rank(config: EngineConfig, gpu: bool, adapter: str | Path | None) -> None:
    """Log :func:`lora_rank_advice` for ``adapter`` (a local adapter folder), if any."""
    advice = lora_rank_advice(config, gpu, adapter_rank(adapter)) if adapter else None
    if advice:
        log.warning(advice)
