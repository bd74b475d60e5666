"""vLLM engine processes that end when the process that started them is gone.

vLLM's multiprocess mode (what ``ray.serve.llm`` runs) starts an engine-core process
(``VLLM::EngineCore``) from the serving replica, and that starts model workers (``VLLM::Worker``).
A worker notices its engine core's death (vLLM's death pipe), but the engine core waits on its
ZeroMQ socket for a front end that may never come back: when the replica's Ray worker is killed, or
the whole local cluster is stopped under it, the engine core is re-parented to init and keeps
polling (about 40% of a core, and on a GPU its memory, so a restarted replica cannot start). Ray's
raylet kills a dead worker's children only while the raylet itself lives, and
``prctl(PR_SET_PDEATHSIG)`` fires when the *thread* that started the child ends, which in a Ray
actor is not the replica's lifetime.

So every vLLM process that a ``multiprocessing`` parent started watches that parent's pid, and
when it is re-parented (the parent died) it stops itself: SIGTERM first (vLLM's own shutdown, which
releases its shared memory), SIGKILL after a grace period. It is a vLLM general plugin (the
``vllm.general_plugins`` entry point in ``pyproject.toml``), which vLLM loads in its engine-core and
worker processes; in a process no ``multiprocessing`` parent started (a Ray worker, the driver) it
does nothing.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 1.0
GRACE_S = 10.0
_started = False


def watch_parent(
    parent_pid: int,
    interval_s: float = CHECK_INTERVAL_S,
    grace_s: float = GRACE_S,
    stop: Callable[[int], None] | None = None,
) -> threading.Thread:
    """Start a daemon thread that stops this process once its parent is no longer ``parent_pid``.

    Args:
        parent_pid: the parent this process must outlive no longer than ``interval_s``.
        stop: called with the signal to send to this process (default: ``os.kill`` of itself).
    """
    stop = stop or (lambda sig: os.kill(os.getpid(), sig))

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval_s)
        log.warning(
            "parent process %d is gone (now %d): stopping %d, vLLM's work for it is over",
            parent_pid,
            os.getppid(),
            os.getpid(),
        )
        stop(signal.SIGTERM)
        time.sleep(grace_s)
        stop(signal.SIGKILL)

    thread = threading.Thread(target=watch, name="nat-ray-orphan-guard", daemon=True)
    thread.start()
    return thread


def register() -> None:
    """vLLM general plugin: watch the ``multiprocessing`` parent, once per process, if there is one."""
    global _started
    parent = multiprocessing.parent_process()
    if _started or parent is None or parent.pid is None:
        return
    _started = True
    watch_parent(parent.pid, CHECK_INTERVAL_S, GRACE_S)
