"""The adapter rules of ``serve.lora_dir``: which names a request may use, and which folders are adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nat_ray import safe_files
from nat_ray.config import NatRayConfig, ServeConfig, from_dict
from nat_ray.core.storage import Store
from nat_ray.errors import ConfigError
from nat_ray.serve.adapters import (
    ADAPTER_CONFIG,
    ModelProblem,
    ModelRef,
    adapter_card,
    adapter_names,
    has_adapter,
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


def test_adapters_are_the_folders_with_a_peft_config_now(location):
    store = Store(location)
    assert adapter_names(f"{location}/not-yet") == []
    store.write_text(f"A/{ADAPTER_CONFIG}", "{}")
    store.write_text(f".B.tmp/{ADAPTER_CONFIG}", "{}")  # being published: not served until renamed
    store.write_text("half/adapter_model.safetensors", "x")  # an upload that stopped: no config
    store.write_text("file.txt", "x")
    assert adapter_names(location) == ["A"]
    assert has_adapter(location, "A") and not has_adapter(location, "half")
    assert not has_adapter(location, "missing")
    store.write_text(f"../{Path(location).name}-outside/{ADAPTER_CONFIG}", "{}")
    assert not has_adapter(location, f"../{Path(location).name}-outside")  # never joined
    store.write_text(f"C/{ADAPTER_CONFIG}", "{}")  # published later: seen on the next look
    assert adapter_names(location) == ["A", "C"]
    assert adapter_card(location, "A") is None
    store.write_text("C/agent_card.json", "{not json")
    with pytest.raises(ConfigError, match="not a readable agent card"):
        adapter_card(location, "C")


def test_storage_settings_reach_replicas_only_for_uris(monkeypatch):
    from nat_ray.core.storage import is_uri, storage_env

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert is_uri("s3://bucket/adapters") and is_uri("gs://b/a")
    assert not is_uri("/data/adapters") and not is_uri("runs/x/adapters")
    assert storage_env("/data/adapters", None) == {}
    assert storage_env("/data/adapters", "s3://b/capture")["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"


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


def test_lora_dir_is_resolved_and_created(tmp_path, monkeypatch):
    from nat_ray.serve.app import llm_config, lora_bind_kwargs, with_lora_dir_resolved

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    cfg = from_dict(NatRayConfig, {"serve": {"lora_dir": str(tmp_path / "new" / "adapters")}})
    resolved = with_lora_dir_resolved(cfg, "smol")
    assert (tmp_path / "new" / "adapters").is_dir() and resolved.serve.lora_dir.startswith("/")
    with pytest.raises(ConfigError, match="must not hold ':'"):
        with_lora_dir_resolved(cfg, "org:model")
    loader = lora_bind_kwargs(resolved)["model_downloader"]
    assert loader.keywords == {"lora_dir": resolved.serve.lora_dir, "storage_env": {}}
    assert lora_bind_kwargs(from_dict(NatRayConfig, {})) == {}
    llm = llm_config(resolved, "/models/smol", "smol")
    assert llm.lora_config.max_num_adapters_per_replica == 4 and llm.engine_kwargs["enable_lora"]
    remote = from_dict(NatRayConfig, {"serve": {"lora_dir": "s3://bucket/adapters/"}})
    remote = with_lora_dir_resolved(remote, "smol")
    loader = lora_bind_kwargs(remote)["model_downloader"]
    assert loader.keywords["lora_dir"] == "s3://bucket/adapters"
    assert loader.keywords["storage_env"]["AWS_ACCESS_KEY_ID"] == "k"  # an init argument, not a runtime_env
    assert "AWS_ACCESS_KEY_ID" not in str(llm_config(remote, "/models/smol", "smol").runtime_env)


def test_a_name_is_published_once_whole_and_sealed_and_never_reused_for_other_weights(location, tmp_path):
    from nat_ray.serve.adapters import AdapterExists, adapter_digest, publish_adapter

    src = tmp_path / "trained"
    _adapter(src)
    (src / "adapter_model.safetensors").write_bytes(b"v1")
    lora_dir = f"{location}/lora"
    assert publish_adapter(src, lora_dir, "round-1") == f"{lora_dir}/round-1"
    assert adapter_names(lora_dir) == ["round-1"]
    assert adapter_digest(f"{lora_dir}/round-1") == adapter_digest(str(src))
    if not Store(lora_dir).remote:
        assert safe_files.check_dir(f"{lora_dir}/round-1", require_checksum=True) == []
    assert publish_adapter(src, lora_dir, "round-1") == f"{lora_dir}/round-1"  # the same weights: a no-op
    (src / "adapter_model.safetensors").write_bytes(b"v2")
    with pytest.raises(AdapterExists, match="already holds other weights; publish them under a new name"):
        publish_adapter(src, lora_dir, "round-1")
    assert Store(lora_dir).read_bytes("round-1/adapter_model.safetensors") == b"v1"
    publish_adapter(src, lora_dir, "round-2")
    assert Store(lora_dir).dirs() == ["round-1", "round-2"]  # no staging folders left
    with pytest.raises(ValueError, match="must not hold"):
        publish_adapter(src, lora_dir, "../x")
    with pytest.raises(ValueError, match="not a peft adapter"):
        publish_adapter(tmp_path / "lora", lora_dir, "x")


def test_sigterm_stops_the_server_as_ctrl_c_does():
    import os
    import signal
    import time

    from nat_ray.serve.app import _stop_on_sigterm

    old = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        with pytest.raises(KeyboardInterrupt):  # run_serve's Ctrl-C path: Serve shut down, captures written
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    finally:
        signal.signal(signal.SIGTERM, old)
