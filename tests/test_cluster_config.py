"""cluster.yaml must be a valid Ray cluster config (Ray's own schema) and match the project's pins."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_rays_schema():
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    # What `ray up` does: merge the provider's defaults, then check against ray-schema.json.
    validate_config(fillout_defaults(_cluster()))


def test_head_does_no_gpu_work_and_a100_workers_scale_from_zero():
    cfg = _cluster()
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"]["GPU"] == 0
    assert types["a100"]["node_config"]["InstanceType"] == "p4d.24xlarge"
    assert types["a100"]["min_workers"] == 0 < types["a100"]["max_workers"]
    assert "cpu" in types


def test_setup_pins_the_projects_ray_version_and_cuda_vllm():
    import ray

    setup = " ".join(_cluster()["setup_commands"])
    assert f"=={ray.__version__}" in setup and ".[cuda]" in setup
    # torch (with the CUDA vLLM) before DeepSpeed, which builds against the torch installed
    assert setup.index('"vllm==') < setup.index("--no-build-isolation") < setup.index(".[cuda]")
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f"ray[train,data,serve]=={ray.__version__}" in pyproject


def test_the_schema_check_catches_a_broken_config():
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    broken = _cluster()
    broken["available_node_types"]["a100"]["min_workers"] = "zero"
    import jsonschema

    with pytest.raises((ValueError, jsonschema.ValidationError), match="integer"):
        validate_config(fillout_defaults(broken))
