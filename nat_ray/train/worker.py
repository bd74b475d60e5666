"""One Ray Train worker: DeepSpeed engine, resume from the latest checkpoint, steps, checkpoints, export.

:func:`train_loop_per_worker` reads everything from its ``config`` (built by
:func:`nat_ray.train.run.run_train`). Each rank reads its own dataset, ``rank<r>``, whose rows are
already in step order (:mod:`nat_ray.train.data`), so resuming is skipping the steps taken.
Checkpoints are DeepSpeed's shards plus a small trainer state, sealed once every rank has written
(:mod:`nat_ray.train.checkpoints`), then registered with ``ray.train.report``; a resume skips a
damaged or partial checkpoint for the newest sound one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from nat_ray import paths, safe_files
from nat_ray.config import TrainConfig
from nat_ray.train.checkpoints import STATE_FILE, choose_checkpoint, new_checkpoint_name
from nat_ray.train.data import Schedule, step_batches
from nat_ray.train.export import export_model
from nat_ray.train.objectives import Preference, Reference, preference_step, token_logps
from nat_ray.train.step import (
    StepStats,
    attention_for,
    build_model,
    cosine_schedule,
    deepspeed_config,
    deepspeed_step,
    load_model,
    resolve_precision,
    sync_schedule,
)

log = logging.getLogger(__name__)

DS_TAG = "deepspeed"  # DeepSpeed checkpoint tag inside every Ray checkpoint
HISTORY_KEYS = ("step", "loss", "lr", "tokens_per_s")
TENSORBOARD_KEYS = ("loss", "lr", "tokens_per_s")


def _this_environments_tools_first() -> None:
    """Put this Python's ``bin/`` first on ``PATH``, so DeepSpeed's just-in-time ops build with its ``ninja``.

    A Ray worker started from ``.venv/bin/python`` without the environment activated finds another
    ``ninja`` on ``PATH`` (the system's) than a driver that runs with it activated, and each
    ninja version takes the other's build log for a changed command: the CPU communication op
    (``deepspeed_shm_comm``) was rebuilt, about 50 s on two cores, whenever the two alternated.
    """
    bin_dir = str(Path(sys.executable).parent)
    entries = os.environ.get("PATH", "").split(os.pathsep)
    if entries[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, *[e for e in entries if e != bin_dir]])


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: DeepSpeed engine, resume, steps, checkpoints, export. Reads only ``config``.

    ``config`` keys: ``train`` (TrainConfig fields), ``model_path``, ``gpu``, ``schedule`` (Schedule
    fields), ``pad_id``, ``run_dir``, ``local`` (run_dir is a filesystem path), ``export_dir``,
    ``tensorboard_dir``, ``preference`` (:class:`~nat_ray.train.objectives.Preference` fields, or
    ``None`` for SFT).
    """
    import ray.train
    import torch
    from ray.train.torch import get_device

    _setup_worker_logging()
    _this_environments_tools_first()
    cfg = TrainConfig(**config["train"])
    schedule = Schedule(**config["schedule"])
    gpu = config["gpu"]
    rank = ray.train.get_context().get_world_rank()
    device = get_device() if gpu else torch.device("cpu")

    engine, scheduler = _build_engine(cfg, schedule, config["model_path"], gpu, device, rank)
    state = _resume(engine, scheduler, schedule, cfg.run_name, rank, config)
    step = _step_function(engine, cfg, config, gpu, device)
    _train(engine, cfg, schedule, state, config, rank, step)
    _export(engine, cfg, config, rank, gpu)


def _setup_worker_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _build_engine(cfg: TrainConfig, schedule: Schedule, model_path: str, gpu: bool, device, rank: int):
    """The model wrapped by ``deepspeed.initialize``, with the run's cosine schedule.

    Returns:
        ``(engine, lr scheduler)``.
    """
    import deepspeed
    import torch

    began = time.perf_counter()
    # KTO's and DPO's rows are packed (a DPO pair is two examples in one row): per-example attention.
    model = build_model(cfg, model_path, gpu, attention_for(True, gpu) if cfg.objective != "sft" else None)
    if gpu:
        model.to(device)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(cfg, gpu),
        lr_scheduler=lambda opt: cosine_schedule(opt, schedule.warmup_steps, schedule.total_steps),
    )
    if rank == 0:
        log.info(
            "DeepSpeed ZeRO-%d engine ready in %.1fs (%d threads per worker)",
            cfg.zero_stage,
            time.perf_counter() - began,
            torch.get_num_threads(),
        )
    return engine, scheduler


def _step_function(engine, cfg: TrainConfig, config: dict, gpu: bool, device):
    """``micro_batches -> StepStats``: SFT's step, or KTO's / DPO's with the run's reference model."""
    if config.get("preference") is None:
        return lambda micro_batches: deepspeed_step(engine, micro_batches, device)
    spec = Preference(**config["preference"])
    reference = _reference(engine, cfg, config["model_path"], gpu, device)
    return lambda micro_batches: preference_step(engine, micro_batches, device, spec, reference)


def _reference(engine, cfg: TrainConfig, model_path: str, gpu: bool, device) -> Reference:
    """The reference model's token log-probabilities: the policy before training.

    With LoRA it is the policy itself with its adapter disabled (no second copy of the weights).
    With full fine-tuning it is a frozen copy of the base model in its own DeepSpeed engine, with no
    optimizer, sharded by ZeRO-3 when the policy is (other stages keep a whole copy per rank).
    """
    import deepspeed

    if cfg.mode == "lora":

        def adapter_off(batch: dict):
            with engine.module.disable_adapter():
                return token_logps(engine, batch)

        return adapter_off
    model = load_model(model_path, resolve_precision(cfg.precision, gpu), attention_for(True, gpu))
    model.requires_grad_(False)
    if gpu:
        model.to(device)
    ds = deepspeed_config(cfg, gpu)
    ds.pop("optimizer")
    zero = ds["zero_optimization"]
    zero.pop("offload_optimizer", None)
    if cfg.zero_stage != 3:
        ds["zero_optimization"] = {"stage": 0}
    reference, *_ = deepspeed.initialize(model=model, config=ds)
    reference.eval()
    return lambda batch: token_logps(reference, batch)


def _resume(engine, scheduler, schedule: Schedule, run_name: str, rank: int, config: dict) -> dict:
    """Load Ray Train's latest checkpoint into ``engine``, if there is one.

    On a filesystem run folder a damaged or partial latest checkpoint is skipped for the newest
    sound one before it (a fresh start when there is none); every rank makes the same choice from
    the same folders, and rank 0 names each one skipped in a warning.

    Returns:
        the trainer state: ``{"step": steps taken, "history": [...]}`` (step 0 on a fresh start).

    Raises:
        RuntimeError: the checkpoint holds no DeepSpeed state (a bug, not bad input).
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None and config["local"]:
        chosen, skipped = choose_checkpoint(config["run_dir"], checkpoint.path)
        if rank == 0:
            for line in skipped:
                log.warning("checkpoint skipped, damaged: %s", line)
            if skipped:
                log.warning("resuming %s from %s", run_name, chosen or "the start (no sound checkpoint)")
        if chosen is None:
            return {"step": 0, "history": []}
        state = _load(engine, str(chosen))
    elif checkpoint is None:
        return {"step": 0, "history": []}
    else:
        with checkpoint.as_directory() as path:
            state = _load(engine, path)
    sync_schedule(scheduler, schedule.warmup_steps, schedule.total_steps)
    if rank == 0:
        log.info("resuming %s at step %d of %d", run_name, state["step"], schedule.total_steps)
    return state


def _load(engine, path: str) -> dict:
    loaded, _ = engine.load_checkpoint(path, tag=DS_TAG)
    if loaded is None:
        raise RuntimeError(f"no DeepSpeed checkpoint {DS_TAG!r} in {path}")
    return json.loads((Path(path) / STATE_FILE).read_text())


def _shard_rows(shard) -> Iterator[dict]:
    for batch in shard.iter_batches(batch_size=256, batch_format="pyarrow"):
        yield from batch.to_pylist()


def _train(
    engine, cfg: TrainConfig, schedule: Schedule, state: dict, config: dict, rank: int, step_fn
) -> None:
    """The steps from ``state["step"]`` to the end: train, report metrics, checkpoint on schedule."""
    import ray.train

    start_step = state["step"]
    history: list[dict] = state["history"]
    writer = _open_tensorboard(config["tensorboard_dir"]) if rank == 0 else None
    shard = ray.train.get_dataset_shard(f"rank{rank}")
    preference = config.get("preference") is not None
    batches = step_batches(
        _shard_rows(shard), start_step, config["pad_id"], cfg.packing or preference, keep_rows=preference
    )
    engine.train()
    started = time.perf_counter()
    tokens_done = 0
    for step, micro_batches in batches:
        stats = step_fn(micro_batches)
        tokens_done += stats.tokens
        elapsed = time.perf_counter() - started
        metrics = _step_metrics(step, stats, schedule, start_step)
        history.append({k: metrics[k] for k in (*HISTORY_KEYS, *stats.metrics)})
        if rank == 0:
            line = _log_step(metrics, schedule, elapsed, writer, tuple(stats.metrics))
            if config["local"]:
                write_progress(config["run_dir"], line)
        done = metrics["step"]
        if done == schedule.total_steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
            trainer_state = {
                "step": done,
                "epoch": metrics["epoch"],
                "rows_consumed_per_rank": done * schedule.accum * schedule.micro_batch,
                "history": history,
            }
            _report_checkpoint(
                engine,
                {**metrics, "history": history},
                trainer_state,
                rank,
                config["run_dir"],
                config["local"],
            )
        else:
            ray.train.report(metrics)
    if writer is not None:
        writer.close()
    if rank == 0 and tokens_done:
        log.info("trained %d tokens in %.1fs", tokens_done, time.perf_counter() - started)


def _step_metrics(step: int, stats: StepStats, schedule: Schedule, start_step: int) -> dict:
    """What a step reports to Ray Train (``step`` counts steps done, so it is ``step + 1``)."""
    return {
        "step": step + 1,
        "epoch": step // schedule.steps_per_epoch + 1,
        "loss": stats.loss,
        "lr": stats.lr,
        "tokens_per_s": stats.tokens / stats.seconds,
        "loss_tokens": stats.loss_tokens,
        "tokens": stats.tokens,
        "start_step": start_step,
        **stats.metrics,
    }


def _open_tensorboard(tensorboard_dir: str | None):
    """A TensorBoard writer, or ``None`` when the run directory is a URI (no local folder)."""
    if not tensorboard_dir:
        return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(tensorboard_dir)


def _log_step(metrics: dict, schedule: Schedule, elapsed: float, writer, extra=()) -> str:
    """Rank 0's progress line (returned too) and TensorBoard scalars for one step.

    Args:
        extra: the objective's own metric keys (KTO's and DPO's rewards, margin, KL).
    """
    done, start_step = metrics["step"], metrics["start_step"]
    eta = elapsed / (done - start_step) * (schedule.total_steps - done)
    line = (
        f"step {done}/{schedule.total_steps}  epoch {metrics['epoch']}  loss {metrics['loss']:.4f}  "
        f"tok/s {metrics['tokens_per_s']:.1f}  lr {metrics['lr']:.2e}  elapsed {elapsed:.0f}s  eta {eta:.0f}s"
    )
    if extra:
        line += "  " + "  ".join(f"{k.rsplit('/', 1)[-1]} {metrics[k]:.3f}" for k in extra)
    log.info("%s", line)
    if writer is not None:
        for key in (*TENSORBOARD_KEYS, *extra):
            writer.add_scalar(f"train/{key}", metrics[key], done)
    return line


def write_progress(run_dir: str, line: str) -> None:
    """The latest step line in ``<run>/progress.txt``: a driver that cannot see the workers' logs (a
    pipeline whose Ray was started by the rollout, which keeps them off) reads it to show progress."""
    path = Path(run_dir) / paths.PROGRESS_FILE
    try:
        with safe_files.staged_file(path) as tmp:
            tmp.write_text(line + "\n")
    except OSError as err:  # progress is a courtesy: never fail a step for it
        log.debug("could not write %s: %s", path, err)


def _report_checkpoint(engine, metrics: dict, state: dict, rank: int, run_dir: str, local: bool) -> None:
    """Every rank saves its DeepSpeed shards, rank 0 the trainer state; Ray Train registers the folder.

    On a filesystem path the shards go straight into ``<run_dir>/step_NNNNNN`` (no copy of a
    checkpoint that holds weights and optimizer state three times over); for a URI they go to a
    temporary folder that Ray Train uploads, merging the ranks' files.
    """
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint, CheckpointUploadMode

    name = f"step_{state['step']:06d}"
    started = time.perf_counter()
    if local:
        # Never reuse a folder an earlier (damaged or unfinished) save left: Ray Train may still
        # list it and delete it later. Every rank names it before any rank creates it.
        name = new_checkpoint_name(run_dir, state["step"])
        if dist.is_initialized():
            dist.barrier()
    target = Path(run_dir) / name if local else Path(tempfile.mkdtemp(prefix="nat-ckpt-"))
    try:
        engine.save_checkpoint(str(target), tag=DS_TAG)  # returns once every rank has written
        if rank == 0:
            safe_files.write_json(target / STATE_FILE, state, checksum=False)
            if local:
                safe_files.seal_dir(target)  # before Ray Train registers it: unsealed = unfinished
        if local:
            ray.train.report(
                metrics,
                checkpoint=Checkpoint.from_directory(str(target)),
                checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD,
            )
        else:
            ray.train.report(
                metrics, checkpoint=Checkpoint.from_directory(str(target)), checkpoint_dir_name=name
            )
    finally:
        if not local:
            shutil.rmtree(target, ignore_errors=True)
    if rank == 0:
        log.info("checkpoint %s saved in %.1fs", name, time.perf_counter() - started)


def _export(engine, cfg: TrainConfig, config: dict, rank: int, gpu: bool) -> None:
    """Every rank joins the export (ZeRO-3 gathers), then waits for rank 0 to finish writing."""
    import torch.distributed as dist

    started = time.perf_counter()
    export_model(engine.module, cfg, config["model_path"], config["export_dir"], rank, gpu)
    if rank == 0:
        log.info("exported to %s in %.1fs", config["export_dir"], time.perf_counter() - started)
    if dist.is_initialized():
        dist.barrier()
