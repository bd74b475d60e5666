"""Hostile plug-in tools through real Ray tool actors and the stepper; tool files shipped to workers.

Each hostile tool (tests/data/plugins/hostile_tools.py) raises, hangs, returns 10 MB, returns a
non-string, or kills its process. Every episode must end recorded (an ``Error:`` observation and
a ``tool error`` on the step, or a failure reason), the run must finish, and the killed actor must
come back. The engine is scripted: the point is the tool side.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import pytest

from nat_ray.config import ToolsConfig
from nat_ray.core.react import TOOL_ERROR, Episode, Generation, Sampling, Stepper

pytestmark = pytest.mark.integration

HOSTILE = Path(__file__).parents[1] / "data" / "plugins" / "hostile_tools.py"
NAMES = ("explode", "hang", "flood", "number", "die")


class _Script:
    """Each episode calls the tool its prompt names, then finishes."""

    def generate(self, conversations, sampling):
        return [
            Generation("Action: finish[1]" if len(c) > 1 else f"Action: {c[0]['content']}[x]", 5, 5)
            for c in conversations
        ]

    def close(self) -> None:
        pass


def _kill(pools) -> None:
    import ray

    for pool in pools.values():  # the session's Ray goes on: free their slots
        for actor in pool:
            ray.kill(actor, no_restart=True)


def test_a_tool_file_reaches_a_worker_where_the_drivers_path_does_not_exist(local_ray, tmp_path):
    import ray

    from nat_ray.tools.actors import ToolActor, actor_runtime_env
    from nat_ray.tools.plugins import runtime_env_for

    folder = tmp_path / "task"
    folder.mkdir()
    tool_file = folder / "nat_shipped_hostile.py"
    shutil.copy(HOSTILE, tool_file)
    spec = f"{tool_file}:where"
    assert runtime_env_for([spec]) == {"py_modules": [str(tool_file)]}  # for ray.init (a job's env)
    env = actor_runtime_env([spec])  # uploaded now: URIs, which an actor's options accept
    assert len(env["py_modules"]) == 1 and env["py_modules"][0].startswith("gcs://"), env
    # The file is gone here, and the worker is told a path that does not exist there (another
    # machine's checkout): it must import the module Ray shipped.
    tool_file.rename(tmp_path / "renamed_away.py")
    elsewhere = f"/nonexistent/driver/checkout/{tool_file.name}:where"
    actor = ToolActor.options(runtime_env=env).remote(asdict(ToolsConfig(plugins=[elsewhere])))
    try:
        result = ray.get(actor.call.remote("where", "x"), timeout=300)
        assert result.error is None, result.observation
        module_file, cwd = result.observation.split("|")
        assert Path(module_file).name == tool_file.name and not module_file.startswith(str(tmp_path))
        assert Path(cwd) != folder  # imported from Ray's copy, not found next to the process
        assert ray.get(actor.versions.remote())["where"].startswith("sha256:")
    finally:
        ray.kill(actor, no_restart=True)


def _answer_once_back(call, timeout_s: float):
    """``ray.get(call())``, asked again while the actor is restarting."""
    import time

    import ray
    from ray.exceptions import ActorUnavailableError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(call(), timeout=max(1.0, deadline - time.monotonic()))
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_hostile_plugins_leave_every_episode_recorded_and_the_run_finishing(local_ray):
    import ray

    from nat_ray.tools.actors import RayTools, start_tool_actors

    tools = ToolsConfig(plugins=[f"{HOSTILE}:{name}" for name in NAMES], call_timeout_s=2.0)
    pools = start_tool_actors(tools, 1, 1, [*NAMES, "calculate"])
    try:
        pid = ray.get(pools["die"][0].pid.remote())
        names = (*NAMES, "calculate")
        for stop_on_tool_error in (False, True):
            episodes = [Episode(n, [{"role": "user", "content": n}], names, Sampling(), 3) for n in names]
            ended = []
            Stepper(
                _Script(),
                RayTools(pools, call_timeout_s=tools.call_timeout_s),
                stop_on_tool_error=stop_on_tool_error,
                on_done=ended.append,
            ).run(episodes)
            assert {ep.id for ep in ended} == set(names)  # the run finished, every episode recorded
            for ep in episodes[:-1]:
                step = ep.steps[0]
                assert step.error and step.error.startswith("tool error: "), (ep.id, step)
                assert step.observation.startswith("Error: the") or "[truncated:" in step.observation, ep.id
                assert len(step.observation) < 5000
                if stop_on_tool_error:
                    assert ep.failure_reason == TOOL_ERROR, ep.id
                else:
                    assert ep.finished and ep.answer == "1" and ep.turns == 2, ep.id
            by_id = {ep.id: ep for ep in episodes}
            assert "crashed and was restarted" in by_id["die"].steps[0].observation
            assert "timed out after 2 s" in by_id["hang"].steps[0].observation
            assert by_id["calculate"].finished and by_id["calculate"].steps[0].error is None
        # The killed actor was restarted, and it answers again (a call that lands while it is still
        # restarting is refused with ActorUnavailableError: ask again until it is back).
        assert _answer_once_back(lambda: pools["die"][0].pid.remote(), timeout_s=120) != pid
        assert ray.get(pools["explode"][0].call.remote("explode", "y")).error.startswith("explode raised")
    finally:
        _kill(pools)
