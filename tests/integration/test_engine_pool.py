"""The closed loop's rollout engines (issue 17): rounds on one engine actor, the second with an adapter
hot-loaded into the running engine, the third back on the base model.

The adapter is the integration conftest's ``hot_adapter`` (random B, so greedy answers change). (The
running server's side, an adapter published into ``serve.lora_dir`` after it started, is tested in
``test_serve.py`` on that module's server.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nat_ray.config import NatRayConfig, from_dict
from nat_ray.core import nat_data as columns
from nat_ray.core import records
from nat_ray.paths import PARTS_DIR

pytestmark = pytest.mark.integration


def _config(out: Path, embedded_path: str) -> NatRayConfig:
    return from_dict(
        NatRayConfig,
        {
            # max_lora_rank: hot_adapter's (on CPU every LoRA token costs in proportion to it).
            "engine": {
                "model": embedded_path,
                "max_model_len": 1024,
                "kv_cache_gb": 1,
                "max_num_seqs": 8,
                "max_lora_rank": 8,
            },
            "agent": {"max_turns": 2, "max_new_tokens": 32},
            "rollout": {
                "output_dir": str(out),
                "tasks": ["gsm8k"],
                "limit": 3,
                "temperatures": [0.0],
                "batch_size": 2,
                "max_in_flight": 4,
                "num_engines": 1,
                "tool_actors": False,
            },
        },
    )


def test_the_next_round_loads_its_adapter_into_the_running_engine(
    tmp_path, embedded_path, local_ray, hot_adapter
):
    import ray

    from nat_ray.rollout.engine_pool import rollout_with_pool, start_pool

    adapter = hot_adapter

    pool = start_pool(_config(tmp_path / "round-0", embedded_path))
    try:
        pid = ray.get(pool.actors[0].ready.remote())
        first = rollout_with_pool(_config(tmp_path / "round-0", embedded_path), pool, None, progress=False)
        second = rollout_with_pool(
            _config(tmp_path / "round-1", embedded_path), pool, str(adapter), progress=False
        )
        assert ray.get(pool.actors[0].ready.remote()) == pid  # the same engine process served both rounds
        again = rollout_with_pool(
            _config(tmp_path / "round-1", embedded_path), pool, str(adapter), progress=False
        )
        plain = rollout_with_pool(_config(tmp_path / "round-2", embedded_path), pool, None, progress=False)
        assert ray.get(pool.actors[0].ready.remote()) == pid
    finally:
        pool.close()
    assert first.generated == second.generated == plain.generated == 3
    assert again.skipped == 3  # resumes as run_rollout does
    base = {r[columns.QUESTION_ID]: r for r in records.read_rows(tmp_path / "round-0" / PARTS_DIR)}
    tuned = {r[columns.QUESTION_ID]: r for r in records.read_rows(tmp_path / "round-1" / PARTS_DIR)}
    assert set(base) == set(tuned)
    assert all(r[columns.MODEL].endswith(f"+lora:{adapter.resolve()}") for r in tuned.values())
    assert not set(r[columns.TRAJECTORY_ID] for r in base.values()) & set(
        r[columns.TRAJECTORY_ID] for r in tuned.values()
    )
    # greedy decoding: only the adapter can make a round-1 trajectory differ from round 0's
    assert any(base[q][columns.TRAJECTORY] != tuned[q][columns.TRAJECTORY] for q in base)
    # and back to the base model in the same engine
    back = records.read_rows(tmp_path / "round-2" / PARTS_DIR)
    assert {r[columns.MODEL] for r in back} == {r[columns.MODEL] for r in base.values()}
