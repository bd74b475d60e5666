"""The pure parts of issue #18's fault handling: rollout's dedupe of retried rows, training's failure settings."""

from __future__ import annotations

import pytest

from nat_ray.config import TrainConfig
from nat_ray.core import nat_data as columns
from nat_ray.errors import ConfigError
from nat_ray.rollout.run import unseen_rows
from nat_ray.train.run import RESUMABLE_CHANGES


def _rows(*ids: str) -> list[dict]:
    return [{columns.TRAJECTORY_ID: tid, "answer": tid.upper()} for tid in ids]


def test_a_retried_batch_writes_only_the_trajectories_not_yet_received():
    seen: set[str] = set()
    assert unseen_rows(_rows("a", "b"), seen) == _rows("a", "b")
    # The batch's retry on a restarted actor streams a and b again, then c.
    assert unseen_rows(_rows("b", "a", "c"), seen) == _rows("c")
    assert unseen_rows(_rows("c", "c"), seen) == []
    assert seen == {"a", "b", "c"}


def test_a_repeat_inside_one_block_is_written_once():
    assert unseen_rows(_rows("x", "x", "y"), set()) == _rows("x", "y")


def test_max_failures_and_placement_are_checked_and_a_resume_may_change_them():
    assert TrainConfig().max_failures == 2 and TrainConfig().placement_strategy == "PACK"
    assert TrainConfig(max_failures=-1).max_failures == -1
    with pytest.raises(ConfigError, match="max_failures"):
        TrainConfig(max_failures=-2)
    with pytest.raises(ConfigError, match="placement_strategy"):
        TrainConfig(placement_strategy="STRICT_SPREAD")
    assert {"max_failures", "placement_strategy"} <= set(RESUMABLE_CHANGES)
