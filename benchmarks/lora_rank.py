"""Benchmark of ``engine.max_lora_rank`` on the CPU build: one rank-8 adapter, the engine padded to 64 vs 8.

Run from the repository root (no arguments; about two minutes on the 2-core CPU machine)::

    .venv/bin/python benchmarks/lora_rank.py        # writes benchmarks/results/lora_rank.json

vLLM pads every adapter to ``max_lora_rank``; its CPU LoRA ops gather a per-token weight of that rank,
so the cost of each LoRA token should follow it. For each rank, in a child process of its own (an
in-process engine per process), a :class:`VLLMEngine` with LoRA enabled measures, greedy:
``prefill_s`` (one ~210-token prompt, one token out) and ``decode_s`` (3 short prompts, 48 tokens
each), through the adapter and, as the baseline in the same engine, on the base model. The ratios
``prefill_64_over_8`` and ``decode_64_over_8`` compare the adapter's figures; the base model's show
what the rank does not touch. Each figure is the second of two runs (the first warms the engine).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/lora_rank.py` from the repo root
    sys.path.insert(0, str(ROOT))

RESULT = ROOT / "benchmarks" / "results" / "lora_rank.json"
RANKS = (64, 8)
LONG_PROMPT = "What is 12 times 3? Answer with a number. " + " ".join(f"word{i}" for i in range(200))
SHORT_PROMPTS = ["What is 12 times 3?", "Name a prime number.", "What is 7 plus 5?"]


def _hotload():
    spec = importlib.util.spec_from_file_location("bench_hotload", Path(__file__).with_name("hotload.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _second_run(fn) -> float:
    fn()
    started = time.perf_counter()
    fn()
    return round(time.perf_counter() - started, 3)


def measure(rank: int, adapter: str) -> dict:
    """One engine with ``max_lora_rank=rank`` (run in a child process)."""
    from vllm import SamplingParams

    from nat_ray.config import EngineConfig
    from nat_ray.engines.vllm_engine import VLLMEngine
    from nat_ray.models import resolve_model

    cfg = EngineConfig(
        model=resolve_model("embedded"), lora=True, max_lora_rank=rank, max_model_len=2048, kv_cache_gb=1
    )
    engine = VLLMEngine(cfg)
    # Each run's prompts start with their own number, so no run reuses an earlier one's prefix cache.
    runs = iter(range(1000))

    def prefill(lora):
        prompt = f"Run {next(runs)}. {LONG_PROMPT}"
        one = SamplingParams(max_tokens=1, temperature=0)
        engine.llm.generate([prompt], one, lora_request=lora, use_tqdm=False)

    def decode(lora):
        prompts = [f"Run {next(runs)}. {p}" for p in SHORT_PROMPTS]
        tokens = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
        engine.llm.generate(prompts, tokens, lora_request=lora, use_tqdm=False)

    engine.load_adapter(adapter)
    lora = engine.lora_request
    try:
        return {
            "prefill_s": _second_run(lambda: prefill(lora)),
            "decode_s": _second_run(lambda: decode(lora)),
            "base_prefill_s": _second_run(lambda: prefill(None)),
            "base_decode_s": _second_run(lambda: decode(None)),
        }
    finally:
        engine.close()


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from machine_info import load_average, machine  # beside this script

    from nat_ray.models import resolve_model

    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        adapter = str(_hotload().make_adapter(resolve_model("embedded"), Path(tmp) / "adapter"))
        figures = {}
        for rank in RANKS:
            out = subprocess.run(
                [sys.executable, __file__, "--rank", str(rank), adapter],
                check=True,
                capture_output=True,
                text=True,
                timeout=900,
            ).stdout
            figures[str(rank)] = json.loads(out.strip().splitlines()[-1])
            print(f"max_lora_rank {rank}: {figures[str(rank)]}", flush=True)
    result = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average": load_average(),
        "adapter_rank": 8,
        "ranks": figures,
        "prefill_64_over_8": round(figures["64"]["prefill_s"] / figures["8"]["prefill_s"], 2),
        "decode_64_over_8": round(figures["64"]["decode_s"] / figures["8"]["decode_s"], 2),
        "base_prefill_64_over_8": round(figures["64"]["base_prefill_s"] / figures["8"]["base_prefill_s"], 2),
        "seconds": round(time.time() - started, 1),
    }
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k.endswith("over_8")}))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--rank":
        print(json.dumps(measure(int(sys.argv[2]), sys.argv[3])))
    else:
        main()
