"""The rollout driver's Parquet parts: written by count and by age, nothing kept back at the end."""

from __future__ import annotations

import pytest
from rows import math_row  # tests/rows.py

from nat_ray.config import NatRayConfig, from_dict
from nat_ray.core import nat_data as columns
from nat_ray.core import records
from nat_ray.errors import ConfigError
from nat_ray.rollout.run import PartWriter


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _parts(folder):
    return sorted(folder.glob("*.parquet"))


def _ids(folder) -> list[str]:
    return sorted(r[columns.TRAJECTORY_ID] for r in records.read_rows(folder))


def test_a_part_per_flush_rows_and_the_rest_on_flush(tmp_path):
    writer = PartWriter(tmp_path, max_rows=3, max_seconds=1e9, clock=_Clock())
    writer.add([math_row(0, True), math_row(1, True)])
    assert _parts(tmp_path) == []  # two rows wait for a third
    writer.add([math_row(2, True)])
    assert len(_parts(tmp_path)) == 1 and writer.pending == []
    writer.add([math_row(3, True)])
    writer.flush()
    writer.flush()  # nothing pending: no empty part
    assert len(_parts(tmp_path)) == 2
    assert _ids(tmp_path) == ["t0-True", "t1-True", "t2-True", "t3-True"]


def test_an_old_row_is_written_when_the_next_one_arrives(tmp_path):
    clock = _Clock()
    writer = PartWriter(tmp_path, max_rows=100, max_seconds=30, clock=clock)
    writer.add([math_row(0, True)])
    clock.now = 29.0
    writer.add([math_row(1, True)])
    assert _parts(tmp_path) == []
    clock.now = 30.5  # the first row has waited 30.5 s
    writer.add([math_row(2, True)])
    assert len(_parts(tmp_path)) == 1 and _ids(tmp_path) == ["t0-True", "t1-True", "t2-True"]
    clock.now = 100.0  # the age counts from the oldest row still pending, not from the start
    writer.add([math_row(3, True)])
    assert writer.pending and len(_parts(tmp_path)) == 1


@pytest.mark.parametrize("key", ["flush_rows", "flush_seconds"])
def test_flush_settings_must_be_positive(key):
    with pytest.raises(ConfigError, match=f"rollout.{key}"):
        from_dict(NatRayConfig, {"rollout": {key: 0}})


def test_streaming_settings_are_put_back():
    """The pipeline tokenizes and streams training data with Ray Data in the same process next."""
    import ray.data

    from nat_ray.rollout.run import streaming_data_context

    ctx = ray.data.DataContext.get_current()
    before = ctx.target_max_block_size
    with pytest.raises(RuntimeError), streaming_data_context() as inside:
        assert inside.target_max_block_size == 1 and not inside.execution_options.preserve_order
        raise RuntimeError("the stage failed")
    assert ctx.target_max_block_size == before
