"""Hot-loading adapters (issue 17): a running rollout engine switches to an adapter without a new engine.

The adapter is the integration conftest's ``hot_adapter`` (random B, so greedy answers change). (The
running server's side, an adapter published into ``serve.lora_dir`` after it started, is tested in
``test_serve.py`` on that module's server.)
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration

TIMEOUT_S = 300
QUESTION = [{"role": "user", "content": "What is 12 times 3? Answer with a number."}]


def test_a_running_rollout_engine_switches_to_an_adapter_without_a_new_engine(
    local_ray, embedded_path, hot_adapter
):
    # In a process of its own (a Ray task whose worker exits after it): closing an in-process vLLM
    # engine tears down vLLM's process-wide state, which the session's shared engine still uses.
    # Defined here so that it is pickled by value: Ray's workers cannot import this test module.
    def _switch_adapter(model_path: str, adapter: str) -> dict:
        from nat_ray.config import EngineConfig
        from nat_ray.core.react import Sampling
        from nat_ray.engines.vllm_engine import VLLMEngine

        engine = VLLMEngine(EngineConfig(model=model_path, max_model_len=1024, kv_cache_gb=1, lora=True))
        try:
            llm = engine.llm
            greedy = [Sampling(temperature=0.0, max_tokens=16, seed=0)]
            base = engine.generate([QUESTION], greedy)[0]
            engine.load_adapter(adapter)
            tuned = engine.generate([QUESTION], greedy)[0]
            same_engine = engine.llm is llm
            engine.load_adapter(None)  # and back to the base model
            return {
                "base": base.text,
                "tuned": tuned.text,
                "tuned_tokens": tuned.completion_tokens,
                "same_engine": same_engine,
                "back_to_base": engine.lora_request is None,
            }
        finally:
            engine.close()

    run = local_ray.remote(num_cpus=1, max_calls=1)(_switch_adapter)
    got = local_ray.get(run.remote(embedded_path, str(hot_adapter)), timeout=TIMEOUT_S)
    assert got["same_engine"]  # the same vLLM engine, not a new one
    assert got["tuned_tokens"] > 0 and got["tuned"] != got["base"]
    assert got["back_to_base"]
