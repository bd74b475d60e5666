"""Rollout engines that outlive a rollout: the closed loop's rounds reuse them, switching adapters.

The rollout stage (:func:`nat_ray.rollout.run.run_rollout`) starts its vLLM engines inside Ray Data's
actor pool and they end with it, so every round of the loop would pay the engine start again
(most of a small round on CPU). An :class:`EnginePool` keeps named engine actors alive for as long
as the driver holds the pool; round r+1 only sends each engine a LoRA request for the new adapter
(:meth:`VLLMEngine.load_adapter`). The rollout itself is the stage's own: the same plan, resume,
Parquet parts and scored rows (:class:`nat_ray.rollout.run.RolloutWorker` on the actor's engine); only
who runs the batches changes.

Use::

    pool = start_pool(cfg)                       # engines with LoRA enabled, the base model
    rollout_with_pool(cfg_round0, pool, None)    # -> a RolloutResult
    rollout_with_pool(cfg_round1, pool, "runs/x/adapters/round-1")
    pool.close()
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

from nat_ray.config import NatRayConfig, from_dict
from nat_ray.errors import ConfigError
from nat_ray.models import check_lora, check_model
from nat_ray.paths import PARTS_DIR
from nat_ray.ray_runtime import init_ray
from nat_ray.tasks.episodes import PlannedEpisode

log = logging.getLogger(__name__)

POOL_NAME = "nat-ray-rollout-engine"


class EngineHolder:
    """One Ray actor's long-lived vLLM engine, and the rollout batches it runs (see :class:`EnginePool`)."""

    def __init__(self, config: dict) -> None:
        from nat_ray.engines.vllm_engine import VLLMEngine

        self.cfg = from_dict(NatRayConfig, config)
        self.engine = VLLMEngine(self.cfg.engine)  # engine.lora is on: adapters load later
        self.adapter: str | None = None
        self._worker = None
        self._worker_key = None

    def ready(self) -> int:
        """The engine process's id, once the engine has started (a new engine would have a new one)."""
        return os.getpid()

    def load_adapter(self, path: str | None) -> str | None:
        self.engine.load_adapter(path)
        self.adapter = path
        return path

    def run(self, items: list[dict], worker_args: dict) -> list[dict]:
        """Scored trajectory rows for ``items`` (planned episodes as rows, :meth:`PlannedEpisode.to_row`)."""
        import pyarrow as pa

        from nat_ray.rollout.run import RolloutWorker

        key = repr(sorted((k, repr(v)) for k, v in worker_args.items()))
        if key != self._worker_key:  # a new round: its settings, its tools, this same engine
            self._worker = RolloutWorker(**worker_args, engine=self.engine)
            self._worker_key = key
        rows: list[dict] = []
        for table in self._worker(pa.Table.from_pylist(items)):
            rows.extend(table.to_pylist())
        return rows

    def close(self) -> None:
        self.engine.close()


@dataclasses.dataclass
class EnginePool:
    """Named engine actors of one driver, each holding a :class:`VLLMEngine` with LoRA enabled.

    The actors are named (``<name>-<i>``, so a driver can find them again with
    ``ray.get_actor``) but not detached: they end with the driver's job, or at :meth:`close`.

    Attributes:
        actors: the engine actors' handles.
        model_path: the base model every engine runs.
        engine_config: the ``engine`` section they were started with (``lora`` on).
        adapter: the adapter every engine uses now (None: the base model).
    """

    actors: list
    model_path: str
    engine_config: dict
    adapter: str | None = None

    def load_adapter(self, path: str | None) -> None:
        """Every engine switches to the peft adapter at ``path`` (None: the base model); no restart."""
        import ray

        resolved = check_lora(path) if path is not None else None  # a bad path fails here, not in an actor
        ray.get([actor.load_adapter.remote(resolved) for actor in self.actors])
        self.adapter = resolved

    def model_id(self, base_id: str) -> str:
        """The model name trajectories record (and their ids hash): the base, plus the adapter."""
        return base_id if self.adapter is None else f"{base_id}+lora:{self.adapter}"

    def generate(self, cfg: NatRayConfig, tasks, todo: list[PlannedEpisode], out: Path, model_id: str, config_hash: str,
                 progress: bool) -> None:  # fmt: skip
        """Run ``todo`` on the pool's engines, writing Parquet parts as :func:`nat_ray.rollout.run._generate` does."""
        import ray
        from tqdm import tqdm

        from nat_ray.rollout.run import PartWriter, unseen_rows
        from nat_ray.tools import configured_versions

        self._check(cfg)
        pools = None
        if cfg.rollout.tool_actors:
            from nat_ray.tools.actors import start_tool_actors

            names = [t for task in tasks for t in task.tools]
            pools = start_tool_actors(cfg.tools, cfg.rollout.num_calculators, cfg.rollout.num_search, names)
        worker_args = {
            "config": {**asdict(cfg), "engine": self.engine_config},
            "tool_pools": pools,
            "model_id": model_id,
            "config_hash": config_hash,
            "tool_versions": configured_versions(cfg.tools),
        }
        size = cfg.rollout.batch_size
        rows = [plan.to_row() for plan in todo]
        batches = [rows[i : i + size] for i in range(0, len(rows), size)]
        idle = list(self.actors)
        running: dict = {}
        bar = tqdm(total=len(todo), desc="trajectories", unit="traj", disable=not progress, file=sys.stderr)
        parts = PartWriter(out / PARTS_DIR, cfg.rollout.flush_rows, cfg.rollout.flush_seconds)
        seen: set[str] = set()
        try:
            while batches or running:
                while batches and idle:
                    actor = idle.pop()
                    running[actor.run.remote(batches.pop(0), worker_args)] = actor
                done, _ = ray.wait(list(running), num_returns=1)
                idle.append(running.pop(done[0]))
                rows = unseen_rows(ray.get(done[0]), seen)
                if rows:
                    parts.add(rows)
                    bar.update(len(rows))
        finally:
            parts.flush()
            bar.close()

    def close(self) -> None:
        """Stop the engines now (otherwise they end with the driver)."""
        import ray

        for actor in self.actors:
            try:
                ray.get(actor.close.remote(), timeout=60)
            except Exception as err:  # noqa: BLE001 - a dead engine is already closed
                log.warning("closing an engine actor: %s", err)
            ray.kill(actor)
        self.actors = []

    def _check(self, cfg: NatRayConfig) -> None:

        if cfg.engine.backend != "vllm":
            raise ConfigError(f"an engine pool runs vLLM; engine.backend is {cfg.engine.backend!r}")
        if check_model(cfg.engine.model) != self.model_path:
            raise ConfigError(
                f"this engine pool runs {self.model_path}, but engine.model is {cfg.engine.model!r}; "
                "start a pool for that model"
            )


def start_pool(cfg: NatRayConfig, name: str = POOL_NAME, hold_cpus: bool = True) -> EnginePool:
    """``rollout.num_engines`` engine actors for ``cfg.engine`` (LoRA enabled), started and ready.

    Args:
        hold_cpus: the actors reserve their CPUs from Ray for as long as they live. ``False`` (the
            loop, whose training runs while the engines wait): they reserve none and get their
            thread count from the environment instead; an idle in-process engine uses no CPU.

    Raises:
        ConfigError / ModelError: a backend other than vLLM, or a missing model.
    """
    import ray

    from nat_ray.rollout.run import engine_cpus
    from nat_ray.tools.actors import actor_runtime_env

    if cfg.engine.backend != "vllm":
        raise ConfigError(f"an engine pool runs vLLM; engine.backend is {cfg.engine.backend!r}")
    model_path = check_model(cfg.engine.model)
    engine_cfg = {**asdict(cfg.engine), "model": model_path, "lora": True}
    num_cpus = engine_cpus(cfg)
    init_ray(cfg.rollout.num_engines * num_cpus if hold_cpus else 1)
    env = actor_runtime_env(cfg.tools.plugins)
    if not hold_cpus:
        threads = str(max(1, int(num_cpus)))
        env = {**env, "env_vars": {**env.get("env_vars", {}), "OMP_NUM_THREADS": threads}}
    holder = ray.remote(EngineHolder)
    config = {**asdict(cfg), "engine": engine_cfg}
    actors = [
        holder.options(
            name=f"{name}-{i}",
            get_if_exists=True,  # a driver that starts the same pool twice gets the running engines
            num_cpus=num_cpus if hold_cpus else 0,
            num_gpus=cfg.rollout.engine_num_gpus,
            max_concurrency=1,
            **({"runtime_env": env} if env else {}),
        ).remote(config)
        for i in range(cfg.rollout.num_engines)
    ]
    ray.get([actor.ready.remote() for actor in actors])
    return EnginePool(actors, model_path, engine_cfg)


def rollout_with_pool(
    cfg: NatRayConfig, pool: EnginePool, adapter_path: str | None, progress: bool = True
) -> dict:
    """One round's rollout on ``pool``'s running engines, with the adapter at ``adapter_path``.

    The engines load the adapter (a LoRA request; None: the base model), then
    :func:`nat_ray.rollout.run.run_rollout` runs as always into ``cfg.rollout.output_dir``, with the
    trajectories' model recorded as ``<engine.model>+lora:<adapter path>``.

    Returns:
        run_rollout's :class:`~nat_ray.rollout.run.RolloutResult`.
    """
    from nat_ray.rollout.run import run_rollout

    pool.load_adapter(adapter_path)
    return run_rollout(cfg, progress=progress, pool=pool)
