"""Every shipped config file loads into the typed config (unknown keys or bad values fail here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nat_ray.config import NatRayConfig, load_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"default.yaml", "paper.yaml", "rollout.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    cfg = load_config(NatRayConfig, path)
    assert isinstance(cfg, NatRayConfig)


def test_paper_config_has_the_papers_values():
    cfg = load_config(NatRayConfig, Path(CONFIGS[0]).parent / "paper.yaml")
    assert cfg.train.epochs == 2 and cfg.train.global_batch_size == 64 and cfg.train.learning_rate == 5e-5
    assert (
        cfg.train.zero_stage == 3 and cfg.rollout.temperatures == [0.2, 0.5, 0.7] and cfg.agent.max_turns == 7
    )
