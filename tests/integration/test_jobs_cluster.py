"""Jobs and cluster (issue #9), on real Ray processes started as a user would start them.

1. ``ray job submit`` end to end, with token authentication on and the README's commands as a user
   types them: ``export RAY_AUTH_MODE=token``, ``.venv/bin/ray get-auth-token --generate``,
   ``.venv/bin/ray start --head`` (with its own ports and temp dir), then ``.venv/bin/ray job submit
   --working-dir . -- "$PWD/.venv/bin/python" jobs/rollout.py ...``. ``PATH`` holds no venv, so a
   bare ``python`` in the entrypoint would be the system's; a submit without the token is refused.
   The job is a real stage-1 rollout (Ray Data engine actor, calculator tool actor, Parquet out)
   whose "teacher" is a tiny OpenAI-compatible server in this test, so no vLLM is started.
2. Autoscaling: a head with one CPU and the worker node types of the project's ``cluster.yaml``
   (names, resources, ``min_workers: 0``) on Ray's fake multi-node provider; work that the head
   cannot hold makes the autoscaler start worker nodes from zero, and the work runs on them.

Both clusters are private: free ports, a temp dir of their own (short, because Ray's unix socket
paths must fit in 107 bytes) holding their own token (``RAY_AUTH_TOKEN_PATH``, so the user's
``~/.ray/auth_token`` is neither read nor written). They are stopped by killing the
process group of ``ray start --block`` and then anything left whose command line or working dir
is inside that temp dir -- never ``ray stop``, which would stop every Ray on the machine (this is
also why Ray's ``AutoscalingCluster`` is not used: its start and shutdown run ``ray stop --force``,
and Ray 2.60's wheel lacks the ``fake_multi_node/example.yaml`` it reads).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from helpers import HttpRequest, free_port, free_ports, kill_processes_under, serve_http  # tests/helpers.py

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# The environment the tests run in (the README's `.venv/bin`): named by path, never found on PATH.
BIN_DIR = Path(sys.executable).parent
RAY = str(BIN_DIR / "ray")
PYTHON = str(BIN_DIR / "python")
# What the README has a user type; the test below runs these, with its own ports and teacher.
README_COMMANDS = (
    "export RAY_AUTH_MODE=token",
    ".venv/bin/ray get-auth-token --generate > /dev/null",
    ".venv/bin/ray start --head",
    '.venv/bin/ray job submit --working-dir . -- "$PWD/.venv/bin/python" jobs/rollout.py',
)


def _env(token_path: str | Path, **extra: str) -> dict[str, str]:
    """A user's shell after the README's ``export RAY_AUTH_MODE=token``; no venv on ``PATH``."""
    drop = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    path = [d for d in env.get("PATH", "/usr/bin:/bin").split(os.pathsep) if Path(d) != BIN_DIR]
    env["PATH"] = os.pathsep.join(path)
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    env.update(extra)
    return env


class RayHead:
    """``ray start --head --block`` in its own process group, with private ports and temp dir."""

    def __init__(self, *args: str, **env: str) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="natray-", dir="/tmp")
        self.token_path = Path(self.temp_dir) / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        self.gcs_port, client, agent_http, agent_grpc, runtime_env, metrics = free_ports(6)
        self.log = Path(self.temp_dir) / "ray-start.log"
        self.cmd = [
            RAY,
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            f"--temp-dir={self.temp_dir}",
            f"--port={self.gcs_port}",
            f"--ray-client-server-port={client}",
            # Fixed by default (52365 ...): another cluster on the machine may hold them.
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--metrics-export-port={metrics}",
            "--object-store-memory=200000000",
            *args,
        ]
        self.env = _env(self.token_path, **env)
        self.proc: subprocess.Popen | None = None

    def ray_cli(self, *args: str, timeout_s: float = 300, **env: str) -> subprocess.CompletedProcess:
        """``.venv/bin/ray <args>`` from the repo, in this cluster's user shell."""
        return subprocess.run(
            [RAY, *args], env={**self.env, **env}, capture_output=True, text=True, timeout=timeout_s, cwd=REPO
        )

    def __enter__(self) -> RayHead:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        return self

    def __exit__(self, exc_type, *exc) -> None:
        left = self.stop()
        if exc_type is None:
            assert not left, f"processes of the test cluster survived: {left}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-5000:]

    def wait_started(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if "Ray runtime started" in self.output():
                return
            assert self.proc.poll() is None, f"ray start exited with {self.proc.returncode}:\n{self.output()}"
            time.sleep(0.5)
        pytest.fail(f"ray start --head did not come up in {timeout_s:.0f} s:\n{self.output()}")

    def stop(self) -> list[str]:
        """Stop every process of this cluster (and only those), then remove its temp dir.

        Returns:
            the command lines of processes that survived (none, normally).
        """
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        # Job drivers start their own sessions, and raylets may move workers to new groups:
        # whatever still runs from this temp dir is this cluster's.
        return kill_processes_under(self.temp_dir)


# --------------------------------------------------------------------------------------------
# 1. ray job submit


class _Teacher:
    """An OpenAI-compatible chat server that plays a ReAct agent: calculate, then finish."""

    def __init__(self) -> None:
        self.url = ""
        self.requests: list[dict] = []

    def handle(self, request: HttpRequest) -> tuple[int, object, dict]:
        if request.method == "GET":  # /v1/models
            return 200, {"object": "list", "data": [{"id": "teacher", "object": "model"}]}, {}
        body = request.json()
        self.requests.append(body)
        if body["messages"][-1]["content"].startswith("Observation:"):
            text = "Thought: The calculator says 42.\nAction: finish[42]"
        else:
            text = "Thought: I multiply the two numbers.\nAction: calculate[6 * 7]"
        completion = {
            "id": "cmpl-1",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 10},
        }
        return 200, completion, {}


@pytest.fixture
def teacher():
    teacher = _Teacher()
    with serve_http(teacher.handle) as url:
        teacher.url = url
        yield teacher


def _wait_http(url: str, head: RayHead, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {head.token_path.read_text()}"})
    while time.monotonic() < deadline:
        assert head.proc.poll() is None, f"ray start exited:\n{head.output()}"
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        time.sleep(1)
    pytest.fail(f"{url} did not answer in {timeout_s:.0f} s:\n{head.output()}")


def test_ray_job_submit_runs_a_rollout_job_end_to_end(tmp_path, teacher):
    from nat_ray.core import nat_data as columns
    from nat_ray.core import records
    from nat_ray.rollout.run import PARTS_DIR

    dashboard_port = free_port()
    address = f"http://127.0.0.1:{dashboard_port}"
    out = tmp_path / "rollout"
    submission_id = f"nat-ray-test-{uuid.uuid4().hex[:8]}"
    readme = (REPO / "README.md").read_text()
    assert all(command in readme for command in README_COMMANDS), "the README's job commands changed"
    entrypoint = [
        PYTHON,  # the README's "$PWD/.venv/bin/python", expanded by the user's shell
        "jobs/rollout.py",
        "--config",
        "configs/rollout.yaml",
        "--tasks",
        "gsm8k",
        "--limit",
        "2",
        "--output-dir",
        str(out),  # the job runs in an unpacked copy of the working dir: absolute paths only
        "--set",
        "engine.backend=openai",
        "--set",
        "engine.model=teacher",
        "--set",
        f"engine.base_url={teacher.url}/v1",
        "--set",
        "rollout.temperatures=[0.0]",
        "--set",
        "rollout.num_calculators=1",
    ]
    with RayHead(
        "--num-cpus=2",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
    ) as head:
        # A fresh user has no token yet; the README makes one first (here: into the cluster's own
        # file, which RayHead already filled, so this must keep it, not replace it).
        token = head.token_path.read_text()
        generate = head.ray_cli("get-auth-token", "--generate")
        assert generate.returncode == 0 and generate.stdout == token, generate
        head.wait_started()
        _wait_http(f"{address}/api/version", head)
        # The dashboard answers before the head's job agent has registered; until then a
        # submission fails with "No available agent to submit job" and nothing is created.
        deadline = time.monotonic() + 120
        while True:
            submit = head.ray_cli(
                "job",
                "submit",
                "--address",
                address,
                "--submission-id",
                submission_id,
                "--working-dir",
                str(REPO),  # .gitignore keeps .venv and runs/ out of the upload
                "--",
                *entrypoint,
            )
            output = submit.stdout + submit.stderr
            if "No available agent" not in output or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert submit.returncode == 0, output[-5000:]
        # Through the CLI only: Ray reads RAY_AUTH_MODE once per process, and this pytest
        # process's own local clusters use another token.
        status = head.ray_cli("job", "status", "--address", address, submission_id)
        assert f"Job '{submission_id}' succeeded" in status.stdout + status.stderr, status
        job_logs = head.ray_cli("job", "logs", "--address", address, submission_id)
        logs = job_logs.stdout + job_logs.stderr
        # main_rollout's closing line, printed by the job's driver.
        assert "2 trajectories in" in logs and "2 generated now" in logs, logs[-3000:]

        # The cluster's door: no token, or another one, and nothing is listed or submitted.
        wrong = head.token_path.with_name("wrong_token")
        wrong.write_text(secrets.token_hex(32))
        for env, why in (
            ({"RAY_AUTH_TOKEN_PATH": str(wrong)}, "Invalid authentication token"),
            ({"RAY_AUTH_TOKEN_PATH": str(wrong.with_name("none"))}, ""),
        ):
            refused = head.ray_cli("job", "list", "--address", address, timeout_s=60, **env)
            text = refused.stdout + refused.stderr
            assert refused.returncode != 0 and "uthentication" in text and why in text, text[-3000:]

    rows = records.read_rows(out / PARTS_DIR)
    assert len(rows) == 2
    for row in rows:
        assert (
            row[columns.TASK] == "gsm8k"
            and row[columns.ENGINE] == "openai"
            and row[columns.MODEL] == "teacher"
        )
        assert row[columns.FINISHED] and row[columns.ANSWER] == "42" and row[columns.TURNS] == 2
    # Both episodes called the calculator (a tool actor on the cluster) and saw its result.
    last = [r["messages"][-1]["content"] for r in teacher.requests]
    assert len(last) == 4 and last.count("Observation: 42") == 2, last


# --------------------------------------------------------------------------------------------
# 2. Autoscaling from zero with cluster.yaml's node types


def _fake_autoscaling_config(gcs_address: str) -> tuple[dict, dict]:
    """cluster.yaml's cluster, on the fake multi-node provider; returns (config, cluster.yaml)."""
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    worker_types = {}
    for name, spec in cluster["available_node_types"].items():
        if name == cluster["head_node_type"]:
            continue
        worker_types[name] = {
            # The AWS provider adds the instance's own CPUs/GPUs/memory to these at `ray up`;
            # a fake node gets one CPU unless cluster.yaml sets more, and a small object store.
            "resources": {"CPU": 1, **spec["resources"], "object_store_memory": 100_000_000},
            "node_config": {},
            "min_workers": spec["min_workers"],
            "max_workers": min(spec["max_workers"], 2),  # a laptop's share of the real ceiling
        }
    config = {
        "cluster_name": "nat-ray-fake",
        "max_workers": 4,
        "upscaling_speed": cluster["upscaling_speed"],
        "idle_timeout_minutes": cluster["idle_timeout_minutes"],
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,  # not the default :6379, which another cluster may own
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": {
            **worker_types,
            # The fake provider names its head type this way; cluster.yaml's head has no GPU.
            "ray.head.default": {"resources": {"CPU": 1, "GPU": 0}, "node_config": {}, "max_workers": 0},
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }
    return config, cluster


# The driver runs in its own process: Ray reads RAY_AUTH_MODE and the token once per process, and
# this cluster's token is not the one the other test modules' local clusters use.
_AUTOSCALE_DRIVER = """
import json, sys
import ray

gcs_address, wide_cpus = sys.argv[1], float(sys.argv[2])


@ray.remote
def where() -> str:
    return ray.get_runtime_context().get_node_id()


ray.init(address=gcs_address, log_to_driver=False)
before = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
had_a100 = "accelerator_type:A100" in ray.cluster_resources()
# Work pinned to A100s (Ray's accelerator_type option asks for the resource that cluster.yaml's
# a100 type advertises) and work wider than the head's one CPU.
on_a100 = where.options(accelerator_type="A100").remote()
wide = where.options(num_cpus=wide_cpus).remote()
a100_node, cpu_node = ray.get([on_a100, wide], timeout=240)
nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
print("RESULT " + json.dumps({
    "before": before, "had_a100": had_a100, "a100_node": a100_node, "cpu_node": cpu_node,
    "nodes": nodes, "cpus": ray.cluster_resources()["CPU"],
}))
ray.shutdown()
"""


def test_cluster_yaml_worker_types_autoscale_from_zero():
    from ray._private.services import get_node_ip_address

    head = RayHead(
        "--num-cpus=1",
        "--num-gpus=0",
        "--include-dashboard=false",
        RAY_FAKE_CLUSTER="1",
        AUTOSCALER_UPDATE_INTERVAL_S="1",
    )
    gcs_address = f"{get_node_ip_address()}:{head.gcs_port}"
    config, cluster = _fake_autoscaling_config(gcs_address)
    config_path = Path(head.temp_dir) / "autoscaling.json"
    config_path.write_text(json.dumps(config))
    head.cmd.append(f"--autoscaling-config={config_path}")
    a100, cpu = cluster["available_node_types"]["a100"], cluster["available_node_types"]["cpu"]
    assert a100["min_workers"] == cpu["min_workers"] == 0

    with head:
        head.wait_started()
        run = subprocess.run(
            [sys.executable, "-c", _AUTOSCALE_DRIVER, gcs_address, str(cpu["resources"]["CPU"])],
            env=head.env,
            capture_output=True,
            text=True,
            timeout=400,
        )
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
    (line,) = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
    got = json.loads(line[len("RESULT ") :])
    assert len(got["before"]) == 1 and not got["had_a100"]  # min_workers 0: only the head
    nodes = got["nodes"]
    assert len(nodes) == 3, nodes
    assert got["a100_node"] != got["cpu_node"]
    assert nodes[got["a100_node"]]["accelerator_type:A100"] == 1
    assert nodes[got["cpu_node"]]["CPU"] == cpu["resources"]["CPU"]
    assert got["cpus"] == 1 + 1 + cpu["resources"]["CPU"]
