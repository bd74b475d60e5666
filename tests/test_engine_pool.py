"""The engine pool's rules that need no engine: model names by adapter, and refusals before any actor is asked."""

from __future__ import annotations

import pytest

from nat_ray.config import NatRayConfig, from_dict
from nat_ray.errors import ConfigError, ModelError
from nat_ray.rollout.engine_pool import EnginePool, start_pool


def test_trajectories_of_an_adapter_record_a_model_of_their_own():
    pool = EnginePool(actors=[], model_path="/m/smol", engine_config={})
    assert pool.model_id("embedded") == "embedded"
    pool.adapter = "/runs/x/adapters/round-1"
    assert pool.model_id("embedded") == "embedded+lora:/runs/x/adapters/round-1"


def test_a_path_that_is_not_an_adapter_fails_in_the_driver(tmp_path):
    pool = EnginePool(actors=[], model_path="/m/smol", engine_config={})
    with pytest.raises(ModelError, match="adapter_config.json"):
        pool.load_adapter(str(tmp_path))
    assert pool.adapter is None


def test_only_vllm_engines_pool():
    cfg = from_dict(NatRayConfig, {"engine": {"backend": "hf"}})
    with pytest.raises(ConfigError, match="vLLM"):
        start_pool(cfg)
