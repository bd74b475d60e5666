"""Benchmark of hot-loading adapters (issue 17): a running server / engine vs a restart, to first answer.

Run from the repository root (no arguments; a few minutes on the 2-core CPU machine)::

    .venv/bin/python benchmarks/hotload.py          # writes benchmarks/results/hotload.json

1. A tiny peft adapter of the embedded model (LoRA r=8 on q/v, random B so its answers differ).
2. **Rollout engine**, in a child process: a :class:`VLLMEngine` started with LoRA enabled answers
   once on the base model; then ``engine_hotload_s`` = ``load_adapter`` + the first answer through
   the adapter on that running engine, and ``engine_restart_s`` = closing it, starting a new
   ``VLLMEngine`` with the adapter, and its first answer. ``engine_hotload_over_restart`` is their ratio.
3. **Serving**: ``nat-ray serve``'s application (:func:`nat_ray.serve.build_app`) with an empty
   ``serve.lora_dir`` answers once on the base model; then ``hotload_s`` = publishing the adapter
   into lora_dir (:func:`nat_ray.serve.adapters.publish_adapter`) to the first 200 answer of
   ``/v1/chat/completions`` with ``<model_id>:<adapter>``; ``restart_s`` = ``serve.shutdown()``,
   starting the application again with the adapter as ``serve.lora``, to its first answer with it.
   ``hotload_over_restart`` = restart_s / hotload_s (higher is better).

Every answer is one greedy chat completion of 8 tokens, so the figures are dominated by what
hot-loading saves (engine start) and costs (reading the adapter), not by generation.
Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/hotload.py` from the repo root
    sys.path.insert(0, str(ROOT))

RESULT = ROOT / "benchmarks" / "results" / "hotload.json"
MODEL_ID = "smol"
ADAPTER = "round-1"
QUESTION = [{"role": "user", "content": "What is 12 times 3? Answer with a number."}]
ENGINE = {"max_model_len": 1024, "kv_cache_gb": 1, "max_num_seqs": 8}

MAKE_ADAPTER = """
import sys, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
torch.manual_seed(int(sys.argv[3]))
base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
# init_lora_weights=False: B is random too, so the adapter changes the model's answers.
lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                  init_lora_weights=False)
get_peft_model(base, lora).save_pretrained(sys.argv[2])
"""


def make_adapter(base_path: str, out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny peft adapter of ``base_path`` at ``out_dir`` whose greedy answers differ from the base's.

    Built in a child process, so torch and peft do not stay in the caller's memory.
    """
    subprocess.run(
        [sys.executable, "-c", MAKE_ADAPTER, base_path, str(out_dir), str(seed)], check=True, timeout=600
    )
    return Path(out_dir)


def engine_part(adapter: str) -> dict:
    """The rollout engine's figures (run in a child process: vLLM's in-process engine)."""
    from nat_ray.config import EngineConfig
    from nat_ray.core.react import Sampling
    from nat_ray.engines.vllm_engine import VLLMEngine
    from nat_ray.models import resolve_model

    cfg = EngineConfig(model=resolve_model("embedded"), lora=True, **ENGINE)
    greedy = [Sampling(temperature=0.0, max_tokens=8, seed=0)]
    t = time.perf_counter()
    engine = VLLMEngine(cfg)
    base = engine.generate([QUESTION], greedy)[0].text
    start_s = time.perf_counter() - t
    t = time.perf_counter()
    engine.load_adapter(adapter)
    tuned = engine.generate([QUESTION], greedy)[0].text
    hotload_s = time.perf_counter() - t
    t = time.perf_counter()
    engine.close()
    engine = VLLMEngine(cfg, lora_path=adapter)
    restarted = engine.generate([QUESTION], greedy)[0].text
    restart_s = time.perf_counter() - t
    engine.close()
    return {
        "engine_start_s": round(start_s, 2),
        "engine_hotload_s": round(hotload_s, 3),
        "engine_restart_s": round(restart_s, 2),
        "engine_hotload_over_restart": round(restart_s / hotload_s, 1),
        "engine_answers": {"base": base, "adapter_hotloaded": tuned, "adapter_restarted": restarted},
    }


def _first_answer(url: str, model: str, deadline_s: float = 600) -> str:
    """Ask until the server answers 200 with ``model`` (a restarting app refuses connections a while)."""
    import requests

    body = {"model": model, "messages": QUESTION, "max_tokens": 8, "temperature": 0}
    end = time.monotonic() + deadline_s
    while True:
        try:
            reply = requests.post(f"{url}/v1/chat/completions", json=body, timeout=300)
            if reply.status_code == 200:
                return reply.json()["choices"][0]["message"]["content"]
            problem = f"{reply.status_code}: {reply.text[:200]}"
        except requests.RequestException as err:
            problem = str(err)
        if time.monotonic() > end:
            raise RuntimeError(f"no answer from {model}: {problem}")
        time.sleep(0.2)


def serve_part(adapter: Path, work: Path) -> dict:
    import ray
    from ray import serve

    from nat_ray.config import NatRayConfig, from_dict
    from nat_ray.serve.adapters import publish_adapter
    from nat_ray.serve.app import APP_NAME, build_app

    with socket.socket() as sock:  # a port free a moment ago (the machine is shared)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    lora_dir = work / "lora_dir"

    def config(serve_extra: dict) -> NatRayConfig:
        serve_cfg = {"model_id": MODEL_ID, "port": port, "tool_max_replicas": 1, **serve_extra}
        return from_dict(NatRayConfig, {"engine": ENGINE, "serve": serve_cfg})

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        t = time.perf_counter()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config({"lora_dir": str(lora_dir)})), name=APP_NAME, route_prefix="/")
        base = _first_answer(url, MODEL_ID)
        start_s = time.perf_counter() - t

        t = time.perf_counter()
        publish_adapter(adapter, lora_dir, ADAPTER)
        tuned = _first_answer(url, f"{MODEL_ID}:{ADAPTER}")
        hotload_s = time.perf_counter() - t

        t = time.perf_counter()
        serve.shutdown()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config({"lora": str(adapter)})), name=APP_NAME, route_prefix="/")
        restarted = _first_answer(url, f"{MODEL_ID}-lora")
        restart_s = time.perf_counter() - t
    finally:
        serve.shutdown()
        ray.shutdown()
    return {
        "serve_start_s": round(start_s, 2),
        "hotload_s": round(hotload_s, 3),
        "restart_s": round(restart_s, 2),
        "hotload_over_restart": round(restart_s / hotload_s, 1),
        "serve_answers": {"base": base, "adapter_hotloaded": tuned, "adapter_restarted": restarted},
    }


def main() -> int:
    # Imported here, not at the top: the tests import this file for make_adapter alone.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine_info import load_average, machine  # beside this script

    from nat_ray.models import resolve_model

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # Read by the raylet that ray.init starts (a machine shared with other jobs; see benchmarks/serve.py).
    os.environ["RAY_worker_niceness"] = "0"
    os.environ["RAY_memory_monitor_refresh_ms"] = "0"
    load_start = load_average()
    with tempfile.TemporaryDirectory(prefix="nat-hotload-") as tmp:
        work = Path(tmp)
        adapter = make_adapter(resolve_model("embedded"), work / "adapter")
        child = subprocess.run(
            [sys.executable, __file__, "--engine-part", str(adapter)],
            check=True,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        engine = json.loads(child.stdout.strip().splitlines()[-1])
        served = serve_part(adapter, work)
    result = {
        "benchmark": "hotload",
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        **served,
        **engine,
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--engine-part":
        print(json.dumps(engine_part(sys.argv[2])))
        sys.exit(0)
    sys.exit(main())
