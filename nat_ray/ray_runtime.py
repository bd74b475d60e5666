"""Joining a Ray cluster, or starting a local one: the one way every stage does it."""

from __future__ import annotations

import os


def init_ray(min_cpus: float, worker_logs: bool = False) -> None:
    """Join ``RAY_ADDRESS``'s cluster, or start a local Ray with at least ``min_cpus`` logical CPUs.

    Args:
        min_cpus: logical CPUs the stage's actors and workers reserve together; a local Ray gets
            at least this, the machine's cores, and 4.
        worker_logs: show the workers' output in the driver (training's per-step logs); rollout and
            serving keep the driver's output to their own progress.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=worker_logs)
        return
    # Ray starts its workers at niceness 15, below the raylet, GCS, dashboard and driver. A CPU
    # engine's OpenMP threads wait for each other at every barrier, so each preemption of one
    # stalls all of them (benchmarks/rollout.py: the stage ran 3-20% slower at 15). Only a Ray
    # started here gets this; a cluster keeps its own setting.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=max(int(min_cpus + 0.999), os.cpu_count() or 1, 4), log_to_driver=worker_logs)
