"""benchmarks/train_step.py: the step's throughput script, run without Ray or DeepSpeed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_step import TINY  # the two-layer model of the step's tests

from nat_ray.config import TrainConfig
from nat_ray.errors import ConfigError

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "train_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mfu_formula(bench):
    assert bench.mfu(1000.0, 1_000_000, 6e9) == pytest.approx(1.0)
    assert bench.mfu(1000.0, 1_000_000, None) is None


def test_defaults_are_train_configs(bench):
    args = bench.build_arg_parser().parse_args([])
    cfg = TrainConfig()
    assert (args.max_length, args.micro_batch_size, args.seed) == (
        cfg.max_length,
        cfg.micro_batch_size,
        cfg.seed,
    )
    assert (args.model, args.variant, args.packing, args.mode, args.lora_rank, args.precision) == (
        cfg.base_model,
        cfg.variant,
        cfg.packing,
        cfg.mode,
        cfg.lora_rank,
        cfg.precision,
    )


def test_model_overrides_parse_as_json_values(bench):
    assert bench.parse_model_overrides("hidden_size=64, num_hidden_layers=2") == {
        "hidden_size": 64,
        "num_hidden_layers": 2,
    }
    assert bench.parse_model_overrides(None) == {}
    with pytest.raises(ConfigError, match="key=value"):
        bench.parse_model_overrides("hidden_size")


def test_cli_times_synthetic_data(bench, tmp_path, capsys):
    out = tmp_path / "r.json"
    overrides = ",".join(f"{k}={v}" for k, v in TINY.items())
    code = bench.main(
        [
            "--model-overrides",
            overrides,
            "--examples",
            "12",
            "--mean-length",
            "60",
            "--max-length",
            "128",
            "--micro-batch-size",
            "2",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--peak-tflops",
            "1",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["steps"] == 2 and result["tokens"] > 0 and result["tokens_per_s"] > 0
    assert result["packing"] is True and result["mfu"] > 0
    assert json.loads(capsys.readouterr().out)["tokens"] == result["tokens"]


def test_script_runs_as_a_file_without_ray_or_deepspeed():
    """As a GPU box runs it: a plain file; importing it pulls in neither Ray nor DeepSpeed."""
    help_run = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120
    )
    assert help_run.returncode == 0, help_run.stderr
    assert "--micro-batch-size" in help_run.stdout
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('b', {str(SCRIPT)!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "print(','.join(m for m in ('ray', 'vllm', 'deepspeed') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
