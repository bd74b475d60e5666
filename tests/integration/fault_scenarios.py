"""The fault scenarios on a :class:`two_node.TwoNodeCluster`: one function each, returning its figures.

Each runs a stage the way a user does (``python -m nat_ray.cli ...`` as a driver joined to the
cluster through ``RAY_ADDRESS``), kills the worker node (or a replica) mid-run, lets the stage
finish by itself, and measures what was lost, repeated and how long recovery took. The test
module asserts on the figures; ``benchmarks/faults.py`` writes them to
``benchmarks/results/faults.json``. A scenario leaves the cluster with two nodes again (a fresh
worker node joins after a kill), so the next one starts from the same shape.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import yaml

from integration.two_node import TwoNodeCluster
from nat_ray.core import nat_data as columns
from nat_ray.core import records
from nat_ray.paths import PACKAGE_DATA_DIR, PARTS_DIR

SAMPLE_CORPUS = str(PACKAGE_DATA_DIR / "hotpotqa" / "corpus_sample.jsonl.gz")
ENGINE_ACTOR = "RolloutWorker"  # in the process title of a rollout engine actor
TRAIN_WORKER = "RayTrainWorker"  # in the process title of a Ray Train worker


class ScenarioError(RuntimeError):
    """A scenario could not run to its kill (the stage failed or stalled before it)."""


def _driver(cluster: TwoNodeCluster, args: list[str], log: Path, **env: str) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "nat_ray.cli", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            # Ray folds log lines that differ only in numbers ("step 3/6 ...") into "[repeated]":
            # the scenarios read every step line.
            env=cluster.driver_env(PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0", **env),
            start_new_session=True,
        )


def _stop_driver(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else ""


def _wait(what: str, check, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        if proc.poll() is not None:
            raise ScenarioError(f"the driver exited ({proc.returncode}) before {what}:\n{_tail(log)}")
        time.sleep(0.5)
    raise ScenarioError(f"no {what} within {timeout_s:.0f} s:\n{_tail(log)}")


def _runs_on(node, marker: str) -> bool:
    return any(marker in line for line in node.cmdlines())


def _rejoin(cluster: TwoNodeCluster) -> None:
    """After a kill: wait until the head has let the dead node go, then start a fresh worker node."""
    cluster.wait_node_dead()
    cluster.start_worker()


# --------------------------------------------------------------------------------------------
# 1. Rollout


def rollout_config(out: Path, model: str, limit: int = 12, max_new_tokens: int = 48) -> dict:
    """Two engine actors of one CPU each (Ray Data spreads them over the nodes); a part per trajectory."""
    return {
        "engine": {"model": model, "max_model_len": 2048, "kv_cache_gb": 1},
        "agent": {"max_turns": 2, "max_new_tokens": max_new_tokens},
        "tools": {"search_corpus": SAMPLE_CORPUS},
        "rollout": {
            "output_dir": str(out),
            "tasks": ["gsm8k"],
            "limit": limit,
            "temperatures": [0.5, 0.9],
            "batch_size": 4,
            "max_in_flight": 4,
            "num_engines": 2,
            "engine_num_cpus": 1,
            "flush_rows": 1,
        },
    }


def rollout_node_kill(
    cluster: TwoNodeCluster,
    work: Path,
    model: str,
    kill_after_rows: int = 4,
    limit: int = 12,
    max_new_tokens: int = 48,
) -> dict:
    """Rollout of ``limit`` questions x 2 temperatures with an engine on each node; the worker node
    killed once ``kill_after_rows`` are written. (``max_new_tokens`` per turn: shorter turns, a
    shorter scenario; the test's.)

    Returns:
        ``planned``, ``written``, ``lost``, ``duplicated``, ``rows_before_kill``, ``engine_on_both_nodes``,
        ``worker_node_processes_killed`` / ``_process_groups`` / ``_survivors``, ``repeats_dropped``
        (rows of retried batches the driver had already written), ``regenerated_passes``,
        ``seconds_to_node_dead`` (kill until the head marks the node dead), ``seconds_kill_to_done``
        (kill until the driver exits), ``exit_code``, ``seconds``, ``log`` (the driver's output tail).
    """
    out = work / "rollout"
    cfg = rollout_config(out, model, limit, max_new_tokens)
    cfg_path = work / "rollout.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    planned = len(range(cfg["rollout"]["limit"])) * len(cfg["rollout"]["temperatures"])
    log = work / "rollout.log"
    began = time.monotonic()
    proc = _driver(cluster, ["rollout", "--config", str(cfg_path)], log)

    def rows_written() -> int:
        try:
            return len(records.read_rows(out / PARTS_DIR))
        except Exception:  # noqa: BLE001 - a part being renamed into place
            return 0

    try:
        _wait(
            "engine actor on both nodes",
            lambda: _runs_on(cluster.worker, ENGINE_ACTOR) and _runs_on(cluster.head, ENGINE_ACTOR),
            proc,
            log,
            600,
        )
        _wait(f"{kill_after_rows} rows written", lambda: rows_written() >= kill_after_rows, proc, log, 600)
        rows_before = rows_written()
        both = _runs_on(cluster.worker, ENGINE_ACTOR) and _runs_on(cluster.head, ENGINE_ACTOR)
        groups = {os.getpgid(p.pid) for p in cluster.worker.processes()}
        killed_at = time.monotonic()
        killed = cluster.kill_worker_node()
        survivors = cluster.worker.survivors()
        dead_after = cluster.wait_node_dead()
        try:
            code = proc.wait(timeout=900)
        except subprocess.TimeoutExpired:
            code = None
        done_after = time.monotonic() - killed_at
    finally:
        _stop_driver(proc)
    ids = Counter(r[columns.TRAJECTORY_ID] for r in records.read_rows(out / PARTS_DIR))
    text = log.read_text(errors="replace")
    _rejoin(cluster)
    return {
        "planned": planned,
        "written": sum(ids.values()),
        "lost": max(0, planned - len(ids)),
        "duplicated": sum(n - 1 for n in ids.values()),
        "rows_before_kill": rows_before,
        "engine_on_both_nodes": both,
        "worker_node_processes_killed": len(killed),
        "worker_node_process_groups": len(groups),
        "worker_node_survivors": len(survivors),
        "repeats_dropped": sum(
            int(n) for n in re.findall(r"dropped (\d+) trajectories already received", text)
        ),
        "regenerated_passes": text.count("did not come back"),
        "seconds_to_node_dead": round(dead_after, 1),
        "seconds_kill_to_done": round(done_after, 1),
        "exit_code": code,
        "seconds": round(time.monotonic() - began, 1),
        "log": _tail(log, 2500),
    }


# --------------------------------------------------------------------------------------------
# 2. Training


def train_config(data: Path, storage: Path, model: str, steps: int, checkpoint_every: int) -> dict:
    """LoRA on the tiny model, one worker per node (``placement_strategy: SPREAD``), restarts allowed."""
    return {
        "train": {
            "base_model": model,
            "data": [str(data)],
            "variant": "nat",
            "mode": "lora",
            "zero_stage": 2,
            "lora_rank": 8,
            "lora_target_modules": ["q_proj", "v_proj"],
            "max_length": 512,
            "packing": True,
            "epochs": 100,
            "max_steps": steps,
            "global_batch_size": 2,
            "micro_batch_size": 1,
            "num_workers": 2,
            "use_gpu": False,
            "learning_rate": 1e-3,
            "warmup_ratio": 0.0,
            "checkpoint_every": checkpoint_every,
            "keep_checkpoints": 2,
            "storage_path": str(storage),
            "run_name": "faults",
            "placement_strategy": "SPREAD",
            "max_failures": 2,
        }
    }


STEP_LINE = re.compile(r"step (\d+)/(\d+) .*?loss ([0-9.]+)")
CKPT_LINE = re.compile(r"checkpoint (step_\S+) saved")
RESUME_LINE = re.compile(r"resuming \S+ at step (\d+) of (\d+)")


def train_node_kill(
    cluster: TwoNodeCluster, work: Path, model: str, steps: int = 6, checkpoint_every: int = 2
) -> dict:
    """Training with a worker on each node; the worker node killed after the first checkpoint and one more step.

    Returns:
        ``planned_steps``, ``final_step``, ``history_steps`` (the result's loss curve, by step),
        ``checkpoint_step`` (where the restarted group resumed), ``last_step_before_kill``,
        ``steps_redone`` (steps taken before the kill and again after it: those after the checkpoint),
        ``loss_redone`` (per redone step: loss before and after), ``restarted_by_itself``,
        ``workers_on_both_nodes``, ``seconds_kill_to_resumed``, ``seconds_kill_to_done``,
        ``exit_code``, ``seconds``, ``log``.
    """
    from rows import math_row  # tests/rows.py

    data = work / "train-data"
    data.mkdir(parents=True, exist_ok=True)
    records.write_rows([math_row(i, c) for i in range(2) for c in (True, False)], data / "part-0.parquet")
    cfg_path = work / "train.yaml"
    cfg_path.write_text(yaml.safe_dump(train_config(data, work / "runs", model, steps, checkpoint_every)))
    result_path = work / "train-result.json"
    log = work / "train.log"
    began = time.monotonic()
    proc = _driver(cluster, ["train", "--config", str(cfg_path), "--json", str(result_path)], log)

    def steps_logged(text: str) -> list[tuple[int, float]]:
        return [(int(m.group(1)), float(m.group(3))) for m in STEP_LINE.finditer(text)]

    try:
        _wait(
            "train worker on both nodes",
            lambda: _runs_on(cluster.worker, TRAIN_WORKER) and _runs_on(cluster.head, TRAIN_WORKER),
            proc,
            log,
            600,
        )
        both = True
        _wait(
            f"a step after the checkpoint of step {checkpoint_every}",
            lambda: (
                CKPT_LINE.search(_tail(log, 20000))
                and any(s > checkpoint_every for s, _ in steps_logged(_tail(log, 20000)))
            ),
            proc,
            log,
            600,
        )
        killed_at = time.monotonic()
        cluster.kill_worker_node()
        text_before = log.read_text(errors="replace")
        mark = len(text_before)
        resumed_after = None
        code = None
        while time.monotonic() - killed_at < 900:
            if resumed_after is None and RESUME_LINE.search(log.read_text(errors="replace")[mark:]):
                resumed_after = time.monotonic() - killed_at
            if proc.poll() is not None:
                code = proc.returncode
                break
            time.sleep(0.5)
        done_after = time.monotonic() - killed_at
    finally:
        _stop_driver(proc)
    text_after = log.read_text(errors="replace")[mark:]
    before = steps_logged(text_before)
    after = steps_logged(text_after)
    resume = RESUME_LINE.search(text_after)
    checkpoint_step = int(resume.group(1)) if resume else None
    last_before = max((s for s, _ in before), default=0)
    loss_before = dict(before)
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    history = result.get("history", [])
    _rejoin(cluster)
    redone = sorted({s for s, _ in after} & set(loss_before))
    return {
        "planned_steps": steps,
        "final_step": result.get("step"),
        "history_steps": [h["step"] for h in history],
        "checkpoint_step": checkpoint_step,
        "last_step_before_kill": last_before,
        "steps_redone": len(redone),
        "loss_redone": {s: [loss_before[s], dict(after)[s]] for s in redone},
        "restarted_by_itself": resume is not None and code == 0,
        "workers_on_both_nodes": both,
        "seconds_kill_to_resumed": round(resumed_after, 1) if resumed_after is not None else None,
        "seconds_kill_to_done": round(done_after, 1),
        "exit_code": code,
        "seconds": round(time.monotonic() - began, 1),
        "log": _tail(log, 2500),
    }


# --------------------------------------------------------------------------------------------
# 3. Serving

ENGINE_MARKS = ("VLLM::", "EngineCore")  # vLLM's engine core and model worker name themselves so
RAY_MARKS = ("raylet", "gcs_server", "default_worker.py", "ray::", "dashboard", "log_monitor", "monitor.py")
ENGINES_GONE_WITHIN_S = 30  # the orphan guard checks every second and escalates to SIGKILL after 10 s


def _title(p: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(p.cmdline()) + " " + p.name()
    return ""


def _is_engine(p: psutil.Process) -> bool:
    return any(mark in _title(p) for mark in ENGINE_MARKS)


def _alive(key: tuple[int, float]) -> bool:
    """Whether the process ``(pid, create_time)`` still runs (a reused pid is another process)."""
    try:
        p = psutil.Process(key[0])
        return p.create_time() == key[1] and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class ProcessWatch:
    """Every process that descends, or once descended, from the cluster's two ``ray start`` processes.

    Sampled every 0.2 s in the background: an engine process is recorded while it is still a
    descendant, and one re-parented away from the tree (an orphan) keeps being watched.
    """

    def __init__(self, cluster: TwoNodeCluster) -> None:
        self.seen: dict[tuple[int, float], bool] = {}  # (pid, create time) -> is an engine process
        self.roots = {node.proc.pid for node in (cluster.head, cluster.worker) if node and node.alive()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(0.2)

    def sample(self) -> None:
        for pid in list(self.roots):
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        key = (child.pid, child.create_time())
                        # A spawned process renames itself (VLLM::EngineCore) after it starts: look again.
                        self.seen[key] = self.seen.get(key, False) or _is_engine(child)
                        self.roots.add(child.pid)

    def engines(self, pids: set[int] | None = None) -> set[tuple[int, float]]:
        """Live engine processes (of ``pids`` only, if given)."""
        return {k for k, eng in self.seen.items() if eng and _alive(k) and (pids is None or k[0] in pids)}

    def engines_seen(self) -> int:
        return sum(self.seen.values())

    def kill_ray_but_engines(self) -> int:
        """SIGKILL every live Ray process of the cluster except the engines (``ray stop --force``, ours only)."""
        self.sample()
        killed = 0
        for key, engine in list(self.seen.items()):
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(key[0])
                if not engine and _alive(key) and not _is_engine(p):
                    p.kill()
                    killed += 1
        return killed

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _gone_within(check, timeout_s: float) -> float | None:
    """Seconds until ``check()`` is true, or None after ``timeout_s``."""
    began = time.monotonic()
    while time.monotonic() - began < timeout_s:
        if check():
            return round(time.monotonic() - began, 1)
        time.sleep(0.2)
    return None


LLM_REPLICA = "ServeReplica"  # with "LLM" in the same title: the vLLM replica's process


# The server's limits that :func:`guards` tries: one agent episode at a time and no queue (so a
# second is refused), a token cap and a body cap. The load's chat requests stay within them.
GUARD_LIMITS = {
    "max_concurrent_episodes": 1,
    "max_queued_episodes": 0,
    "max_tokens_limit": 24,
    "max_body_bytes": 64 * 1024,
}


def serve_config(model: str, port: int, limits: dict | None = None) -> dict:
    limits = limits or {}
    return {
        "engine": {"model": model, "max_model_len": 2048, "kv_cache_gb": 1, "max_num_seqs": 16},
        "agent": {"max_turns": 2, "max_new_tokens": min(32, limits.get("max_tokens_limit", 32))},
        "tools": {"search_corpus": SAMPLE_CORPUS},
        "serve": {
            "port": port,
            "tasks": ["gsm8k"],
            "tool_min_replicas": 1,
            "tool_max_replicas": 1,
            "request_timeout_s": 300,
            **limits,
        },
    }


def _llm_replicas(cluster: TwoNodeCluster) -> list[tuple[int, str]]:
    found = []
    for node in (cluster.head, cluster.worker):
        for proc in node.processes():
            with contextlib.suppress(Exception):
                title = " ".join(proc.cmdline())
                if LLM_REPLICA in title and "LLM" in title.split(LLM_REPLICA, 1)[1]:
                    found.append((proc.pid, title[:160]))
    return found


class _Load:
    """``clients`` threads sending short chat completions back to back; every answer is kept."""

    def __init__(self, url: str, model: str, clients: int, headers: dict | None = None) -> None:
        import threading

        self.url = url
        self.model = model
        self.headers = headers or {}
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.results: list[tuple[float, float, int]] = []  # (sent, answered, status); 0 = no answer
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, i: int) -> None:
        import requests

        n = 0
        while not self.stop.is_set():
            n += 1
            body = {
                "model": self.model,
                "messages": [{"role": "user", "content": f"Count to {3 + (i + n) % 5}."}],
                "max_tokens": 12,
                "temperature": 0.0,
            }
            sent = time.monotonic()
            try:
                status = requests.post(
                    f"{self.url}/v1/chat/completions", json=body, headers=self.headers, timeout=300
                ).status_code
            except requests.RequestException:
                status = 0
            with self.lock:
                self.results.append((sent, time.monotonic(), status))
            if status != 200:
                time.sleep(0.5)  # a client that backs off, as the 503 asks

    def ok_count(self) -> int:
        with self.lock:
            return sum(1 for _, _, s in self.results if s == 200)

    def __enter__(self) -> _Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=310)


# Every route of the app, the body it needs (``model`` is filled in), and its answer with the key.
DOOR_ROUTES = (
    ("GET", "/healthz", None, 200),
    ("GET", "/v1/models", None, 200),
    (
        "POST",
        "/v1/agent",
        {"task": "gsm8k", "question": "What is 2 + 3?", "max_turns": 1, "max_tokens": 8},
        200,
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hi."}], "max_tokens": 4},
        200,
    ),
    ("POST", "/v1/completions", {"prompt": "One, two,", "max_tokens": 4}, 200),
    # This server captures nothing: with the key, feedback is refused as having nowhere to go.
    ("POST", "/v1/feedback", {"episode_id": "ep-0", "score": 1}, 409),
    ("GET", "/no/such/route", None, 404),
)
WRONG_KEYS = ("no key", "wrong key", "key in the query string", "key without Bearer")


def _wrong(what: str, key: str) -> tuple[dict, dict]:
    """The headers and query parameters of one call that lacks the key."""
    return {
        "no key": ({}, {}),
        "wrong key": ({"Authorization": f"Bearer not-{key}"}, {}),
        "key in the query string": ({}, {"api_key": key}),
        "key without Bearer": ({"Authorization": key}, {}),
    }[what]


def knock(url: str, key: str, model: str) -> dict:
    """Every route of the app without the key (:data:`WRONG_KEYS`) and through the OpenAI client with
    another key; then every route with the key.

    Returns:
        ``calls_without_key``, ``answered_401`` and ``not_401`` (the calls that were not, with their
        status), ``with_key`` (route -> status, and whether it is the route's answer),
        ``openai_client`` (the error a stranger's client gets; whether the right key answers).
    """
    import openai
    import requests

    calls, refused, not_401, with_key = 0, 0, [], {}
    for method, path, body, ok in DOOR_ROUTES:
        if body is not None and path in ("/v1/chat/completions", "/v1/completions"):
            body = {**body, "model": model}
        for what in WRONG_KEYS:
            headers, params = _wrong(what, key)
            calls += 1
            try:
                status = requests.request(
                    method, url + path, json=body, headers=headers, params=params, timeout=60
                ).status_code
            except requests.RequestException as err:
                status = f"no answer: {type(err).__name__}"
            if status == 401:
                refused += 1
            else:
                not_401.append({"route": f"{method} {path}", "call": what, "status": status})
        status = requests.request(
            method, url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=300
        ).status_code
        with_key[f"{method} {path}"] = {"status": status, "as_expected": status == ok}
    calls += 1
    stranger = openai.OpenAI(base_url=f"{url}/v1", api_key=f"not-{key}", max_retries=0, timeout=60)
    try:
        stranger.models.list()
        stranger_error = "none: answered"
        not_401.append({"route": "openai client", "call": "another key", "status": 200})
    except openai.AuthenticationError as err:
        stranger_error, refused = f"AuthenticationError {err.status_code}", refused + 1
    except openai.OpenAIError as err:
        stranger_error = type(err).__name__
        not_401.append({"route": "openai client", "call": "another key", "status": stranger_error})
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=300)
    answer = client.completions.create(model=model, prompt="One, two,", max_tokens=4, temperature=0)
    return {
        "calls_without_key": calls,
        "answered_401": refused,
        "not_401": not_401,
        "with_key": with_key,
        "openai_client": {"another_key": stranger_error, "its_key_answers": bool(answer.choices[0].text)},
    }


def guards(url: str, key: str, model: str) -> dict:
    """The server's limits (:data:`GUARD_LIMITS`) on a server started with them and ``key``.

    Returns:
        ``challenge`` (a 401's ``WWW-Authenticate`` header and error code), ``unknown_role`` (status,
        the error's param and message, seconds), ``uncapped`` (route -> status and completion tokens
        of a request without ``max_tokens``), ``body_413`` (status and message with a Content-Length,
        status chunked, health after), ``episode_429`` (the second episode's status, Retry-After and
        message while the first runs; the first's status; a third's after it ended), ``streamed_pieces``.
    """
    import openai
    import requests

    auth = {"Authorization": f"Bearer {key}"}
    refused = requests.get(f"{url}/v1/models", timeout=60)
    challenge = {
        "www_authenticate": refused.headers.get("WWW-Authenticate"),
        "code": refused.json()["error"]["code"],
    }

    started = time.monotonic()
    body = {"model": model, "messages": [{"role": "wizard", "content": "Cast a spell."}]}
    answer = requests.post(f"{url}/v1/chat/completions", json=body, headers=auth, timeout=60)
    error = answer.json().get("error", {})
    unknown_role = {
        "status": answer.status_code,
        "param": error.get("param"),
        "message": error.get("message", ""),
        "seconds": round(time.monotonic() - started, 1),
    }

    uncapped = {}
    for route, body in (
        ("chat/completions", {"messages": [{"role": "user", "content": "Tell me a very long story."}]}),
        ("completions", {"prompt": "Once upon a time", "max_tokens": None}),
    ):
        answer = requests.post(f"{url}/v1/{route}", json={**body, "model": model}, headers=auth, timeout=300)
        tokens = answer.json()["usage"]["completion_tokens"] if answer.status_code == 200 else None
        uncapped[route] = {"status": answer.status_code, "completion_tokens": tokens}

    limit = GUARD_LIMITS["max_body_bytes"]
    big = {"model": model, "messages": [{"role": "user", "content": "x" * limit}], "max_tokens": 4}
    answer = requests.post(f"{url}/v1/chat/completions", json=big, headers=auth, timeout=60)

    def chunks():  # chunked: no Content-Length, only the bytes read count
        yield b'{"task": "gsm8k", "question": "'
        for _ in range(20):
            yield b"y" * 8192
        yield b'"}'

    chunked = requests.post(
        f"{url}/v1/agent", data=chunks(), headers={**auth, "Content-Type": "application/json"}, timeout=60
    )
    body_413 = {
        "status": answer.status_code,
        "message": answer.json().get("error", {}).get("message", ""),
        "chunked_status": chunked.status_code,
        "health_after": requests.get(f"{url}/healthz", headers=auth, timeout=30).status_code,
    }

    agent = {"task": "gsm8k", "question": "What is 2 + 3?", "max_turns": 1, "max_tokens": 8}
    first: dict = {}

    def run_first() -> None:
        body = {**agent, "max_turns": 2, "max_tokens": GUARD_LIMITS["max_tokens_limit"]}
        first["status"] = requests.post(f"{url}/v1/agent", json=body, headers=auth, timeout=300).status_code

    # The first episode can end before a health check sees it open, or before the second arrives (a
    # warm cache answers "2 + 3" in a second): then both are sent again, a few times at most (a
    # server that never refuses the second still fails every try).
    for _ in range(5):
        busy, second = False, None
        thread = threading.Thread(target=run_first, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not busy and thread.is_alive():
            health = requests.get(f"{url}/healthz", headers=auth, timeout=30).json()
            busy = health["open_episodes"] + health["queued_episodes"] >= 1
        if busy:
            second = requests.post(f"{url}/v1/agent", json=agent, headers=auth, timeout=60)
        thread.join(timeout=300)
        if second is not None and second.status_code == 429:
            break
    third = requests.post(f"{url}/v1/agent", json=agent, headers=auth, timeout=300)
    episode_429 = {
        "first_was_running": busy,
        "second_status": second.status_code if second is not None else None,
        "retry_after": int(second.headers.get("Retry-After", 0)) if second is not None else 0,
        "message": second.json().get("error", {}).get("message", "") if second is not None else "",
        "first_status": first.get("status"),
        "third_status": third.status_code,
    }

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=300)
    stream = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=4, stream=True
    )
    pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
    return {
        "challenge": challenge,
        "unknown_role": unknown_role,
        "uncapped": uncapped,
        "body_413": body_413,
        "episode_429": episode_429,
        "streamed_pieces": len([p for p in pieces if p]),
    }


def files_holding(folder: Path, secret: str) -> tuple[list[str], int]:
    """The files under ``folder`` that hold ``secret``, and the 401 lines of Serve's access logs there."""
    found, access_401 = [], 0
    for path in Path(folder).rglob("*"):
        with contextlib.suppress(OSError):
            if not path.is_file():
                continue
            data = path.read_bytes()
            if secret.encode() in data:
                found.append(str(path))
            if path.parent.name == "serve":
                access_401 += data.count(b" 401 ")
    return found, access_401


def serve_replica_kill(
    cluster: TwoNodeCluster,
    work: Path,
    model: str,
    port: int,
    clients: int = 4,
    after_s: float = 20.0,
    api_key: str | None = None,
    stop_cluster: bool = False,
    check_guards: bool = False,
) -> dict:
    """``nat-ray serve`` on the cluster, ``clients`` chat clients; the vLLM replica's process SIGKILLed.

    With ``api_key``, the server starts with it as ``$NAT_RAY_API_KEY``, the clients send it, and
    after recovery :func:`knock` tries every route without it (``door`` in the figures). With
    ``check_guards`` too, the server starts with :data:`GUARD_LIMITS` and :func:`guards` tries them
    after the door (``guards``).

    The vLLM engine processes below the killed replica must end with it (the orphan guard,
    ``nat_ray/engines/orphan_guard.py``): ``engines_of_killed_replica`` and the seconds until they were
    gone. With ``stop_cluster``, Ctrl-C is pressed at the end while every Ray process of the cluster
    but the engines is SIGKILLed under the shutting-down server (``ray stop --force``, this cluster
    only): every engine process ever seen must be gone shortly after. The cluster is then unusable.

    Recovery is the first request sent after the kill that is answered 200; requests sent before it
    (in flight at the kill or during the restart) count as "during", those sent after it as "after".
    Load goes on ``after_s`` seconds past recovery.

    Returns:
        ``replica`` (the killed process), ``requests``, ``failed_during``, ``failed_after``,
        ``failure_statuses`` (status -> count; 0 = no answer), ``seconds_to_recover``,
        ``ok_after``, ``engines_of_killed_replica``, ``seconds_engines_gone_after_replica_kill``
        (None: some outlived it by :data:`ENGINES_GONE_WITHIN_S`), ``exit_code`` (of the stopped
        server), ``seconds``, ``log``; ``door`` with ``api_key``; with ``stop_cluster``,
        ``cluster_stop``: ``engines_running``, ``ray_processes_killed``, ``seconds_engines_gone``
        (None: some survived), ``engines_seen`` (in the whole scenario); ``guards`` with
        ``check_guards``.
    """
    import requests

    cfg_path = work / "serve.yaml"
    limits = GUARD_LIMITS if check_guards else None
    cfg_path.write_text(yaml.safe_dump(serve_config(model, port, limits)))
    log = work / "serve.log"
    began = time.monotonic()
    env_key = os.environ.pop("NAT_RAY_API_KEY", None)  # the key of this call only, or none
    try:
        extra = {"NAT_RAY_API_KEY": api_key} if api_key else {}
        proc = _driver(cluster, ["serve", "--config", str(cfg_path)], log, **extra)
    finally:
        if env_key is not None:
            os.environ["NAT_RAY_API_KEY"] = env_key
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    door = cluster_stop = guarded = None
    watch = ProcessWatch(cluster)
    replica_engines_gone: dict[str, float | None] = {}
    try:
        _wait("server up", lambda: "nat-ray is serving" in _tail(log), proc, log, 600)
        served = requests.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
        with _Load(url, served, clients, headers) as load:
            _wait("answers before the kill", lambda: load.ok_count() >= 2 * clients, proc, log, 300)
            replicas = _llm_replicas(cluster)
            if len(replicas) != 1:
                raise ScenarioError(f"expected one LLM replica process, found {replicas}")
            pid, title = replicas[0]
            watch.sample()
            with contextlib.suppress(psutil.Error):
                below = {p.pid for p in psutil.Process(pid).children(recursive=True)}
            engines = watch.engines(below)
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            gone = threading.Thread(
                target=lambda: replica_engines_gone.update(
                    s=_gone_within(lambda: not any(_alive(k) for k in engines), ENGINES_GONE_WITHIN_S)
                ),
                daemon=True,
            )
            gone.start()
            recovered_at = None
            deadline = killed_at + 600
            while time.monotonic() < deadline:
                with load.lock:
                    oks = [answered for sent, answered, s in load.results if s == 200 and sent > killed_at]
                if oks:
                    recovered_at = min(oks)
                    break
                time.sleep(0.5)
            if recovered_at is not None:
                time.sleep(after_s)
        results = list(load.results)
        gone.join()
        if api_key and recovered_at is not None:
            door = knock(url, api_key, served)
            if check_guards:
                guarded = guards(url, api_key, served)
        if stop_cluster:
            watch.sample()
            running = len(watch.engines())
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, and the cluster stopped under the server
            killed = watch.kill_ray_but_engines()
            cluster_stop = {
                "engines_running": running,
                "ray_processes_killed": killed,
                "seconds_engines_gone": _gone_within(lambda: not watch.engines(), ENGINES_GONE_WITHIN_S),
                "engines_seen": watch.engines_seen(),
            }
    finally:
        watch.close()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the server shuts Serve down
            try:
                proc.wait(timeout=20 if stop_cluster else 90)  # without its cluster it may not finish
            except subprocess.TimeoutExpired:
                pass
        code = proc.returncode
        _stop_driver(proc)
    first_ok_sent = min((sent for sent, _, s in results if s == 200 and sent > killed_at), default=None)
    during = [s for sent, _, s in results if s != 200 and (first_ok_sent is None or sent < first_ok_sent)]
    after = [s for sent, _, s in results if s != 200 and first_ok_sent is not None and sent >= first_ok_sent]
    return {
        "replica": title,
        "requests": len(results),
        "failed_during": len(during),
        "failed_after": len(after),
        "failure_statuses": dict(Counter(during + after)),
        "seconds_to_recover": round(recovered_at - killed_at, 1) if recovered_at is not None else None,
        "ok_after": sum(1 for sent, _, s in results if s == 200 and first_ok_sent and sent >= first_ok_sent),
        "engines_of_killed_replica": len(engines),
        "seconds_engines_gone_after_replica_kill": replica_engines_gone.get("s"),
        **({"cluster_stop": cluster_stop} if stop_cluster else {}),
        "exit_code": code,
        "seconds": round(time.monotonic() - began, 1),
        **({"door": door} if api_key else {}),
        **({"guards": guarded} if check_guards else {}),
        "log": _tail(log, 2500),
    }
