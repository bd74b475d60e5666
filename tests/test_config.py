from __future__ import annotations

import pytest

from nat_ray.config import AgentConfig, EngineConfig, NatRayConfig, from_dict, load_config, merge_overrides
from nat_ray.errors import ConfigError


def test_defaults_then_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("agent:\n  task: svamp\n  temperature: 0.5\nengine:\n  max_model_len: 1024\n")
    cfg = load_config(NatRayConfig, path, ["agent.temperature=0.7", "engine.extra={swap_space: 1}"])
    assert cfg.agent.task == "svamp" and cfg.agent.temperature == 0.7
    assert cfg.engine.max_model_len == 1024 and cfg.engine.extra == {"swap_space": 1}
    assert cfg.agent.max_turns == AgentConfig().max_turns


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as info:
        from_dict(NatRayConfig, {"agent": {"tmperature": 1, "max_turns": "many"}, "engnie": {}})
    msg = str(info.value)
    assert "agent.tmperature: unknown key" in msg
    assert "agent.max_turns: expected int" in msg
    assert "engnie: unknown key" in msg


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"agent": {"shots": 3}}, "agent.shots"),
        ({"agent": {"top_p": 0}}, "agent.top_p"),
        ({"engine": {"backend": "tgi"}}, "engine.backend"),
        ({"engine": {"backend": "openai", "model": "m"}}, "engine.base_url"),
        ({"engine": {"backend": "openai", "base_url": "http://127.0.0.1:1/v1"}}, "engine.model"),
        ({"engine": {"max_model_len": -1}}, "engine.max_model_len"),
        ({"agent": {"max_turns": True}}, "agent.max_turns"),
        ({"train": {"objective": "ppo"}}, "train.objective"),
        ({"train": {"objective": "dpo", "dpo_beta": 0}}, "train.dpo_beta"),
        (
            {"train": {"objective": "kto", "global_batch_size": 2, "micro_batch_size": 1}},
            "train.objective=kto",
        ),  # 1 per worker
        ({"pipeline": {"variants": ["wo_neg+kto"]}}, "selects positives only"),
    ],
)
def test_bad_values_name_the_field(data, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        from_dict(NatRayConfig, data)


def test_int_accepted_for_float_and_none_for_optional():
    cfg = from_dict(NatRayConfig, {"agent": {"temperature": 1}, "engine": {"enforce_eager": None}})
    assert cfg.agent.temperature == 1.0 and isinstance(cfg.agent.temperature, float)
    assert cfg.engine.enforce_eager is None


@pytest.mark.parametrize("item", ["novalue", "=3", "a.b"])
def test_malformed_override(item):
    with pytest.raises(ConfigError, match="key=value"):
        merge_overrides({}, [item])


def test_override_into_a_value_is_an_error():
    with pytest.raises(ConfigError, match="is a value"):
        merge_overrides({"agent": 3}, ["agent.task=x"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(NatRayConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("agent: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(NatRayConfig, bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(NatRayConfig, listy)


def test_engine_config_is_frozen():
    with pytest.raises(AttributeError):
        EngineConfig().model = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    "rollout, engine, expected",
    [
        ({}, {}, "cores"),  # a CPU vLLM engine computes with the CPUs it reserves: all of them
        ({"num_engines": 2}, {}, "half"),
        ({"engine_num_gpus": 1}, {}, 1.0),  # a GPU engine needs one CPU to drive it
        ({}, {"backend": "openai", "model": "m", "base_url": "http://127.0.0.1:1/v1"}, 1.0),
        ({"engine_num_cpus": 3}, {}, 3.0),  # an explicit value always wins
    ],
)
def test_engine_actor_cpus(monkeypatch, rollout, engine, expected):
    import os

    from nat_ray.rollout.run import engine_cpus

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    cfg = from_dict(NatRayConfig, {"rollout": rollout, "engine": engine})
    want = {"cores": 8.0, "half": 4.0}.get(expected, expected)
    assert engine_cpus(cfg) == want


def test_engine_actor_cpus_must_not_be_negative():
    with pytest.raises(ConfigError, match="engine_num_cpus"):
        from_dict(NatRayConfig, {"rollout": {"engine_num_cpus": -1}})


def test_serve_reserved_cores_must_not_be_negative():
    with pytest.raises(ConfigError, match="llm_cpu_reserved_cores"):
        from_dict(NatRayConfig, {"serve": {"llm_cpu_reserved_cores": -1}})


def test_every_bad_value_is_reported_in_one_error():
    """Four out-of-range values in one section, a bad choice, a wrong type and an unknown key elsewhere:
    one run names them all (a section's own checks stop at their first problem)."""
    from nat_ray.config_loading import from_dict

    with pytest.raises(ConfigError) as err:
        from_dict(
            NatRayConfig,
            {
                "train": {"max_steps": -1, "learning_rate": -2, "zero_stage": 7, "epochs": 0},
                "agent": {"shots": 3, "temperature": "hot", "nope": 1},
                "loop": {"rounds": 0},
            },
        )
    lines = str(err.value).splitlines()[1:]
    for name in ("train.max_steps", "train.learning_rate", "train.zero_stage", "train.epochs", "agent.shots",
                 "agent.temperature", "agent.nope", "loop.rounds"):  # fmt: skip
        assert sum(line.strip().startswith(name) for line in lines) == 1, (name, lines)
    # Values that are fine together are not reported one by one.
    assert from_dict(
        NatRayConfig, {"train": {"global_batch_size": 6, "micro_batch_size": 3, "num_workers": 2}}
    )
