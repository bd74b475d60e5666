"""Inference engines behind :class:`nat_ray.core.react.ChatEngine`. Heavy imports happen on build, not import."""

from __future__ import annotations

from nat_ray.config import EngineConfig
from nat_ray.errors import ConfigError


def build_engine(config: EngineConfig, lora_path: str | None = None):
    """The engine a config names: in-process vLLM (default), an OpenAI-compatible server, or HF.

    Args:
        lora_path: a peft adapter that every generation goes through (vLLM only).

    Raises:
        ConfigError: an unknown backend, or an adapter for a backend that cannot load one.
    """
    if lora_path is not None and config.backend != "vllm":
        raise ConfigError(f"a LoRA adapter needs engine.backend='vllm', got {config.backend!r}")
    if config.backend == "vllm":
        from nat_ray.engines.vllm_engine import VLLMEngine

        return VLLMEngine(config, lora_path)
    if config.backend == "openai":
        from nat_ray.engines.openai_engine import OpenAIEngine

        return OpenAIEngine(config)
    if config.backend == "hf":
        from nat_ray.engines.hf_engine import HFEngine

        return HFEngine(config)
    raise ConfigError(f"unknown engine.backend {config.backend!r}")
