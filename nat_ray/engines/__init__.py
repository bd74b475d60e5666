"""Inference engines behind :class:`nat_ray.react.ChatEngine`. Heavy imports happen on build, not import."""

from __future__ import annotations

from nat_ray.config import EngineConfig
from nat_ray.errors import ConfigError


def build_engine(config: EngineConfig):
    """The engine a config names: in-process vLLM (default), an OpenAI-compatible server, or HF."""
    if config.backend == "vllm":
        from nat_ray.engines.vllm_engine import VLLMEngine

        return VLLMEngine(config)
    if config.backend == "openai":
        from nat_ray.engines.openai_engine import OpenAIEngine

        return OpenAIEngine(config)
    if config.backend == "hf":
        from nat_ray.engines.hf_engine import HFEngine

        return HFEngine(config)
    raise ConfigError(f"unknown engine.backend {config.backend!r}")
