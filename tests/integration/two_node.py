"""A real two-node Ray cluster on this machine, and the node kills the fault scenarios need.

The head (127.0.0.1) and the worker node (127.0.0.2: loopback answers the whole 127/8, so each
raylet has an address of its own and a driver started here always joins the head) are two
``ray start --block`` processes, each in its own process group, with private ports, a private
temp dir and token authentication on (``RAY_AUTH_MODE=token``, a token file of this cluster's own
named by ``RAY_AUTH_TOKEN_PATH``, so the machine's ``~/.ray/auth_token`` is neither read nor
overwritten). Drivers are subprocesses given :meth:`TwoNodeCluster.env`.

Nothing here stops Ray with ``ray stop`` (it would stop every Ray on the machine, other people's
too): the cluster's own processes are killed, found by process group, by descent from the two
``ray start`` processes, and by their temp dir.

Used by ``tests/integration/test_faults.py`` and ``benchmarks/faults.py`` (through
``integration/fault_scenarios.py``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from helpers import SHARED_MACHINE_ENV, free_ports, kill_processes_under  # tests/helpers.py

# The environment the tests run in: `ray` and `python` resolve here, for the nodes and the drivers.
BIN_DIR = Path(sys.executable).parent
HEAD_IP = "127.0.0.1"
WORKER_IP = "127.0.0.2"
# The GCS marks a node dead after ~3 missed 1 s health checks instead of 5 missed 3 s ones, so a
# killed node's work is rescheduled seconds after the kill, as on a cluster that watches closely.
FAST_DEATH = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


class ClusterError(RuntimeError):
    """The test cluster did not come up or could not be taken down."""


def _node_ports() -> list[str]:
    """Every port a node opens, free a moment ago (defaults such as 52365 may be taken by others)."""
    node, obj, agent_http, agent_grpc, runtime_env, metrics, low = free_ports(7)
    return [
        f"--node-manager-port={node}",
        f"--object-manager-port={obj}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--metrics-export-port={metrics}",
    ]


class Node:
    """One ``ray start --block`` process (its own process group) and its log."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.cmd = cmd
        self.env = env
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.tree: set[int] = set()  # pids seen below ``proc`` (raylet, workers, engines)

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def processes(self) -> list[psutil.Process]:
        """The ``ray start`` process and everything below it now (remembered for :meth:`kill`)."""
        if not self.alive():
            return []
        try:
            root = psutil.Process(self.proc.pid)
            found = [root, *root.children(recursive=True)]
        except psutil.Error:
            return []
        self.tree.update(p.pid for p in found)
        return found

    def cmdlines(self) -> list[str]:
        out = []
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                out.append(" ".join(p.cmdline()))
        return out

    def survivors(self) -> list[int]:
        """Pids seen below this node that still run (after :meth:`kill`: none, or the kill missed some)."""
        alive = []
        for pid in sorted(self.tree):
            with contextlib.suppress(psutil.Error):
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
        return alive

    def kill(self) -> list[int]:
        """SIGKILL the node: its process group, then every process ever seen below it.

        The raylet starts its workers in the ``ray start`` process group (checked by
        ``test_faults``), but a worker may start a session of its own (vLLM's engine core), so the
        process tree is killed too, pid by pid, after the group.

        Returns:
            the pids that were alive and were killed.
        """
        procs = self.processes()
        killed = []
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in sorted(self.tree | {p.pid for p in procs}):
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                proc.kill()
                killed.append(pid)
        with contextlib.suppress(psutil.Error):
            psutil.wait_procs([p for p in procs if p.is_running()], timeout=10)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        return killed


class TwoNodeCluster:
    """Head and worker node, each ``--num-cpus`` with a custom resource naming it (``head`` / ``worker_node``)."""

    def __init__(
        self, head_cpus: int = 4, worker_cpus: int = 2, object_store_bytes: int = 200_000_000
    ) -> None:
        # Short: Ray's unix socket paths must fit in 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="natflt-", dir="/tmp")
        self.gcs_port, self.client_port = free_ports(2)
        self.address = f"{HEAD_IP}:{self.gcs_port}"
        self.token_file = Path(self.temp_dir) / "auth_token"
        self.token_file.write_text(secrets.token_hex(32))
        self.token_file.chmod(0o600)
        self.head_cpus = head_cpus
        self.worker_cpus = worker_cpus
        self.object_store_bytes = object_store_bytes
        self.head: Node | None = None
        self.worker: Node | None = None
        self.workers_started = 0

    # -- environment -----------------------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a node or a driver of this cluster (token auth on, this cluster's token)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
        env.pop("RAY_API_SERVER_ADDRESS", None)
        env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}"
        env.update(SHARED_MACHINE_ENV)
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN_PATH"] = str(self.token_file)
        env.update(extra)
        return env

    def driver_env(self, **extra: str) -> dict[str, str]:
        return self.env(RAY_ADDRESS=self.address, **extra)

    # -- start / stop ----------------------------------------------------------------------

    def start(self, timeout_s: float = 180.0) -> TwoNodeCluster:
        cmd = [
            "ray",
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            f"--temp-dir={self.temp_dir}",
            f"--node-ip-address={HEAD_IP}",
            f"--port={self.gcs_port}",
            f"--ray-client-server-port={self.client_port}",
            "--include-dashboard=false",
            f"--num-cpus={self.head_cpus}",
            '--resources={"head": 1}',
            f"--object-store-memory={self.object_store_bytes}",
            *_node_ports(),
        ]
        self.head = Node("head", cmd, self.env(**FAST_DEATH), Path(self.temp_dir) / "head.log")
        self.head.start()
        self._wait_nodes(1, timeout_s)
        self.start_worker(timeout_s)
        return self

    def start_worker(self, timeout_s: float = 180.0) -> None:
        """A (fresh) worker node joined to the head; waits until the head counts it."""
        self.workers_started += 1
        cmd = [
            "ray",
            "start",
            "--block",
            "--disable-usage-stats",
            f"--address={self.address}",
            f"--node-ip-address={WORKER_IP}",
            f"--num-cpus={self.worker_cpus}",
            '--resources={"worker_node": 1}',
            f"--object-store-memory={self.object_store_bytes}",
            *_node_ports(),
        ]
        log = Path(self.temp_dir) / f"worker-{self.workers_started}.log"
        self.worker = Node("worker", cmd, self.env(), log)
        self.worker.start()
        self._wait_nodes(2, timeout_s)

    def alive_nodes(self) -> int:
        """Nodes the head's GCS counts as alive (asked through the CLI: this process stays out of Ray)."""
        script = "import ray; ray.init(log_to_driver=False); print(sum(1 for n in ray.nodes() if n['Alive']))"
        try:
            out = subprocess.run(
                [sys.executable, "-c", script],
                env=self.driver_env(),
                capture_output=True,
                text=True,
                timeout=60,
            )
        except subprocess.TimeoutExpired:
            return -1
        lines = out.stdout.strip().splitlines()
        return int(lines[-1]) if out.returncode == 0 and lines and lines[-1].isdigit() else -1

    def _wait_nodes(self, n: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for node in (self.head, self.worker):
                if node is not None and node.proc is not None and not node.alive():
                    raise ClusterError(f"ray start ({node.name}) exited:\n{node.output()}")
            if self.alive_nodes() >= n:
                return
            time.sleep(1)
        raise ClusterError(f"the cluster did not reach {n} nodes in {timeout_s:.0f} s:\n{self.head.output()}")

    def wait_node_dead(self, timeout_s: float = 120.0) -> float:
        """Seconds until the head counts only itself alive (the killed worker node marked dead)."""
        began = time.monotonic()
        while time.monotonic() - began < timeout_s:
            if self.alive_nodes() == 1:
                return time.monotonic() - began
            time.sleep(1)
        raise ClusterError(f"the head still counts the killed node alive after {timeout_s:.0f} s")

    def kill_worker_node(self) -> list[int]:
        """SIGKILL the worker node's raylet and every process of it; returns the pids killed."""
        if self.worker is None:
            return []
        return self.worker.kill()

    def stop(self) -> list[str]:
        """Kill this cluster's processes (and only those), remove its temp dir; returns survivors."""
        for node in (self.worker, self.head):
            if node is not None:
                node.kill()
        return kill_processes_under(self.temp_dir)

    def __enter__(self) -> TwoNodeCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
