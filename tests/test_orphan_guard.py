"""``nat_ray.engines.orphan_guard``: a process that ``multiprocessing`` started ends when its parent dies.

Real processes, the way vLLM's engine core is started from a serving replica: a "replica" process
spawns a child that loads the guard (as vLLM loads its general plugins), then the replica is
SIGKILLed. No vLLM here (``tests/integration/test_faults.py`` checks the real engine in its serving scenario).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from importlib.metadata import entry_points
from pathlib import Path

import psutil
import pytest

from nat_ray.engines import orphan_guard

REPLICA = textwrap.dedent(
    """
    import multiprocessing, os, signal, sys, time
    from nat_ray.engines import orphan_guard


    def engine_core(pid_file, ignore_term):
        orphan_guard.CHECK_INTERVAL_S, orphan_guard.GRACE_S = 0.1, 1.0
        if ignore_term == "1":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a child stuck in its shutdown
        orphan_guard.register()
        orphan_guard.register()  # vLLM may load plugins more than once: one watcher
        open(pid_file, "w").write(str(os.getpid()))
        while True:
            time.sleep(1)


    if __name__ == "__main__":
        child = multiprocessing.get_context("spawn").Process(target=engine_core, args=sys.argv[1:])
        child.start()
        child.join()
    """
)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pid: int, timeout_s: float) -> float | None:
    began = time.monotonic()
    while time.monotonic() - began < timeout_s:
        if not alive(pid):
            return time.monotonic() - began
        time.sleep(0.05)
    return None


@pytest.mark.parametrize("ignore_term", ["0", "1"], ids=["sigterm", "sigkill-after-grace"])
def test_a_child_outlives_its_killed_parent_by_at_most_the_grace_period(tmp_path, ignore_term):
    script = tmp_path / "replica.py"
    script.write_text(REPLICA)
    pid_file = tmp_path / "child.pid"
    replica = subprocess.Popen([sys.executable, str(script), str(pid_file), ignore_term])
    child = None
    try:
        deadline = time.monotonic() + 60
        while not pid_file.is_file() or not pid_file.read_text():
            assert replica.poll() is None and time.monotonic() < deadline, "the child never started"
            time.sleep(0.05)
        child = int(pid_file.read_text())
        assert psutil.Process(child).ppid() == replica.pid
        time.sleep(0.5)
        assert alive(child)  # the guard leaves a child with a live parent alone
        os.kill(replica.pid, signal.SIGKILL)
        replica.wait()
        took = wait_gone(child, 15)
        assert took is not None, "the orphan kept running"
        assert took < (0.5 if ignore_term == "0" else 3.0) + 1.0
    finally:
        replica.kill()
        if child and alive(child):
            os.kill(child, signal.SIGKILL)


def test_a_process_no_multiprocessing_parent_started_is_left_alone(monkeypatch):
    started = []
    monkeypatch.setattr(orphan_guard, "watch_parent", lambda *a: started.append(a))
    monkeypatch.setattr(orphan_guard, "_started", False)
    orphan_guard.register()  # pytest itself: started by a shell, not by multiprocessing
    assert started == []


def test_vllm_finds_the_guard_as_a_general_plugin():
    (entry,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "nat_ray_orphan_guard"]
    assert entry.load() is orphan_guard.register
    assert Path(orphan_guard.__file__).name == "orphan_guard.py"
