"""Fault report (issue 18): what a lost node or a lost replica costs each stage, on a real two-node Ray.

Run from the repository root (about 6-8 minutes on the 2-core CPU machine; it starts Ray, so on a
shared machine under the integration lock)::

    flock /tmp/nat_ray_integration.lock timeout 1500 .venv/bin/python benchmarks/faults.py

It runs the scenarios of ``tests/integration/test_faults.py`` -- the same functions
(``tests/integration/fault_scenarios.py``) on the same cluster (``tests/integration/two_node.py``:
head and worker node as two ``ray start`` processes, token auth on) -- and writes
``benchmarks/results/faults.json``, per scenario:

- ``rollout_node_kill``: the worker node (one of the two engine actors) SIGKILLed mid-run;
  trajectories planned, lost and duplicated, seconds from the kill to the end of the run;
- ``train_node_kill``: the worker node (one of the two Ray Train workers) SIGKILLed after a
  checkpoint and a step past it; the step the group restarted from, steps redone, seconds from the
  kill to the resumed step and to the end;
- ``serve_replica_kill``: the server started with ``$NAT_RAY_API_KEY``, the vLLM replica's process
  SIGKILLed under 4 chat clients that send the key; requests failed during and after recovery (and
  their statuses), seconds to recover; then ``door``: every route called without the key (none, a
  wrong one, the key in the query string, the key without ``Bearer``, the OpenAI client with
  another key), how many were answered 401, and each route's answer with the key.
"""

from __future__ import annotations

import json
import secrets
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):  # `python benchmarks/faults.py` from the repo root
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from helpers import free_port  # noqa: E402 - tests/helpers.py
from integration.fault_scenarios import (  # noqa: E402
    rollout_node_kill,
    serve_replica_kill,
    train_node_kill,
)
from integration.two_node import TwoNodeCluster  # noqa: E402
from machine_info import machine  # noqa: E402 - beside this script

RESULTS = ROOT / "benchmarks" / "results" / "faults.json"


def summary(scenarios: dict) -> dict:
    """The issue's done-when, read off the scenarios (None where a scenario did not run)."""
    roll, train, serve = (
        scenarios.get(k, {}) for k in ("rollout_node_kill", "train_node_kill", "serve_replica_kill")
    )
    door = serve.get("door") or {}
    return {
        "trajectories_lost": roll.get("lost"),
        "trajectories_duplicated": roll.get("duplicated"),
        "training_finished_from_checkpoint": (
            bool(train.get("restarted_by_itself")) and train.get("final_step") == train.get("planned_steps")
            if train and "error" not in train
            else None
        ),
        "training_steps_redone": train.get("steps_redone"),
        "requests_failed_after_recovery": serve.get("failed_after"),
        "calls_without_key": door.get("calls_without_key"),
        "calls_without_key_answered_401": door.get("answered_401"),
    }


def main() -> int:
    from nat_ray.models import ensure_embedded

    model = str(ensure_embedded())
    began = time.monotonic()
    scenarios = {}
    with tempfile.TemporaryDirectory(prefix="nat-faults-") as tmp, TwoNodeCluster() as cluster:
        work = Path(tmp)
        runs = {
            "rollout_node_kill": lambda d: rollout_node_kill(cluster, d, model),
            "train_node_kill": lambda d: train_node_kill(cluster, d, model, steps=6, checkpoint_every=2),
            "serve_replica_kill": lambda d: serve_replica_kill(
                cluster, d, model, free_port(), api_key=secrets.token_urlsafe(24)
            ),
        }
        for name, run in runs.items():
            folder = work / name
            folder.mkdir()
            try:
                got = run(folder)
            except Exception as err:  # noqa: BLE001 - one failed scenario is a figure of the report too
                got = {"error": f"{type(err).__name__}: {err}"[:3000]}
            got.pop("log", None)
            scenarios[name] = got
            print(name, json.dumps(got), flush=True)
    result = {
        "benchmark": "faults",
        "date": datetime.now().isoformat(timespec="seconds"),
        "cluster": "two ray start nodes on one machine: head 4 CPUs, worker node 2 CPUs, token auth",
        "summary": summary(scenarios),
        "scenarios": scenarios,
        "seconds": round(time.monotonic() - began, 1),
        "machine": machine(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0 if all("error" not in s for s in scenarios.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
