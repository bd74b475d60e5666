"""Streamed data preparation on real local Ray: the same stats and rows as the in-memory path."""

from __future__ import annotations

from dataclasses import replace

import pytest
from rows import math_row  # tests/rows.py

from nat_ray.config import TrainConfig
from nat_ray.core import nat_data, records

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> TrainConfig:
    """300 trajectories in two files; every 7th unfinished, so the drop filter has work."""
    data = tmp_path_factory.mktemp("data")
    rows = [math_row(i, c) for i in range(150) for c in (True, False)]
    for row in rows[::7]:
        row[nat_data.FINISHED] = False
    records.write_rows(rows[:120], data / "part-0.parquet")
    records.write_rows(rows[120:], data / "part-1.parquet")
    return TrainConfig(
        data=[str(data)],
        variant="nat",
        max_length=1024,
        packing=True,
        num_positives=100,
        num_negatives=110,
        drop_unfinished_negatives=True,
        global_batch_size=4,
        micro_batch_size=1,
        num_workers=2,
    )


@pytest.mark.parametrize("driver_max_rows", [0, 5000], ids=["ray-data", "in-driver"])
def test_streamed_rows_and_stats_match_the_in_memory_path(local_ray, cfg, embedded_path, driver_max_rows):
    import ray

    from nat_ray.train import data
    from nat_ray.train.prepare import prepare_data, rank_dataset

    ray.data.DataContext.get_current().enable_progress_bars = False
    prepared = prepare_data(cfg, embedded_path, driver_max_rows=driver_max_rows)
    examples, selection = data.select_examples(cfg, data.read_trajectories(cfg.data))
    rows, stats = data.prepare_rows(cfg, examples, selection, embedded_path)
    assert prepared.stats == stats
    assert stats["selection_dropped"] == {"unfinished": 21} and stats["examples"] == 210
    schedule = data.make_schedule(prepared.num_rows, cfg)
    for rank in range(cfg.num_workers):
        stream = schedule.rank_stream(rank, cfg.seed)
        # Fewer examples than one chunk: packed exactly as the in-memory path packs them.
        assert rank_dataset(prepared, stream).take_all() == data.rank_table(rows, stream).to_pylist()


def test_unpacked_rows_are_deterministic_across_preparations(local_ray, cfg, embedded_path):
    """Ray Data's shuffle and the driver's grouping give the same rows (and so does a repeat)."""
    from nat_ray.train.data import make_schedule
    from nat_ray.train.prepare import prepare_data, rank_dataset

    cfg = replace(cfg, packing=False, max_length=150, num_positives=None, num_negatives=None)
    first, second = prepare_data(cfg, embedded_path, driver_max_rows=0), prepare_data(cfg, embedded_path)
    assert first.stats == second.stats and first.stats["dropped_no_loss"] > 0
    stream = make_schedule(first.num_rows, cfg).rank_stream(1, 3)
    assert rank_dataset(first, stream).take_all() == rank_dataset(second, stream).take_all()
