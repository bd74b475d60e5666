"""No vLLM engine process outlives ``nat-ray serve``: a replica killed, then the cluster stopped under it.

``nat-ray serve`` runs as a user runs it (a subprocess starting its own local Ray and the vLLM
engine through ray.serve.llm on the embedded model). Then, as measured on the issue: the LLM
replica's Ray worker is SIGKILLed (its engine core and model worker must go with it), and Ctrl-C
is pressed, once Serve has started a new engine, while the session's raylet, GCS and Ray workers
are SIGKILLed (what ``ray stop --force``
does, limited to this test's own processes: other people's clusters share the machine). Every vLLM
process this session ever started must be gone shortly after.

Which processes are this session's: a watcher samples, every 0.2 s, the descendants of the
``nat-ray serve`` process and of every process it has seen descend from it (an orphaned replica is
re-parented away from the tree but keeps being watched), so an engine process is recorded while
it is still a descendant, before anything is killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from helpers import SHARED_MACHINE_ENV, free_port  # tests/helpers.py

from nat_ray.paths import PACKAGE_DATA_DIR

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SAMPLE_CORPUS = str(PACKAGE_DATA_DIR / "hotpotqa" / "corpus_sample.jsonl.gz")
ENGINE_MARKS = ("VLLM::", "EngineCore")
RAY_MARKS = ("raylet", "gcs_server", "default_worker.py", "ray::", "dashboard", "log_monitor", "monitor.py")
GONE_WITHIN_S = 30  # the guard checks every second and escalates to SIGKILL after 10 s


def _cmdline(p: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(p.cmdline()) or p.name()
    return ""


def is_engine(p: psutil.Process) -> bool:
    text = _cmdline(p)
    with contextlib.suppress(psutil.Error):
        text += " " + p.name()
    return any(mark in text for mark in ENGINE_MARKS)


def alive(key: tuple[int, float]) -> bool:
    """Whether the process ``(pid, create_time)`` still runs (a reused pid is another process)."""
    pid, created = key
    try:
        p = psutil.Process(pid)
        return p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Session:
    """Every process that descends (or descended) from one root, sampled in the background."""

    def __init__(self, root: int) -> None:
        self.seen: dict[tuple[int, float], str] = {}
        self.roots = {root}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(0.2)

    def sample(self) -> None:
        for pid in list(self.roots):
            try:
                children = psutil.Process(pid).children(recursive=True)
            except psutil.Error:
                continue
            for child in children:
                with contextlib.suppress(psutil.Error):
                    key = (child.pid, child.create_time())
                    # A spawned process renames itself (VLLM::EngineCore) after it starts: look again.
                    if not self.seen.get(key, "").endswith("[engine]"):
                        self.seen[key] = _cmdline(child) + (" [engine]" if is_engine(child) else "")
                    self.roots.add(child.pid)

    def engines(self, live_only: bool = True) -> dict[tuple[int, float], str]:
        return {k: v for k, v in self.seen.items() if v.endswith("[engine]") and (alive(k) or not live_only)}

    def live(self) -> list[psutil.Process]:
        found = []
        for key in list(self.seen):
            with contextlib.suppress(psutil.Error):
                if alive(key):
                    found.append(psutil.Process(key[0]))
        return found

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def wait_until(predicate, timeout_s: float, every_s: float = 0.2) -> float | None:
    began = time.monotonic()
    while time.monotonic() - began < timeout_s:
        if predicate():
            return time.monotonic() - began
        time.sleep(every_s)
    return None


def test_no_engine_process_survives_a_killed_replica_or_a_stopped_cluster(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "NAT_RAY_API_KEY")}
    env.update(SHARED_MACHINE_ENV)
    log = tmp_path / "serve.log"
    cmd = [
        str(Path(sys.executable).parent / "nat-ray"),
        "serve",
        "--config",
        "configs/serve.yaml",
        "--port",
        str(port),
        "--set",
        "engine.max_num_seqs=4",
        "--set",
        f"tools.search_corpus={SAMPLE_CORPUS}",
        "--set",
        "serve.tool_max_replicas=1",
    ]
    with open(log, "wb") as out:
        serve = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    session = Session(serve.pid)
    try:
        ready = wait_until(lambda: "nat-ray is serving at" in log.read_text(errors="replace"), 300, 1)
        assert ready is not None and serve.poll() is None, log.read_text(errors="replace")[-5000:]
        session.sample()
        first = session.engines()
        assert any("EngineCore" in v for v in first.values()), "\n".join(session.seen.values())

        # 1. The LLM replica's Ray worker (the engine core's parent) is SIGKILLed.
        core = next(psutil.Process(pid) for (pid, _), v in first.items() if "EngineCore" in v)
        replica = core.parent()
        assert replica is not None and any(m in _cmdline(replica) for m in ("ray::", "default_worker")), (
            replica
        )
        os.kill(replica.pid, signal.SIGKILL)
        took = wait_until(lambda: not any(alive(k) for k in first), GONE_WITHIN_S)
        assert took is not None, f"engine processes outlived their killed replica: {session.engines()}"
        print(f"engine gone {took:.1f}s after its replica was killed")
        # Serve replaces the replica, whose new engine must be running when the cluster stops.
        took = wait_until(lambda: any("EngineCore" in v for v in session.engines().values()), 180)
        assert took is not None, "Serve did not start a new engine:\n" + "\n".join(session.seen.values())
        time.sleep(5)  # past its start: the measured orphans were running engines
        print(f"new engine started {took:.1f}s after")

        # 2. Ctrl-C, and the cluster stopped under the shutting-down server (ray stop --force, ours only).
        serve.send_signal(signal.SIGINT)
        session.sample()
        for p in session.live():
            if p.pid != serve.pid and any(mark in _cmdline(p) for mark in RAY_MARKS) and not is_engine(p):
                with contextlib.suppress(psutil.Error):
                    p.kill()
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
        took = wait_until(lambda: not session.engines(), GONE_WITHIN_S)
        assert took is not None, f"engine processes left after the cluster stopped: {session.engines()}"
        print(
            f"every engine gone {took:.1f}s after the cluster was stopped; {len(session.engines(False))} seen"
        )
    finally:
        if serve.poll() is None:
            serve.kill()
        session.close()
        for p in session.live():  # only what this test started
            with contextlib.suppress(psutil.Error):
                p.kill()
