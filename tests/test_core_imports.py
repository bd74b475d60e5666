"""The pure core must stay importable without Ray or vLLM (fast unit tests, GPU boxes without Ray)."""

from __future__ import annotations

import subprocess
import sys

CORE = [
    "nat_ray.react",
    "nat_ray.tools",
    "nat_ray.scoring",
    "nat_ray.nat_data",
    "nat_ray.masks",
    "nat_ray.prompts",
    "nat_ray.tasks",
    "nat_ray.config",
    "nat_ray.records",
    "nat_ray.agent",
    "nat_ray.models",
    "nat_ray.engines.vllm_engine",
    "nat_ray.cli",
]


def test_core_modules_import_neither_ray_nor_vllm():
    code = (
        "import importlib, sys\n"
        f"for m in {CORE!r}: importlib.import_module(m)\n"
        "heavy = sorted(m for m in ('ray', 'vllm', 'torch', 'deepspeed') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing the core pulled in: {out.stdout.strip()}"
