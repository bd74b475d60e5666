"""The adapter rules of ``serve.lora_dir``: which names a request may use, and which folders are adapters."""

from __future__ import annotations

import json

import pytest

from nat_ray.config import NatRayConfig, ServeConfig, from_dict
from nat_ray.errors import ConfigError
from nat_ray.serve.adapters import (
    ModelProblem,
    ModelRef,
    is_remote,
    local_adapter_dir,
    local_adapters,
    name_problem,
    parse_model,
)
from nat_ray.serve.api import AgentRequest

BASE = "smol"
STATIC = frozenset({"smol", "smol-lora"})


def _adapter(folder) -> None:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8}))


@pytest.mark.parametrize("name", ["A", "round-1", "r_2.v3", "0"])
def test_plain_names_pass(name):
    assert name_problem(name) is None
    assert parse_model(f"{BASE}:{name}", BASE, STATIC, dynamic=True) == ModelRef(f"{BASE}:{name}", name)


@pytest.mark.parametrize(
    "name", ["../x", "..", "a/b", "a\\b", "/etc", ".hidden", "", "a b", "a:b", "é", "x" * 129, "a..b"]
)
def test_names_that_could_leave_lora_dir_or_are_not_plain_are_400(name):
    assert name_problem(name) is not None
    with pytest.raises(ModelProblem) as err:
        parse_model(f"{BASE}:{name}", BASE, STATIC, dynamic=True)
    assert err.value.status == 400 and "adapter name" in str(err.value)


def test_static_ids_and_unknown_models():
    assert parse_model("smol-lora", BASE, STATIC, dynamic=False) == ModelRef("smol-lora")
    with pytest.raises(ModelProblem) as err:
        parse_model("other", BASE, STATIC, dynamic=True)
    assert err.value.status == 404 and "'other'" in str(err.value) and "smol:<adapter>" in str(err.value)
    with pytest.raises(ModelProblem) as err:  # a path as the model is refused as such, not looked up
        parse_model("../../etc/passwd", BASE, STATIC, dynamic=True)
    assert err.value.status == 400
    with pytest.raises(ModelProblem) as err:  # without lora_dir no adapter is served
        parse_model("smol:A", BASE, STATIC, dynamic=False)
    assert err.value.status == 404 and "serve.lora_dir" in str(err.value)


def test_adapters_are_the_folders_with_a_peft_config_now(tmp_path):
    assert local_adapters(str(tmp_path / "not-yet")) == []
    _adapter(tmp_path / "A")
    _adapter(tmp_path / ".B.tmp")  # being published: not served until renamed
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    assert local_adapters(str(tmp_path)) == ["A"]
    assert local_adapter_dir(str(tmp_path), "A") == tmp_path / "A"
    assert local_adapter_dir(str(tmp_path), "empty") is None
    assert local_adapter_dir(str(tmp_path), "missing") is None
    _adapter(tmp_path.parent / f"{tmp_path.name}-outside")
    assert local_adapter_dir(str(tmp_path), f"../{tmp_path.name}-outside") is None  # never joined
    _adapter(tmp_path / "C")  # published later: seen on the next look
    assert local_adapters(str(tmp_path)) == ["A", "C"]


def test_remote_prefixes():
    assert is_remote("s3://bucket/adapters") and is_remote("gs://b/a")
    assert not is_remote("/data/adapters") and not is_remote("runs/x/adapters")


def test_serve_config_fields():
    cfg = from_dict(NatRayConfig, {"serve": {"lora_dir": "/tmp/adapters", "lora_max_adapters": 2}})
    assert cfg.serve.lora_dir == "/tmp/adapters" and cfg.serve.lora_max_adapters == 2
    assert ServeConfig().lora_dir is None
    with pytest.raises(ConfigError, match="lora_max_adapters"):
        ServeConfig(lora_max_adapters=0)


def test_agent_request_takes_a_model():
    req = AgentRequest.model_validate_json('{"task": "gsm8k", "question": "1+1?", "model": "smol:A"}')
    assert req.model == "smol:A"
    assert AgentRequest.model_validate_json('{"task": "gsm8k", "question": "1+1?"}').model is None


def test_lora_dir_is_resolved_and_created(tmp_path):
    from nat_ray.serve.app import llm_config, lora_bind_kwargs, with_lora_dir_resolved

    cfg = from_dict(NatRayConfig, {"serve": {"lora_dir": str(tmp_path / "new" / "adapters")}})
    resolved = with_lora_dir_resolved(cfg, "smol")
    assert (tmp_path / "new" / "adapters").is_dir() and resolved.serve.lora_dir.startswith("/")
    with pytest.raises(ConfigError, match="must not hold ':'"):
        with_lora_dir_resolved(cfg, "org:model")
    loader = lora_bind_kwargs(resolved)["model_downloader"]
    assert loader.keywords == {"lora_dir": resolved.serve.lora_dir}
    assert lora_bind_kwargs(from_dict(NatRayConfig, {})) == {}
    llm = llm_config(resolved, "/models/smol", "smol")
    assert llm.lora_config.max_num_adapters_per_replica == 4
    assert llm.lora_config.dynamic_lora_loading_path is None and llm.engine_kwargs["enable_lora"]
    remote = from_dict(NatRayConfig, {"serve": {"lora_dir": "s3://bucket/adapters/"}})
    remote = with_lora_dir_resolved(remote, "smol")
    assert lora_bind_kwargs(remote) == {}
    assert (
        llm_config(remote, "/models/smol", "smol").lora_config.dynamic_lora_loading_path
        == "s3://bucket/adapters"
    )


def test_a_name_is_published_once_whole_and_sealed_and_never_reused_for_other_weights(tmp_path):
    from nat_ray import safe_files
    from nat_ray.serve.adapters import AdapterExists, publish_adapter

    src = tmp_path / "trained"
    _adapter(src)
    (src / "adapter_model.safetensors").write_bytes(b"v1")
    lora_dir = tmp_path / "lora"
    assert publish_adapter(src, lora_dir, "round-1") == f"{lora_dir}/round-1"
    assert local_adapters(str(lora_dir)) == ["round-1"]
    assert safe_files.check_dir(lora_dir / "round-1", require_checksum=True) == []
    assert publish_adapter(src, lora_dir, "round-1") == f"{lora_dir}/round-1"  # the same weights: a no-op
    (src / "adapter_model.safetensors").write_bytes(b"v2")
    with pytest.raises(AdapterExists, match="already holds other weights; publish them under a new name"):
        publish_adapter(src, lora_dir, "round-1")
    assert (lora_dir / "round-1" / "adapter_model.safetensors").read_bytes() == b"v1"
    publish_adapter(src, lora_dir, "round-2")
    assert sorted(p.name for p in lora_dir.iterdir()) == ["round-1", "round-2"]  # no staging folders left
    with pytest.raises(ValueError, match="must not hold"):
        publish_adapter(src, lora_dir, "../x")
    with pytest.raises(ValueError, match="not a peft adapter"):
        publish_adapter(tmp_path / "lora", lora_dir, "x")
