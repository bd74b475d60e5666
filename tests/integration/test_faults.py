"""Faults on a real two-node Ray cluster (issue #18): a node lost mid-rollout, mid-training, a replica lost under load.

One :class:`two_node.TwoNodeCluster` (head and worker node as two ``ray start`` processes, token
auth on) serves the module; each scenario (``fault_scenarios.py``, shared with
``benchmarks/faults.py``) runs a stage as a driver joined to it, SIGKILLs the worker node's raylet
and workers mid-run, and a fresh worker node joins before the next one. The serving scenario also
checks that no vLLM engine process outlives its killed replica or the stopped cluster, and, started
with an API key and tight limits, the server's door and guards after it recovered.
"""

from __future__ import annotations

import os
import secrets

import pytest
from helpers import free_port  # tests/helpers.py

from integration.fault_scenarios import (
    GUARD_LIMITS,
    files_holding,
    rollout_node_kill,
    serve_replica_kill,
    train_node_kill,
)
from integration.two_node import TwoNodeCluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster():
    with TwoNodeCluster() as two_nodes:
        yield two_nodes
    assert not two_nodes.stop(), "processes of the test cluster survived"


def test_the_worker_node_is_a_node_of_its_own_and_its_kill_takes_all_its_processes(cluster):
    worker = cluster.worker
    processes = worker.processes()
    titles = " ".join(" ".join(p.cmdline()) for p in processes)
    assert "raylet" in titles, titles
    # The raylet and its agents are in the `ray start` process group, so the group kill reaches them.
    assert all(os.getpgid(p.pid) == worker.proc.pid for p in processes)
    assert cluster.alive_nodes() == 2


def test_rollout_survives_losing_a_node_with_no_trajectory_lost_or_twice(cluster, tmp_path, embedded_path):
    got = rollout_node_kill(cluster, tmp_path, embedded_path, limit=8, max_new_tokens=24)
    assert got["engine_on_both_nodes"], got["log"]
    assert got["worker_node_processes_killed"] > 3 and got["worker_node_survivors"] == 0, got
    assert got["exit_code"] == 0, got["log"]
    assert 0 < got["rows_before_kill"] < got["planned"]
    assert got["lost"] == 0 and got["duplicated"] == 0, got
    assert got["written"] == got["planned"]
    assert cluster.alive_nodes() == 2  # a fresh worker node joined for the next scenario


def test_training_restarts_from_its_checkpoint_after_losing_a_node(cluster, tmp_path, embedded_path):
    got = train_node_kill(cluster, tmp_path, embedded_path, steps=4, checkpoint_every=2)
    assert got["workers_on_both_nodes"], got["log"]
    assert got["restarted_by_itself"] and got["exit_code"] == 0, got["log"]
    assert got["final_step"] == got["planned_steps"] == 4
    # The loss curve continues from the checkpoint: every step once, the redone ones replaced.
    assert got["history_steps"] == list(range(1, 5)), got
    assert got["checkpoint_step"] is not None and got["checkpoint_step"] % 2 == 0
    assert got["checkpoint_step"] < got["last_step_before_kill"]
    assert got["steps_redone"] == got["last_step_before_kill"] - got["checkpoint_step"]


def test_a_killed_llm_replica_costs_at_most_503s_and_leaves_no_engine_process(
    cluster, tmp_path, embedded_path
):
    """Last in the module: it stops the cluster under the server at the end."""
    key = secrets.token_urlsafe(24)
    got = serve_replica_kill(
        cluster,
        tmp_path,
        embedded_path,
        free_port(),
        api_key=key,
        stop_cluster=True,
        after_s=5,
        check_guards=True,
    )
    assert got["seconds_to_recover"] is not None, got["log"]
    # The engine core (and model worker) of the killed replica went with it, not orphaned.
    assert got["engines_of_killed_replica"] >= 1, got
    assert got["seconds_engines_gone_after_replica_kill"] is not None, got
    # Ctrl-C with the cluster stopped under the server: no engine process, old or new, survives.
    stop = got["cluster_stop"]
    assert stop["engines_running"] >= 1 and stop["ray_processes_killed"] > 3, stop
    assert stop["seconds_engines_gone"] is not None, stop
    assert stop["engines_seen"] > got["engines_of_killed_replica"], stop  # the restarted replica's too
    assert set(got["failure_statuses"]) <= {503}, got  # retryable, never a 500 or a dropped connection
    assert got["failed_after"] == 0 and got["ok_after"] > 0, got
    # The restarted server still wants the key: every call without it is a 401, every route answers with it.
    door = got["door"]
    assert door["calls_without_key"] > 20 and door["answered_401"] == door["calls_without_key"], door
    assert all(r["as_expected"] for r in door["with_key"].values()), door
    assert door["openai_client"]["its_key_answers"], door
    # The restarted server keeps its limits (serve.* in GUARD_LIMITS).
    guards = got["guards"]
    assert guards["challenge"] == {"www_authenticate": "Bearer", "code": 401}, guards
    role = guards["unknown_role"]  # refused before anything is generated
    assert role["status"] == 400 and role["param"] == "messages.0.role" and "wizard" in role["message"], role
    assert role["seconds"] < 10, role
    cap = GUARD_LIMITS["max_tokens_limit"]
    for route, answer in guards["uncapped"].items():  # no max_tokens: the server's cap, not the context
        assert answer["status"] == 200 and 0 < answer["completion_tokens"] <= cap, (route, answer)
    body = guards["body_413"]
    assert body["status"] == 413 and "serve.max_body_bytes" in body["message"], body
    assert body["chunked_status"] == 413 and body["health_after"] == 200, body
    episodes = guards["episode_429"]  # one episode at a time, no queue: the second is told to retry
    assert episodes["first_was_running"] and episodes["second_status"] == 429, episodes
    assert episodes["retry_after"] >= 1 and "serve.max_concurrent_episodes" in episodes["message"], episodes
    assert episodes["first_status"] == 200 and episodes["third_status"] == 200, episodes
    assert guards["streamed_pieces"] >= 2, guards
    # The key is in no file of the cluster's (logs included), though Serve logged the refused calls.
    holding, access_401 = files_holding(cluster.temp_dir, key)
    assert holding == [] and access_401 > 0, (holding, access_401)
