"""Benchmark of stage 3, serving (issue 8): the agent route under concurrent clients, and under load.

Run from the repository root (no arguments; about 11 minutes on the 2-core CPU machine)::

    .venv/bin/python benchmarks/serve.py            # writes benchmarks/results/serve.json

It starts a local Ray (8 logical CPUs) and the serving application exactly as ``nat-ray serve``
builds it (:func:`nat_ray.serve.build_app`: the embedded model on vLLM through ray.serve.llm,
calculator and search deployments, the agent ingress) on 127.0.0.1, then:

1. **Sequential**: the first 32 GSM8K test questions, one request at a time (one client).
2. **Concurrent**: the same 32 questions from 32 clients at once. Each request carries the same
   seed in both phases, so both do the same episodes (paper decoding: T=0.2, top-p 0.9).
   vLLM's prefix cache is reset before each phase, so the second does not reuse the first's KV.
   ``concurrent_over_sequential`` = requests/s of phase 2 / requests/s of phase 1 (target >= 8).
3. **Load**: 64 clients, each sending requests back to back for 60 s (GSM8K, and every fourth one
   a HotpotQA question, so search runs too); requests started in the window are waited for.
   Every status is counted; ``errors_5xx`` must be 0. ``p50_s`` / ``p99_s`` are its latencies.

Before Ray starts, a child process measures the **engine's own ceiling** for that ratio:
vLLM offline (same engine settings, in-process, both cores) generating ``CEILING_TOKENS`` tokens for
one of the 32 first-turn prompts at a time, then for all 32 at once.
``engine_batching_ceiling`` = tokens/s at 32 / tokens/s at 1: what phase 2 over phase 1 would be if
every request were one generation of equal length and the engine were always full. Agent requests
have turns, tool calls and unequal lengths, and phase 2 lasts as long as its slowest request
(``concurrent.max_s``), so the served ratio is expected below it. Both phases also report generated
tokens/s, to set beside the ceiling's batch-1 and batch-32 rates.

Only 127.0.0.1 is contacted; request counts and durations are bounded. The machine is shared with
other jobs, so Ray's workers run at normal priority (``RAY_worker_niceness=0``; Ray's default of 15
starves the replicas behind the other jobs) and Ray's memory monitor is off
(``RAY_memory_monitor_refresh_ms=0``; it kills our workers when *other* processes fill the memory).
Timings on a shared machine vary; the load average is recorded at the start and the end.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/serve.py` from the repo root
    sys.path.insert(0, str(ROOT))

from machine_info import load_average, machine  # noqa: E402 - beside this script

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
# Read by the raylet that ray.init starts below (see the docstring: a machine shared with other jobs).
os.environ["RAY_worker_niceness"] = "0"
os.environ["RAY_memory_monitor_refresh_ms"] = "0"
os.environ["RAY_num_workers_soft_limit"] = "0"  # idle pooled workers (holding vLLM imports) go at once

import requests  # noqa: E402

log = logging.getLogger("bench.serve")

RESULTS = ROOT / "benchmarks" / "results" / "serve.json"
QUESTIONS = 32
CONCURRENT_CLIENTS = 32
LOAD_CLIENTS = 64
LOAD_SECONDS = 60.0
SEQUENTIAL_BUDGET_S = 480.0  # a slower machine stops phase 1 early; the rate uses what finished
REQUEST_TIMEOUT_S = 600.0
TARGET_RATIO = 8.0
CEILING_TOKENS = 100  # per sequence, in the engine-ceiling measurement
CEILING_SINGLES = 3  # one-at-a-time generations timed for its batch-1 rate
SEED = 0

CONFIG = {
    "engine": {"model": "embedded", "max_model_len": 2048, "kv_cache_gb": 1, "max_num_seqs": 64},
    "agent": {"shots": 1, "max_turns": 7, "max_new_tokens": 128, "temperature": 0.2, "top_p": 0.9},
    "serve": {
        "host": "127.0.0.1",
        "tool_min_replicas": 1,
        "tool_max_replicas": 2,
        "max_concurrent_episodes": 64,
    },
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100])."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def post_agent(session: requests.Session, url: str, body: dict) -> tuple[int | None, float, dict | None]:
    """``(status or None on a connection error, seconds, JSON body or None)``."""
    start = time.perf_counter()
    try:
        response = session.post(f"{url}/v1/agent", json=body, timeout=REQUEST_TIMEOUT_S)
    except requests.RequestException as err:
        log.warning("request failed: %s", err)
        return None, time.perf_counter() - start, None
    elapsed = time.perf_counter() - start
    if response.status_code != 200:
        log.warning("HTTP %d: %s", response.status_code, response.text[:300])
        return response.status_code, elapsed, None
    return response.status_code, elapsed, response.json()


def outcomes(bodies: list[dict | None]) -> dict:
    """How the answered episodes ended: ``finished`` or their failure reason."""
    return dict(Counter((b["failure_reason"] or "finished") for b in bodies if b is not None))


def completion_tokens(bodies: list[dict | None]) -> int:
    return sum(b["usage"]["completion_tokens"] for b in bodies if b is not None)


def phase_summary(clients: int, statuses: Counter, latencies: list[float], bodies, seconds: float) -> dict:
    """What phases 1 and 2 report: rates, latencies and outcomes of their agent requests."""
    tokens = completion_tokens(bodies)
    return {
        "clients": clients,
        "requests": len(latencies),
        "statuses": {str(k): v for k, v in statuses.items()},
        "seconds": round(seconds, 2),
        "requests_per_s": len(latencies) / seconds,
        "completion_tokens": tokens,
        "completion_tokens_per_s": tokens / seconds,
        "p50_s": percentile(latencies, 50),
        "max_s": max(latencies, default=None),
        "mean_turns": statistics.fmean(b["turns"] if b else 0 for b in bodies),
        "outcomes": outcomes(bodies),
    }


def gsm8k_body(question, index: int) -> dict:
    return {"task": "gsm8k", "question": question.question, "seed": SEED + index}


def reset_prefix_cache(llm_deployment: str) -> None:
    from ray import serve

    from nat_ray.serve.app import APP_NAME

    serve.get_deployment_handle(llm_deployment, app_name=APP_NAME).reset_prefix_cache.remote().result()


def phase_sequential(url: str, questions) -> dict:
    session = requests.Session()
    latencies, statuses, bodies = [], Counter(), []
    start = time.perf_counter()
    for i, q in enumerate(questions):
        if time.perf_counter() - start > SEQUENTIAL_BUDGET_S:
            log.warning("sequential phase stopped after %d of %d questions (time budget)", i, len(questions))
            break
        status, elapsed, body = post_agent(session, url, gsm8k_body(q, i))
        statuses[status] += 1
        latencies.append(elapsed)
        bodies.append(body)
        log.info("sequential %d/%d: %.1f s, %s turns", i + 1, len(questions), elapsed, body and body["turns"])
    return phase_summary(1, statuses, latencies, bodies, time.perf_counter() - start)


def phase_concurrent(url: str, questions) -> dict:
    sessions = threading.local()

    def one(item):
        i, q = item
        if not hasattr(sessions, "s"):
            sessions.s = requests.Session()
        return post_agent(sessions.s, url, gsm8k_body(q, i))

    start = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENT_CLIENTS) as pool:
        results = list(pool.map(one, enumerate(questions)))
    seconds = time.perf_counter() - start
    latencies = [r[1] for r in results]
    summary = phase_summary(
        CONCURRENT_CLIENTS, Counter(r[0] for r in results), latencies, [r[2] for r in results], seconds
    )
    return {**summary, "p99_s": percentile(latencies, 99)}


def phase_load(url: str, math_questions, qa_questions) -> dict:
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: Counter = Counter()
    ended: Counter = Counter()
    counter = iter(range(10**9))
    deadline = time.perf_counter() + LOAD_SECONDS

    def client() -> None:
        session = requests.Session()
        while time.perf_counter() < deadline:
            with lock:
                n = next(counter)
            if n % 4 == 3:
                q = qa_questions[n % len(qa_questions)]
                body = {"task": "hotpotqa", "question": q.question, "seed": n, "max_turns": 4}
            else:
                body = gsm8k_body(math_questions[n % len(math_questions)], n)
            status, elapsed, answer = post_agent(session, url, body)
            with lock:
                statuses[status] += 1
                latencies.append(elapsed)
                if answer is not None:
                    ended[answer["failure_reason"] or "finished"] += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(LOAD_CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    errors_5xx = sum(v for k, v in statuses.items() if k is not None and k >= 500)
    return {
        "clients": LOAD_CLIENTS,
        "window_s": LOAD_SECONDS,
        "seconds_until_last_answer": round(seconds, 2),
        "requests": sum(statuses.values()),
        "statuses": {str(k): v for k, v in statuses.items()},
        "errors_5xx": errors_5xx,
        "connection_errors": statuses.get(None, 0),
        "requests_per_s": sum(statuses.values()) / seconds,
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "outcomes": dict(ended),
    }


def engine_ceiling(questions) -> dict:
    """Raw vLLM tokens/s at batch 1 and at batch ``len(questions)``; runs in a child process."""
    from vllm import SamplingParams

    from nat_ray.agent import new_episode
    from nat_ray.config import NatRayConfig, from_dict
    from nat_ray.engines.vllm_engine import VLLMEngine, render_prompt_ids
    from nat_ray.tasks import get_task

    cfg = from_dict(NatRayConfig, CONFIG)
    task = get_task("gsm8k")
    engine = VLLMEngine(cfg.engine)  # CPU engine arguments as the served engine's (CPU_ENGINE_DEFAULTS)
    try:
        llm = engine.llm
        prompts = [
            {
                "prompt_token_ids": render_prompt_ids(
                    engine.tokenizer, new_episode(task, q.question, cfg.agent, str(i)).conversation()
                )
            }
            for i, q in enumerate(questions)
        ]
        params = [
            SamplingParams(
                temperature=cfg.agent.temperature,
                top_p=cfg.agent.top_p,
                max_tokens=CEILING_TOKENS,
                min_tokens=CEILING_TOKENS,
                ignore_eos=True,
                seed=SEED + i,
            )
            for i in range(len(prompts))
        ]
        warm = SamplingParams(max_tokens=1)
        llm.generate(prompts[-1:], [warm], use_tqdm=False)  # start-up work outside the timings

        def timed(ps, sps) -> float:
            # Each timed call starts as a running server would: only the shared one-shot prefix cached.
            llm.reset_prefix_cache()
            llm.generate(prompts[-1:], [warm], use_tqdm=False)
            start = time.perf_counter()
            outs = llm.generate(ps, sps, use_tqdm=False)
            return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)

        single = statistics.fmean(timed([p], [sp]) for p, sp in zip(prompts[:CEILING_SINGLES], params))
        batched = timed(prompts, params)
    finally:
        engine.close()
    return {
        "tokens_per_sequence": CEILING_TOKENS,
        "batch_1_tokens_per_s": round(single, 1),
        f"batch_{len(prompts)}_tokens_per_s": round(batched, 1),
        "ratio": round(batched / single, 2),
        "how": "vLLM offline in-process, same engine settings, the phase-1/2 first-turn prompts, "
        "ignore_eos with min_tokens=max_tokens",
    }


def _ceiling_child(questions, queue) -> None:
    logging.basicConfig(level=logging.WARNING)
    queue.put(engine_ceiling(questions))


def measure_ceiling(questions) -> dict:
    """:func:`engine_ceiling` in a spawned process, so its engine's memory and threads are gone after."""
    import multiprocessing
    import queue as queue_module

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_ceiling_child, args=(questions, queue))
    child.start()
    try:
        while True:
            try:
                return queue.get(timeout=5)
            except queue_module.Empty:  # still working, unless it died
                if not child.is_alive():
                    raise RuntimeError(
                        f"the engine-ceiling process exited with code {child.exitcode}"
                    ) from None
    finally:
        child.join(60)


def main() -> int:
    import ray
    from ray import serve

    from nat_ray.config import NatRayConfig, from_dict
    from nat_ray.models import ensure_embedded
    from nat_ray.serve.app import APP_NAME, build_app, served_model_ids
    from nat_ray.tasks import get_task

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("ray", "vllm", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    t0 = time.perf_counter()
    machine_at_start = machine()
    port = free_port()
    cfg = from_dict(NatRayConfig, {**CONFIG, "serve": {**CONFIG["serve"], "port": port}})
    math_questions = get_task("gsm8k").load("test")
    qa_questions = get_task("hotpotqa").load("dev", limit=60)
    questions = math_questions[:QUESTIONS]
    url = f"http://127.0.0.1:{port}"
    model_id, _ = served_model_ids(cfg, str(ensure_embedded()))
    llm_deployment = "LLMServer:" + model_id.replace("/", "--").replace(".", "_")

    ceiling = measure_ceiling(questions)
    log.info("engine ceiling: %s", ceiling)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
        startup_s = time.perf_counter() - t0
        log.info("serving at %s after %.0f s", url, startup_s)
        warm = requests.Session()
        for i in range(2):  # first requests load lazy state (agent loop, tokenizer caches)
            post_agent(warm, url, gsm8k_body(math_questions[-1 - i], 10_000 + i))

        reset_prefix_cache(llm_deployment)
        sequential = phase_sequential(url, questions)
        log.info("sequential: %.3f requests/s", sequential["requests_per_s"])
        reset_prefix_cache(llm_deployment)
        concurrent = phase_concurrent(
            url, questions[: sequential["requests"]] if sequential["requests"] < QUESTIONS else questions
        )
        log.info("concurrent: %.3f requests/s", concurrent["requests_per_s"])
        load = phase_load(url, math_questions[QUESTIONS:], qa_questions)
        log.info("load: %s", load)
    finally:
        serve.shutdown()
        ray.shutdown()

    ratio = concurrent["requests_per_s"] / sequential["requests_per_s"]
    result = {
        "benchmark": "serve",
        "date": datetime.now().isoformat(timespec="seconds"),
        "concurrent_over_sequential": round(ratio, 2),
        "target_concurrent_over_sequential": TARGET_RATIO,
        "engine_batching_ceiling": ceiling["ratio"],
        "meets_target": ratio >= TARGET_RATIO and load["errors_5xx"] == 0,
        "p50_s": load["p50_s"],
        "p99_s": load["p99_s"],
        "errors_5xx": load["errors_5xx"],
        "sequential": sequential,
        "concurrent": concurrent,
        "engine_ceiling": ceiling,
        "load": load,
        "settings": {
            "model": "embedded (SmolLM2-135M-Instruct, float32, vLLM CPU via ray.serve.llm)",
            "questions": f"first {QUESTIONS} GSM8K test questions (phases 1-2); GSM8K + 1 in 4 HotpotQA (load)",
            "agent": CONFIG["agent"],
            "engine": CONFIG["engine"],
            "serve": CONFIG["serve"],
            "ray_logical_cpus": 8,
        },
        "startup_s": round(startup_s, 1),
        "total_s": round(time.perf_counter() - t0, 1),
        "machine": {**machine_at_start, "load_average_at_end": load_average()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "concurrent_over_sequential",
                    "engine_batching_ceiling",
                    "p50_s",
                    "p99_s",
                    "errors_5xx",
                )
            }
        )
    )
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
