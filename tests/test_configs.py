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


CHAINING = ("default.yaml", "eval.yaml", "loop.yaml", "rollout.yaml", "train.yaml", "train_lora.yaml")


@pytest.mark.parametrize("name", CHAINING)
def test_the_quick_configs_run_on_a_fresh_clone(name, tmp_path, monkeypatch):
    """No full data, nothing imported: every file and task split these configs read is shipped."""
    from nat_ray.tasks import get_task

    monkeypatch.setenv("NAT_RAY_DATA_DIR", str(tmp_path / "no-full-data"))
    monkeypatch.chdir(CONFIGS[0].parent.parent)
    cfg = load_config(NatRayConfig, CONFIGS[0].parent / name)
    if name.startswith("train"):
        assert all(Path(p).exists() for p in cfg.train.data), cfg.train.data
    sections = {"eval": (cfg.eval.tasks, cfg.eval.split), "rollout": (cfg.rollout.tasks, cfg.rollout.split)}
    used = {"eval.yaml": ["eval"], "rollout.yaml": ["rollout"]}.get(name, ["eval", "rollout"])
    for section in used:
        tasks, split = sections[section]
        for task in tasks:
            assert get_task(task).files(split), (section, task)
    for extra in cfg.pipeline.extra_trajectories + ([cfg.loop.round0] if cfg.loop.round0 != "base" else []):
        assert Path(extra).exists(), extra
