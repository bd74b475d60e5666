"""Stage 1 on a real local Ray with the real vLLM CPU engine: schema, resume, a killed driver,
and a killed tool actor."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from helpers import HttpRequest, serve_http  # tests/helpers.py

from nat_ray.config import NatRayConfig, ToolsConfig, from_dict
from nat_ray.core import nat_data as columns
from nat_ray.core import records
from nat_ray.core.react import FAILURE_REASONS, Episode, Generation, Sampling, Stepper, ToolCall
from nat_ray.paths import PACKAGE_DATA_DIR
from nat_ray.rollout.run import PARTS_DIR, run_rollout

pytestmark = pytest.mark.integration


def _config(out: Path, embedded_path: str, **rollout) -> dict:
    return {
        "engine": {"model": embedded_path, "max_model_len": 2048, "kv_cache_gb": 1},
        "agent": {"max_turns": 2, "max_new_tokens": 48},
        "tools": {"search_corpus": str(PACKAGE_DATA_DIR / "hotpotqa" / "corpus_sample.jsonl.gz")},
        "rollout": {
            "output_dir": str(out),
            "tasks": ["gsm8k"],
            "limit": 8,
            "temperatures": [0.5, 0.9],
            "batch_size": 4,
            "max_in_flight": 4,
            **rollout,
        },
    }


def test_killed_driver_resumes_without_loss_or_duplicates(tmp_path, embedded_path, local_ray):
    out = tmp_path / "run"
    cfg_path = tmp_path / "rollout.yaml"
    # One batch of all 16: a part can only be there before the kill if trajectories stream back
    # to the driver as they end, not when their batch is done.
    streaming = {"batch_size": 16, "flush_rows": 2}
    cfg_path.write_text(yaml.safe_dump(_config(out, embedded_path, **streaming)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "nat_ray.cli", "rollout", "--config", str(cfg_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 600

        def written() -> list[Path]:  # whole parts: a writer's temporary file is a dot-name (never read)
            return [p for p in (out / PARTS_DIR).glob("*.parquet") if not p.name.startswith(".")]

        while time.time() < deadline and not written():
            assert proc.poll() is None, "rollout exited before writing anything"
            time.sleep(1)
        assert written(), "no part written within the deadline"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = {r[columns.TRAJECTORY_ID]: r for r in records.read_rows(out / PARTS_DIR)}
    assert 0 < len(before) < 16

    cfg = from_dict(NatRayConfig, _config(out, embedded_path, **streaming))
    result = run_rollout(cfg, progress=False)  # on the session's Ray
    rows = records.read_rows(out / PARTS_DIR)
    ids = [r[columns.TRAJECTORY_ID] for r in rows]
    assert result.total == 16 and len(ids) == 16 == len(set(ids))
    assert result.generated == 16 - len(before) and result.skipped == len(before)
    after = {r[columns.TRAJECTORY_ID]: r for r in rows}
    for tid, row in before.items():  # what the killed run wrote is kept as it was
        assert after[tid][columns.ENDED_AT] == row[columns.ENDED_AT]

    # The schema, and sane values in every row.
    assert [f.name for f in records.arrow_schema()] == list(rows[0])
    for r in rows:
        assert (
            r[columns.TASK] == "gsm8k"
            and r[columns.FAMILY] == "math"
            and r[columns.TEMPERATURE] in (0.5, 0.9)
        )
        assert r[columns.PROMPT][0]["content"].startswith("Solve a math problem")
        assert r[columns.TURNS] == sum(m["role"] == "assistant" for m in r[columns.TRAJECTORY]) >= 1
        assert r[columns.FINISHED] == (r[columns.ANSWER] is not None)
        assert r[columns.FINISHED] or r[columns.FAILURE_REASON] in FAILURE_REASONS
        assert r[columns.NAT_CLASS] in ("correct", "incorrect") and r[columns.COMPLETION_TOKENS] > 0
        assert not r[columns.CORRECT_PAPER] or r[columns.CORRECT_ROBUST]
    assert len({r[columns.QUESTION_ID] for r in rows}) == 8

    # Running the same config again generates nothing.
    again = run_rollout(cfg, progress=False)
    assert again.generated == 0 and again.total == 16
    assert {row["task"] for row in again.summary} == {"gsm8k"}
    assert sum(row["count"] for row in again.summary) == 16


def test_bad_settings_fail_before_any_work(tmp_path, embedded_path):
    from nat_ray.errors import ConfigError

    cfg = from_dict(NatRayConfig, _config(tmp_path / "x", embedded_path, tasks=["chess"]))
    with pytest.raises(ConfigError, match="unknown task"):
        run_rollout(cfg)
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    cfg = from_dict(NatRayConfig, _config(blocker, embedded_path))
    with pytest.raises(ConfigError, match="not writable"):
        run_rollout(cfg)
    from nat_ray.errors import ModelError

    cfg = from_dict(NatRayConfig, _config(tmp_path / "y", str(tmp_path / "no-such-model")))
    with pytest.raises(ModelError, match="does not exist"):
        run_rollout(cfg)
    cfg = from_dict(NatRayConfig, _config(tmp_path / "y", "nobody-has/this-model-xyz"))
    with pytest.raises(ModelError, match="cannot load the model config"):
        run_rollout(cfg)


class _SlowSearch:
    """A search service whose calls wait at the server until ``release`` is set."""

    def __init__(self) -> None:
        self.arrived = threading.Event()  # a call has reached the server
        self.release = threading.Event()  # calls wait for this before answering
        self.release.set()

    def handle(self, request: HttpRequest) -> tuple[int, object, dict]:
        self.arrived.set()
        self.release.wait(timeout=300)
        return 200, {"results": [{"title": "T", "text": "found it"}]}, {}


class _Script:
    def __init__(self, outputs):
        self.outputs = list(outputs)

    def generate(self, conversations, sampling):
        return [Generation(self.outputs.pop(0), 5, 5) for _ in conversations]


def test_killed_tool_actor_restarts_and_the_episode_goes_on(local_ray):
    import psutil
    import ray

    from nat_ray.tools.actors import RayTools, start_tool_actors

    service = _SlowSearch()
    with serve_http(service.handle) as url:
        pools = start_tool_actors(
            ToolsConfig(search_backend="http", search_url=f"{url}/search"), 1, 1, ["search"]
        )
        actor = pools["search"][0]
        pid = ray.get(actor.pid.remote())
        service.release.clear()  # the first call is still out when the actor dies
        service.arrived.clear()

        def kill_when_the_call_is_out() -> None:
            if service.arrived.wait(timeout=300):
                os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(psutil.NoSuchProcess):
                    psutil.Process(pid).wait(timeout=60)
            service.release.set()  # only now: a dead actor cannot take the answer

        killer = threading.Thread(target=kill_when_the_call_is_out, daemon=True)
        killer.start()
        try:
            ep = Episode("e", [{"role": "user", "content": "q"}], ("search",), Sampling(), 7)
            Stepper(
                _Script(["Action: search[slow]", "Action: search[again]", "Action: finish[x]"]),
                RayTools(pools),
            ).run([ep])
            assert ep.finished and ep.answer == "x" and ep.turns == 3
            assert ep.steps[0].observation.startswith("Error: the search tool crashed") and ep.steps[0].error
            assert "found it" in ep.steps[1].observation  # the restarted actor answers
            assert ray.get(actor.pid.remote()) != pid
            # A direct call through the runner works too.
            tools = RayTools(pools)
            handle = tools.submit(ToolCall("search", "x"))
            ((_, result),) = tools.collect([handle], block=True)
            assert "found it" in result.observation
        finally:
            service.release.set()
            killer.join(timeout=60)
            for pool in pools.values():  # the session's Ray goes on: free their CPUs
                for a in pool:
                    ray.kill(a, no_restart=True)
