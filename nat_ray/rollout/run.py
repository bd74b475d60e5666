"""Stage 1, rollout: Ray Data actors run the agent on many questions and score every trajectory.

questions -> one row per (question, temperature, sample) -> ``map_batches`` over an actor pool
whose actors each own one engine (vLLM, or an HTTP teacher) and keep ``max_in_flight`` episodes
open in the batched stepper -> scored Parquet rows.

Each trajectory streams back to the driver as soon as it ends (the actor's batch function is a
generator, and the stage asks Ray Data for small blocks), so the progress bar moves per trajectory
and the driver writes a Parquet part (temp file, then rename) every ``flush_rows`` trajectories or
``flush_seconds``: a driver killed mid-run loses only what it had not written yet. Re-running the
same config reads the parts, skips every trajectory id already there, and generates only the
rest: none twice, none lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from nat_ray import safe_files
from nat_ray.config import NatRayConfig, from_dict
from nat_ray.core import nat_data as columns
from nat_ray.core import records
from nat_ray.engines import build_engine
from nat_ray.errors import ConfigError
from nat_ray.evaluation.results_table import format_rollout_summary, is_smoke_test, summarize_rollout
from nat_ray.hardware import cpu_threads_per_engine
from nat_ray.models import check_model
from nat_ray.paths import PARTS_DIR
from nat_ray.ray_runtime import init_ray
from nat_ray.tasks import get_task
from nat_ray.tasks.episodes import PlannedEpisode, plan_episodes, scored_row
from nat_ray.tools.mcp import require_servers

log = logging.getLogger(__name__)

# Extra passes over planned trajectories that a run did not return (Ray Data retries a batch whose
# actor died with its node, but a streamed batch's retry may not yield every row again).
MISSING_PASSES = 2


# --------------------------------------------------------------------------------------------
# Plan: which trajectories this config asks for (pure; no Ray)


def plan_rows(cfg: NatRayConfig, model_id: str) -> list[PlannedEpisode]:
    """One planned episode per (task, question, temperature, sample), each with its trajectory id."""
    from nat_ray.agent import prepare_tasks

    return plan_episodes(
        prepare_tasks(cfg.rollout.tasks, cfg)[0],
        cfg.rollout.split,
        cfg.rollout.limit,
        model_id,
        temperatures=cfg.rollout.temperatures,
        samples=cfg.rollout.samples,
        seeds=[cfg.rollout.seed],
    )


def generation_config(cfg: NatRayConfig) -> dict:
    """The settings that change what is generated (provenance hash; placement does not count)."""
    keep_rollout = ("tasks", "split", "limit", "samples", "temperatures", "seed")
    return {
        "engine": {
            k: v for k, v in asdict(cfg.engine).items() if k in ("model", "backend", "dtype", "max_model_len")
        },
        "agent": asdict(cfg.agent),
        "rollout": {k: getattr(cfg.rollout, k) for k in keep_rollout},
    }


def done_ids(output_dir: Path) -> set[str]:
    """Trajectory ids already written (a part that cannot be read is set aside, not trusted)."""
    import pyarrow.parquet as pq

    ids: set[str] = set()
    for part in records.part_files(output_dir / PARTS_DIR):  # a killed writer's temporary file is not done
        try:
            ids.update(pq.read_table(part, columns=[columns.TRAJECTORY_ID]).column(0).to_pylist())
        except Exception as err:  # noqa: BLE001 - any unreadable file: quarantine and regenerate its rows
            bad = part.with_name(f"_corrupt-{part.name}.bad")
            log.warning("cannot read %s (%s); moving it to %s and regenerating its rows", part, err, bad.name)
            part.rename(bad)
    return ids


# --------------------------------------------------------------------------------------------
# The engine actor (runs in a Ray worker)


class RolloutWorker:
    """Owns one engine for its lifetime; turns a batch of planned episodes into scored trajectory rows."""

    def __init__(
        self,
        config: dict,
        tool_pools: dict | None,
        model_id: str,
        config_hash: str,
        tool_versions: dict[str, str],
        engine=None,
    ) -> None:
        from nat_ray.agent import prepare_tasks
        from nat_ray.core.react import LocalTools
        from nat_ray.tools import configure_tools

        self.cfg = from_dict(NatRayConfig, config)
        prepare_tasks(self.cfg.rollout.tasks, self.cfg)  # the task files the plans name
        self.model_id = model_id
        self.config_hash = config_hash
        self.tool_versions = tool_versions
        # An engine pool's actor lends its long-lived engine (nat_ray.rollout.engine_pool); else one of our own.
        self.engine = engine if engine is not None else build_engine(self.cfg.engine)
        if tool_pools:
            from nat_ray.tools.actors import RayTools

            self.tools = RayTools(tool_pools, call_timeout_s=self.cfg.tools.call_timeout_s)
        else:
            configure_tools(self.cfg.tools)
            self.tools = LocalTools()

    def __call__(self, batch):
        """Yields the batch's scored rows a few at a time, as their episodes end."""
        import pyarrow as pa

        from nat_ray.agent import new_episode, sampling_from
        from nat_ray.core.react import Stepper

        plans = [PlannedEpisode.from_row(row) for row in batch.to_pylist()]
        started = records.now_iso()
        episodes, by_id = [], {}
        for plan in plans:
            task = get_task(plan.task)
            sampling = sampling_from(self.cfg.agent, plan.temperature, plan.seed)
            episodes.append(new_episode(task, plan.question, self.cfg.agent, plan.trajectory_id, sampling))
            by_id[plan.trajectory_id] = (task, plan)
        rows = []
        tokenizer = getattr(self.engine, "tokenizer", None)

        def finish(ep) -> None:
            task, plan = by_id[ep.id]
            rows.append(
                scored_row(
                    plan,
                    task,
                    ep,
                    model=self.model_id,
                    engine=self.cfg.engine.backend,
                    config_hash=self.config_hash,
                    started_at=started,
                    tool_versions=self.tool_versions,
                    tokenizer=tokenizer,
                )
            )

        stepper = Stepper(
            self.engine, self.tools, stop_on_tool_error=self.cfg.agent.stop_on_tool_error, on_done=finish
        )
        for _ in stepper.run_refilling(episodes, self.cfg.rollout.max_in_flight):
            if rows:
                yield pa.Table.from_pylist(rows, schema=records.arrow_schema())
                rows.clear()


# --------------------------------------------------------------------------------------------
# Driver


class PartWriter:
    """Buffers finished rows and writes them as Parquet parts, by count or by age."""

    def __init__(self, folder: Path, max_rows: int, max_seconds: float, clock=time.monotonic) -> None:
        self.folder = folder
        self.max_rows = max_rows
        self.max_seconds = max_seconds
        self.clock = clock
        self.pending: list[dict] = []
        self.oldest = 0.0

    def add(self, rows: list[dict]) -> None:
        if rows and not self.pending:
            self.oldest = self.clock()
        self.pending.extend(rows)
        if len(self.pending) >= self.max_rows or self.clock() - self.oldest >= self.max_seconds:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        part = self.folder / f"part-{int(time.time())}-{uuid.uuid4().hex[:8]}.parquet"
        records.write_rows(self.pending, part)
        self.pending = []


def unseen_rows(rows: list[dict], seen: set[str]) -> list[dict]:
    """The rows whose trajectory id is not in ``seen`` (which they join); repeats are logged.

    A batch that Ray Data retries after its engine actor died (a lost node) streams its rows again,
    including those that already reached the driver before the death: they must not be written twice.
    """
    fresh = []
    for row in rows:
        tid = row[columns.TRAJECTORY_ID]
        if tid in seen:
            continue
        seen.add(tid)
        fresh.append(row)
    if len(fresh) < len(rows):
        log.info(
            "rollout: dropped %d trajectories already received (a retried batch)", len(rows) - len(fresh)
        )
    return fresh


def check_output_dir(path: Path) -> None:
    try:
        (path / PARTS_DIR).mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"rollout.output_dir={str(path)!r} is not writable: {err}") from None


def engine_cpus(cfg: NatRayConfig) -> float:
    """CPUs (hence OpenMP threads) each engine actor reserves; see ``RolloutConfig.engine_num_cpus``."""
    if cfg.rollout.engine_num_cpus is not None:
        return cfg.rollout.engine_num_cpus
    if cfg.rollout.engine_num_gpus > 0 or cfg.engine.backend != "vllm":
        return 1.0

    return float(cpu_threads_per_engine(cfg.rollout.num_engines))


@dataclass(frozen=True)
class RolloutResult:
    """What a rollout did (:func:`run_rollout`); :meth:`to_dict` for ``summary.yaml`` and JSON.

    Attributes:
        output_dir: the stage's folder (``trajectories/`` parts, ``config.yaml``, ``summary.yaml``).
        generated: trajectories generated by this start.
        skipped: planned trajectories already there from an earlier start (a resume).
        total: planned trajectories now in the folder.
        summary: one row per task and model (counts, accuracy, turns, failure reasons).
        seconds: wall time of this start.
    """

    output_dir: str
    generated: int
    skipped: int
    total: int
    summary: list[dict]
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def run_rollout(cfg: NatRayConfig, progress: bool = True, pool=None) -> RolloutResult:
    """Collect every trajectory ``cfg`` asks for that is not already in the output dir.

    Args:
        pool: a running :class:`nat_ray.rollout.engine_pool.EnginePool` to generate on (the closed loop's
            rounds, see :func:`nat_ray.rollout.engine_pool.rollout_with_pool`); None: the stage starts its
            own engines in Ray Data's actor pool.

    Returns:
        a :class:`RolloutResult`.

    Raises:
        ConfigError / DataError / ModelError: before any work starts, for bad settings or inputs.
    """
    from nat_ray.agent import with_tasks_resolved

    start = time.time()
    out = Path(cfg.rollout.output_dir)
    tasks, cfg = with_tasks_resolved(cfg, "rollout")  # bad task files: ConfigError now
    for task in tasks:  # a prompt the agent settings cannot build (an unknown template)
        task.build_messages("?", cfg.agent.template, None, cfg.agent.shots)
    require_servers(cfg.tools.plugins)  # an MCP server that will not start fails now, not in an actor
    model_path = check_model(cfg.engine.model) if cfg.engine.backend != "openai" else cfg.engine.model
    engine_cfg = {**asdict(cfg.engine), "model": model_path}
    resolved = {**asdict(cfg), "engine": engine_cfg}
    model_id = cfg.engine.model if cfg.engine.model else model_path
    if pool is not None:
        model_id = pool.model_id(model_id)
    config_hash = records.config_hash(generation_config(cfg))
    plans = plan_rows(cfg, model_id)  # reads the questions: bad data fails before anything is written
    check_output_dir(out)
    (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    finished = done_ids(out)
    todo = [plan for plan in plans if plan.trajectory_id not in finished]
    log.info(
        "rollout: %d trajectories planned, %d already done, %d to generate",
        len(plans),
        len(plans) - len(todo),
        len(todo),
    )
    left = todo
    for attempt in range(1 + MISSING_PASSES):
        if not left:
            break
        if attempt:
            log.warning(
                "rollout: %d planned trajectories did not come back (a lost node?); generating them again",
                len(left),
            )
        if pool is None:
            _generate(cfg, engine_cfg, tasks, left, out, model_id, config_hash, progress)
        else:
            pool.generate(cfg, tasks, left, out, model_id, config_hash, progress)
        written = done_ids(out)
        left = [plan for plan in left if plan.trajectory_id not in written]
    planned = {plan.trajectory_id for plan in plans}
    rows = [r for r in records.read_rows(out / PARTS_DIR) if r[columns.TRAJECTORY_ID] in planned]
    table = summarize_rollout(rows)
    result = RolloutResult(
        output_dir=str(out),
        generated=len(todo),
        skipped=len(plans) - len(todo),
        total=len(rows),
        summary=table,
        seconds=round(time.time() - start, 1),
    )
    (out / "summary.yaml").write_text(yaml.safe_dump(result.to_dict(), sort_keys=False))
    return result


@contextlib.contextmanager
def streaming_data_context():
    """Ray Data settings of the rollout stage, put back afterwards.

    Ray Data holds a map's outputs back until they fill a block of ``target_max_block_size`` bytes
    (128 MiB by default: a whole batch of trajectories); one byte sends every row on as soon as the
    actor yields it. Put back because a pipeline goes on, in the same process, to tokenize and
    stream training data with Ray Data, where it would make every row a block of its own.
    """
    import ray

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.execution_options.preserve_order, ctx.target_max_block_size)
    ctx.enable_progress_bars = False  # the driver shows one bar over trajectories instead
    ctx.execution_options.preserve_order = False
    ctx.target_max_block_size = 1
    try:
        yield ctx
    finally:
        ctx.enable_progress_bars, ctx.execution_options.preserve_order, ctx.target_max_block_size = saved


def _generate(
    cfg, engine_cfg, tasks, todo, out: Path, model_id: str, config_hash: str, progress: bool
) -> None:
    import ray
    from tqdm import tqdm

    from nat_ray.tools import configured_versions
    from nat_ray.tools.actors import actor_runtime_env

    num_cpus = engine_cpus(cfg)
    init_ray(cfg.rollout.num_engines * num_cpus)
    pools = None
    if cfg.rollout.tool_actors:
        from nat_ray.tools.actors import start_tool_actors

        names = [t for task in tasks for t in task.tools]
        pools = start_tool_actors(cfg.tools, cfg.rollout.num_calculators, cfg.rollout.num_search, names)
    versions = configured_versions(cfg.tools)  # what the tools run, for lineage
    runtime_env = actor_runtime_env(cfg.tools.plugins)  # tool files, for engine actors' local tools
    worker_config = {**asdict(cfg), "engine": engine_cfg}
    bar = tqdm(total=len(todo), desc="trajectories", unit="traj", disable=not progress, file=sys.stderr)
    parts = PartWriter(out / PARTS_DIR, cfg.rollout.flush_rows, cfg.rollout.flush_seconds)
    seen: set[str] = set()
    with streaming_data_context():
        blocks = max(1, -(-len(todo) // cfg.rollout.batch_size))
        ds = ray.data.from_items([plan.to_row() for plan in todo], override_num_blocks=blocks)
        ds = ds.map_batches(
            RolloutWorker,
            fn_constructor_kwargs={
                "config": worker_config,
                "tool_pools": pools,
                "model_id": model_id,
                "config_hash": config_hash,
                "tool_versions": versions,
            },
            batch_size=cfg.rollout.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=cfg.rollout.num_engines),
            num_cpus=num_cpus,
            num_gpus=cfg.rollout.engine_num_gpus,
            zero_copy_batch=True,
            **({"runtime_env": runtime_env} if runtime_env else {}),
        )
        try:
            for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                rows = unseen_rows(block.to_pylist(), seen)
                if rows:
                    parts.add(rows)
                    bar.update(len(rows))
        finally:
            parts.flush()  # what reached the driver is written, even when the run is interrupted
            bar.close()


def main_rollout(cfg: NatRayConfig, json_path: str | None = None) -> int:
    """``nat-ray rollout``: collect, then print the per-task table and where the rows went."""
    result = run_rollout(cfg)
    smoke_test = is_smoke_test(cfg.engine.model, cfg.engine.device)
    out = safe_files.tables_stream(json_path)
    print(format_rollout_summary(result.summary, smoke_test=smoke_test), file=out)
    print(
        f"\n{result.total} trajectories in {result.output_dir}/{PARTS_DIR} "
        f"({result.generated} generated now, {result.skipped} kept from before) in {result.seconds}s",
        file=out,
    )
    if json_path:
        safe_files.write_result(json_path, result.to_dict())
    return 0
