"""Inference engines behind :class:`nat_ray.react.ChatEngine`. Heavy imports happen on build, not import."""

from __future__ import annotations

from nat_ray.config import EngineConfig
from nat_ray.errors import ConfigError


def build_engine(config: EngineConfig):
    """The engine a config names: in-process vLLM (default) or an OpenAI-compatible server."""
    if config.backend == "vllm":
        from nat_ray.engines.vllm_engine import VLLMEngine

        return VLLMEngine(config)
    raise ConfigError(f"engine.backend={config.backend!r} is not available yet; use 'vllm'")
