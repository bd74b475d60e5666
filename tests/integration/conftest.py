"""Session-wide resources of the integration tests: one local Ray, one real vLLM CPU engine."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from helpers import SHARED_MACHINE_ENV  # tests/helpers.py

from nat_ray.config import EngineConfig

# Logical CPUs of the session's Ray: a few more than a small machine's cores, so that Serve's
# replicas, a rollout's engine and tool actors, and training's workers all fit.
RAY_NUM_CPUS = 8
HOTLOAD_BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "hotload.py"


@pytest.fixture(scope="session")
def _ray_session():
    """Ray's settings for the session (``SHARED_MACHINE_ENV``, read by the raylet), and its shutdown."""
    import ray

    with pytest.MonkeyPatch.context() as mp:
        for key, value in SHARED_MACHINE_ENV.items():
            mp.setenv(key, value)
        yield
        ray.shutdown()


@pytest.fixture(scope="module")
def local_ray(_ray_session):
    """The session's one local Ray: started on first use, shut down when the session ends.

    Tests and the stages they run share it (a stage's ``init_ray`` joins a Ray that is already
    up), so a test never calls ``ray.shutdown()`` itself. Module-scoped only so that a module
    which did shut it down (or never used this fixture) does not leave the next one without Ray.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=RAY_NUM_CPUS, include_dashboard=False, log_to_driver=False)
    return ray


@pytest.fixture(scope="module")
def hot_adapter(tmp_path_factory, embedded_path) -> Path:
    """A tiny peft LoRA of the embedded model with random B, so greedy answers change (made as the
    hot-load benchmark makes its adapters, ``benchmarks/hotload.py``)."""
    spec = importlib.util.spec_from_file_location("bench_hotload", HOTLOAD_BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.make_adapter(embedded_path, tmp_path_factory.mktemp("adapters") / "A")


@pytest.fixture(scope="module")
def vllm_engine(embedded_path):
    """An in-process vLLM engine, one per module.

    Not per session: closing an in-process vLLM engine tears down vLLM's process-wide distributed
    state, so a module that builds and closes its own in-process engine (``nat-ray agent`` and
    ``nat-ray eval`` run in the test process) would leave a session-wide one unable to step.
    """
    from nat_ray.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(
        EngineConfig(model=embedded_path, max_model_len=2048, kv_cache_gb=1.0, max_num_seqs=32)
    )
    yield engine
    engine.close()
