"""The pure core must stay importable without Ray or vLLM (fast unit tests, GPU boxes without Ray)."""

from __future__ import annotations

import subprocess
import sys

CORE = [
    "nat_ray.core.agent_card",
    "nat_ray.evaluation.results_table",
    "nat_ray.core.react",
    "nat_ray.tools",
    "nat_ray.core.scoring",
    "nat_ray.core.nat_data",
    "nat_ray.core.masks",
    "nat_ray.core.prompts",
    "nat_ray.tasks",
    "nat_ray.config",
    "nat_ray.core.records",
    "nat_ray.agent",
    "nat_ray.models",
    "nat_ray.engines.vllm_engine",
    "nat_ray.cli",
]


def test_core_modules_import_neither_ray_nor_vllm():
    code = (
        "import importlib, sys\n"
        f"for m in {CORE!r}: importlib.import_module(m)\n"
        "heavy = sorted(m for m in ('ray', 'vllm', 'torch', 'deepspeed', 'requests') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing the core pulled in: {out.stdout.strip()}"
