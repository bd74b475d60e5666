"""One real vLLM CPU engine on the embedded model, shared by the integration tests of a session."""

from __future__ import annotations

import pytest

from nat_ray.config import EngineConfig


@pytest.fixture(scope="session")
def vllm_engine(embedded_path):
    from nat_ray.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(
        EngineConfig(model=embedded_path, max_model_len=2048, kv_cache_gb=1.0, max_num_seqs=32)
    )
    yield engine
    engine.close()
