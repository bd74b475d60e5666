"""Benchmark of served-episode capture (issue 26): what ``serve.capture`` costs, and what a kill loses.

Run from the repository root (no arguments; about 10 minutes on the 2-core CPU machine)::

    .venv/bin/python benchmarks/capture.py          # writes benchmarks/results/capture.json

It starts a local Ray (8 logical CPUs) and two serving applications as ``nat-ray serve`` builds them
(:func:`nat_ray.serve.build_app`), side by side on one HTTP port: ``/off`` without capture and ``/on``
with it (``capture_flush_rows`` 64, ``capture_flush_s`` 2). Then:

1. **Interleaved repeats** (the machine's speed drifts more than the 5 % being measured): ``REPEATS``
   rounds, each sending the same ``CLIENTS`` GSM8K requests (same seeds, so the same episodes) at once
   to one application and then to the other, the order alternating by round; each application's LLM
   prefix cache is reset before its phase. ``capture_over_off`` = the on-phases' requests/s over the
   off-phases' (sums of requests over sums of seconds; each round's own ratio is reported too).
   Goal: >= 0.95.
2. **A replica killed under load**: ``CLIENTS`` clients send requests back to back to ``/on``; just
   after ``KILL_AFTER_ANSWERS`` answers within half a flush window (so they are not written yet) its
   ingress replica is killed (Serve starts another) and the clients go on until ``LOAD_S``. Every answered ``episode_id`` is compared with what reached disk: ``lost`` = answered but
   never written, ``lost_counted`` = what the replicas' journals counted as lost (they must agree), and
   the goal is ``lost <= answered_in_flush_window`` (the episodes answered in the ``capture_flush_s``
   before the kill; requests in flight when it died were never answered, so they are not lost).

Only 127.0.0.1 is contacted; counts and durations are bounded.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/capture.py` from the repo root
    sys.path.insert(0, str(ROOT))

from machine_info import load_average, machine  # noqa: E402 - beside this script

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ["RAY_worker_niceness"] = "0"  # see benchmarks/serve.py: a machine shared with other jobs
os.environ["RAY_memory_monitor_refresh_ms"] = "0"

import requests  # noqa: E402

log = logging.getLogger("bench.capture")

RESULTS = ROOT / "benchmarks" / "results" / "capture.json"
CLIENTS = 32
REPEATS = 4
LOAD_S = 80.0
KILL_AFTER_ANSWERS = 3  # answered within the last flush_s / 2: unwritten when the replica dies
KILL_BY_S = 60.0  # killed then at the latest
RECOVERY_WAIT_S = 90.0  # a dead replica's journal is counted once stale (30 s) by the next one's ticker
FLUSH_S = 2.0
FLUSH_ROWS = 64
TARGET = 0.95
TIMEOUT_S = 600.0
APPS = ("off", "on")

CONFIG = {
    "engine": {"model": "embedded", "max_model_len": 2048, "kv_cache_gb": 1, "max_num_seqs": 64},
    "agent": {"shots": 1, "max_turns": 4, "max_new_tokens": 64, "temperature": 0.2, "top_p": 0.9},
    "serve": {
        "host": "127.0.0.1",
        "tool_min_replicas": 1,
        "tool_max_replicas": 1,
        "max_concurrent_episodes": 64,
    },
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ask(session: requests.Session, url: str, body: dict) -> tuple[int | None, dict | None]:
    try:
        response = session.post(f"{url}/v1/agent", json=body, timeout=TIMEOUT_S)
    except requests.RequestException as err:
        log.info("request failed: %s", type(err).__name__)
        return None, None
    return response.status_code, response.json() if response.status_code == 200 else None


def phase(url: str, bodies: list[dict]) -> dict:
    """All ``bodies`` at once from one client each: requests/s over the phase."""
    local = threading.local()

    def one(body):
        local.s = getattr(local, "s", None) or requests.Session()
        return ask(local.s, url, body)

    start = time.perf_counter()
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(one, bodies))
    seconds = time.perf_counter() - start
    ok = sum(status == 200 for status, _ in results)
    return {"requests": len(bodies), "ok": ok, "seconds": round(seconds, 2), "requests_per_s": ok / seconds}


def reset_prefix_cache(app: str, llm_deployment: str) -> None:
    from ray import serve

    serve.get_deployment_handle(llm_deployment, app_name=app).reset_prefix_cache.remote().result()


def ingress_replica(app: str) -> tuple[str, str]:
    """``(namespace, name)`` of ``app``'s one live ingress replica actor."""
    import ray

    found = [
        (a["namespace"], a["name"])
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{app}#AgentIngress")
    ]
    if len(found) != 1:
        raise RuntimeError(f"expected one AgentIngress replica of {app}, found {found}")
    return found[0]


def kill_under_load(url: str, questions, capture_dir: Path) -> dict:
    """Clients back to back on ``url`` (the capture app); its ingress replica killed mid-way."""
    import ray

    from nat_ray.serve.capture import LOST_DIR, read_captured

    answered: list[tuple[float, str]] = []  # (time answered, episode id)
    statuses: dict[str, int] = {}
    lock = threading.Lock()
    start = time.perf_counter()
    counter = iter(range(10**9))

    def client() -> None:
        session = requests.Session()
        while time.perf_counter() - start < LOAD_S:
            i = next(counter)
            q = questions[i % len(questions)]
            status, body = ask(session, url, {"task": "gsm8k", "question": q.question, "seed": 1000 + i})
            with lock:
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                if body is not None:
                    answered.append((time.perf_counter() - start, body["episode_id"]))
            if status != 200:
                time.sleep(0.5)  # a client that backs off while the replica restarts

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    # Kill just after a burst of answers, before the next flush writes them: the worst moment.
    while time.perf_counter() - start < KILL_BY_S:
        now = time.perf_counter() - start
        with lock:
            recent = sum(now - t <= FLUSH_S / 2 for t, _ in answered)
        if recent >= KILL_AFTER_ANSWERS:
            break
        time.sleep(0.02)
    namespace, victim = ingress_replica("on")
    ray.kill(ray.get_actor(victim, namespace=namespace), no_restart=True)  # Serve starts another
    killed_at = time.perf_counter() - start
    log.info("killed %s at %.1f s", victim, killed_at)
    for t in threads:
        t.join()
    ids = {episode for _, episode in answered}
    waited = time.perf_counter()
    while True:  # the new replica's ticker writes what it holds and counts the dead one's journal
        on_disk = {r["trajectory_id"] for r in read_captured(capture_dir)}
        counted = {path.name for path in (capture_dir / LOST_DIR).glob("*/*")}  # a marker per lost id
        if ids <= on_disk | counted or time.perf_counter() - waited > RECOVERY_WAIT_S:
            break
        time.sleep(2)
    lost = ids - on_disk
    window = [e for t, e in answered if killed_at - FLUSH_S <= t <= killed_at]
    return {
        "clients": CLIENTS,
        "seconds": LOAD_S,
        "killed_at_s": round(killed_at, 1),
        "statuses": statuses,
        "answered": len(ids),
        "on_disk": len(ids & on_disk),
        "lost": len(lost),
        "lost_counted": len(counted),  # journalled, never written: answered or cut off mid-answer
        "lost_not_counted": len(lost - counted),
        "answered_in_flush_window": len(window),
        "meets_goal": len(lost) <= len(window) and not lost - counted,
    }


def main() -> int:
    import ray
    from ray import serve

    from nat_ray.config import NatRayConfig, from_dict
    from nat_ray.models import ensure_embedded
    from nat_ray.serve.app import build_app, served_model_ids
    from nat_ray.tasks import get_task

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("ray", "vllm", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    t0 = time.perf_counter()
    at_start = machine()
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="nat-ray-capture-bench-"))
    capture_dir = work / "capture"
    configs = {
        "off": from_dict(NatRayConfig, {**CONFIG, "serve": {**CONFIG["serve"], "port": port}}),
        "on": from_dict(
            NatRayConfig,
            {
                **CONFIG,
                "serve": {
                    **CONFIG["serve"],
                    "port": port,
                    "capture": True,
                    "capture_dir": str(capture_dir),
                    "capture_flush_s": FLUSH_S,
                    "capture_flush_rows": FLUSH_ROWS,
                },
            },
        ),
    }
    questions = get_task("gsm8k").load("test")
    model_id, _ = served_model_ids(configs["on"], str(ensure_embedded()))
    llm_deployment = "LLMServer:" + model_id.replace("/", "--").replace(".", "_")
    base = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for app in APPS:
            serve.run(build_app(configs[app]), name=app, route_prefix=f"/{app}")
        startup_s = time.perf_counter() - t0
        log.info("both applications up after %.0f s", startup_s)
        warm = requests.Session()
        for app in APPS:
            for i in range(2):
                ask(
                    warm,
                    f"{base}/{app}",
                    {"task": "gsm8k", "question": questions[-1 - i].question, "seed": i},
                )
        bodies = [
            {"task": "gsm8k", "question": q.question, "seed": i} for i, q in enumerate(questions[:CLIENTS])
        ]
        rounds = []
        for r in range(REPEATS):
            order = APPS if r % 2 == 0 else APPS[::-1]
            got = {}
            for app in order:
                reset_prefix_cache(app, llm_deployment)
                got[app] = phase(f"{base}/{app}", bodies)
                log.info("round %d, capture %s: %.3f requests/s", r, app, got[app]["requests_per_s"])
            rounds.append(
                {
                    **got,
                    "order": list(order),
                    "ratio": got["on"]["requests_per_s"] / got["off"]["requests_per_s"],
                }
            )
        rate = {
            app: sum(x[app]["ok"] for x in rounds) / sum(x[app]["seconds"] for x in rounds) for app in APPS
        }
        ratio = rate["on"] / rate["off"]
        killed = kill_under_load(f"{base}/on", questions[CLIENTS:], capture_dir)
        log.info("kill under load: %s", killed)
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {
        "benchmark": "capture",
        "date": datetime.now().isoformat(timespec="seconds"),
        "capture_over_off": round(ratio, 3),
        "target_capture_over_off": TARGET,
        "meets_target": ratio >= TARGET,
        "round_ratios": [round(x["ratio"], 3) for x in rounds],
        "requests_per_s": {app: round(v, 4) for app, v in rate.items()},
        "rounds": rounds,
        "killed_replica": killed,
        "settings": {
            "model": "embedded (SmolLM2-135M-Instruct, float32, vLLM CPU via ray.serve.llm)",
            "requests": f"{CLIENTS} GSM8K test questions at once per phase, same seeds in both applications",
            "agent": CONFIG["agent"],
            "capture_flush_s": FLUSH_S,
            "capture_flush_rows": FLUSH_ROWS,
            "repeats": REPEATS,
        },
        "startup_s": round(startup_s, 1),
        "total_s": round(time.perf_counter() - t0, 1),
        "machine": {**at_start, "load_average_at_end": load_average()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("capture_over_off", "round_ratios", "requests_per_s")}))
    print(json.dumps(killed))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
