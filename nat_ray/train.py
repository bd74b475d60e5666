"""Stage 2, training: Ray Train + DeepSpeed fine-tuning on NAT data (full or LoRA).

trajectory Parquet -> NAT examples (variant, seeded selection; :mod:`nat_ray.nat_data`) ->
token ids and loss masks (Ray Data ``map_batches``; :mod:`nat_ray.masks`) -> optional packing
(:mod:`nat_ray.packing`) -> a fixed, seeded schedule: which rows each worker trains on at each
step -> ``TorchTrainer`` whose workers call ``deepspeed.initialize`` and run
:func:`nat_ray.train_step.deepspeed_step` -> checkpoints through ``ray.train.report`` -> export.

Everything that can be wrong with the inputs is checked before the trainer starts. Each worker
reads its rows through ``ray.train.get_dataset_shard("rank<r>")``: one dataset per rank, so the
rows a rank sees at step k are the same in every attempt and a resumed run continues with
exactly the data it had not seen yet (a split of one dataset is assigned dynamically). A run
started again with the same ``run_name`` and ``storage_path`` resumes from its latest
checkpoint (Ray Train restores it; the worker reloads the DeepSpeed state and skips the steps
already taken); a run whose settings changed in a way that breaks that is refused.

Layout under ``<storage_path>/<run_name>/``: Ray Train's ``step_NNNNNN/`` checkpoints,
``nat_run.json`` (the settings a resume must match), ``tensorboard/``, and ``export/``:
``export/model`` (HF safetensors + tokenizer + chat template: the full model, or with LoRA the
merged one) and ``export/adapter`` (LoRA only: the peft adapter).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from nat_ray import nat_data as nd
from nat_ray import records
from nat_ray.config import NatRayConfig, TrainConfig
from nat_ray.errors import ConfigError, DataError
from nat_ray.masks import TokenizedExample
from nat_ray.packing import PackedSequence, pack_examples, packing_efficiency, single_rows

log = logging.getLogger(__name__)

DS_TAG = "deepspeed"  # DeepSpeed checkpoint tag inside every Ray checkpoint
STATE_FILE = "trainer_state.json"
RUN_FILE = "nat_run.json"
RAY_DATA_MIN_EXAMPLES = 256  # fewer examples are tokenized in the driver
MAX_FAILURES = 2  # worker-group restarts (from the latest checkpoint) before the run fails
REQUIRED_COLUMNS = (
    nd.TRAJECTORY_ID,
    nd.FAMILY,
    nd.QUESTION_ID,
    nd.QUESTION,
    nd.TRAJECTORY,
    nd.CORRECT_PAPER,
    nd.CORRECT_ROBUST,
)
# Settings a resumed run may change; any other difference from the saved run is refused.
RESUMABLE_CHANGES = ("max_steps", "epochs", "checkpoint_every", "keep_checkpoints", "export_merged")


# --------------------------------------------------------------------------------------------
# Data: trajectories -> examples -> token ids -> rows (driver side)


def read_trajectories(paths: Sequence[str]) -> list[dict]:
    """All trajectory rows of ``train.data`` (files or folders of ``*.parquet``).

    Raises:
        DataError: a path is missing, holds no Parquet, lacks trajectory columns, or all are empty.
    """
    import pyarrow.parquet as pq

    rows: list[dict] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise DataError(
                f"train.data: {raw} does not exist; collect trajectories with `nat-ray rollout` or "
                "convert NAT's with `nat-ray import-nat`"
            )
        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        if not files:
            raise DataError(f"train.data: folder {raw} holds no .parquet files")
        for file in files:
            try:
                names = set(pq.read_schema(file).names)
            except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
                raise DataError(f"train.data: {file} is not a readable Parquet file: {err}") from None
            missing = [c for c in REQUIRED_COLUMNS if c not in names]
            if missing:
                raise DataError(
                    f"train.data: {file} is not a trajectory file: it lacks columns {missing} "
                    "(expected the schema of nat_ray.records)"
                )
        rows.extend(records.read_rows(path))
    if not rows:
        raise DataError(f"train.data: {list(paths)} hold no trajectories")
    return rows


@lru_cache(maxsize=2)
def _tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def tokenize_batch(batch, model_path: str, max_length: int):
    """Ray Data ``map_batches`` function: chat examples -> token ids and labels (truncated to max_length).

    Args:
        batch: pyarrow table with ``index``, ``messages`` (JSON) and ``prompt_messages``.

    Returns:
        pyarrow table with ``index``, ``input_ids``, ``labels``, ``truncated``.
    """
    import pyarrow as pa

    from nat_ray.masks import tokenize_example

    tokenizer = _tokenizer(model_path)  # once per worker process
    out: dict[str, list] = {"index": [], "input_ids": [], "labels": [], "truncated": []}
    for item in batch.to_pylist():
        ex = tokenize_example(tokenizer, json.loads(item["messages"]), max_length, item["prompt_messages"])
        out["index"].append(item["index"])
        out["input_ids"].append(ex.input_ids)
        out["labels"].append(ex.labels)
        out["truncated"].append(ex.truncated)
    return pa.table(out)


def tokenize_examples(examples: Sequence[nd.ChatExample], model_path: str, max_length: int):
    """Token ids and labels of every example, in order: on Ray Data, or here for a few examples.

    Below :data:`RAY_DATA_MIN_EXAMPLES` examples, starting Ray Data tasks (a process that imports
    transformers and loads the tokenizer) costs more than tokenizing here (well under a second).
    """
    if len(examples) < RAY_DATA_MIN_EXAMPLES:
        from nat_ray.masks import tokenize_example

        tokenizer = _tokenizer(model_path)
        return [tokenize_example(tokenizer, ex.messages, max_length, ex.prompt_messages) for ex in examples]
    import ray

    items = [
        {"index": i, "messages": json.dumps(ex.messages), "prompt_messages": ex.prompt_messages}
        for i, ex in enumerate(examples)
    ]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(16, len(items) // 64)))
    ds = ds.map_batches(
        tokenize_batch,
        fn_kwargs={"model_path": model_path, "max_length": max_length},
        batch_format="pyarrow",
        batch_size=64,
    )
    out: list[TokenizedExample | None] = [None] * len(items)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in batch.to_pylist():
            out[row["index"]] = TokenizedExample(row["input_ids"], row["labels"], row["truncated"])
    return out


def finalize_examples(
    tokenized: Sequence[TokenizedExample], examples: Sequence[nd.ChatExample], overlong: str
) -> tuple[list[TokenizedExample], dict]:
    """Apply ``train.overlong`` and count what it did; drop examples with no loss token.

    Raises:
        DataError: nothing is left to train on.
    """
    kept, stats = [], {"truncated": 0, "dropped_overlong": 0, "dropped_no_loss": 0}
    for ex, chat in zip(tokenized, examples):
        if ex.truncated:
            if overlong == "drop":
                stats["dropped_overlong"] += 1
                log.debug("dropping over-long example %s", chat.trajectory_id)
                continue
            stats["truncated"] += 1
        if ex.num_loss_tokens == 0:  # e.g. truncation cut off every agent turn
            stats["dropped_no_loss"] += 1
            continue
        kept.append(ex)
    if not kept:
        raise DataError(f"no example is left to train on after the max_length check: {stats}")
    return kept, stats


@dataclass(frozen=True)
class Schedule:
    """Which row each worker trains on at each optimizer step (seeded, the same in every attempt).

    Attributes:
        rows: training rows (packed sequences, or one example each).
        accum: micro-batches per worker per step.
        steps_per_epoch: full global batches per epoch (the remainder of each shuffled epoch is dropped).
        total_steps: optimizer steps of the run (epochs, capped by max_steps).
        warmup_steps: linear warmup steps of the cosine schedule.
    """

    rows: int
    global_batch: int
    micro_batch: int
    workers: int
    accum: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    def rank_stream(self, rank: int, seed: int) -> list[tuple[int, int, int]]:
        """``(step, micro, row index)`` for every row ``rank`` trains on, in order."""
        out = []
        perm: list[int] = []
        for step in range(self.total_steps):
            epoch, k = divmod(step, self.steps_per_epoch)
            if k == 0:
                perm = list(range(self.rows))
                random.Random(seed * 1_000_003 + epoch).shuffle(perm)
            batch = perm[k * self.global_batch : (k + 1) * self.global_batch]
            for micro in range(self.accum):
                first = (micro * self.workers + rank) * self.micro_batch
                out.extend((step, micro, i) for i in batch[first : first + self.micro_batch])
        return out


def make_schedule(num_rows: int, cfg: TrainConfig) -> Schedule:
    """Steps per epoch and in all from the row count and the batch settings.

    Raises:
        DataError: fewer rows than one global batch.
    """
    from nat_ray.train_step import gradient_accumulation_steps, warmup_steps

    what = "packed sequences" if cfg.packing else "examples"
    if num_rows < cfg.global_batch_size:
        raise DataError(
            f"the data makes {num_rows} {what}, fewer than train.global_batch_size={cfg.global_batch_size}; "
            "add data or lower global_batch_size (and micro_batch_size)"
        )
    per_epoch = num_rows // cfg.global_batch_size
    total = per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        if cfg.max_steps > total:
            log.warning(
                "train.max_steps=%d is more than epochs x steps per epoch = %d; stopping after %d",
                cfg.max_steps,
                total,
                total,
            )
        total = min(total, cfg.max_steps)
    return Schedule(
        num_rows,
        cfg.global_batch_size,
        cfg.micro_batch_size,
        cfg.num_workers,
        gradient_accumulation_steps(cfg),
        per_epoch,
        total,
        warmup_steps(total, cfg.warmup_ratio),
    )


def rank_table(rows: Sequence[PackedSequence], stream: Sequence[tuple[int, int, int]]):
    """One rank's rows in order, as a pyarrow table (the rank's Ray dataset)."""
    import pyarrow as pa

    out: dict[str, list] = {
        k: [] for k in ("step", "micro", "input_ids", "labels", "position_ids", "example_ids", "lengths")
    }
    for step, micro, i in stream:
        row = rows[i]
        out["step"].append(step)
        out["micro"].append(micro)
        out["input_ids"].append(row.input_ids)
        out["labels"].append(row.labels)
        out["position_ids"].append(row.position_ids)
        out["example_ids"].append(list(row.example_ids))
        out["lengths"].append(list(row.lengths))
    return pa.table(out)


def select_examples(cfg: TrainConfig, trajectories: Sequence[dict]) -> tuple[list, nd.Selection]:
    """The variant's chat examples (seeded selection of positives and negatives).

    Raises:
        DataError / ConfigError: an unknown variant, one that needs negatives the data lacks, ...
    """
    return nd.build_examples(
        trajectories,
        cfg.variant,
        cfg.num_positives,
        cfg.num_negatives,
        cfg.sample_seed,
        cfg.label_mode,
        cfg.drop_unfinished_negatives,
        cfg.drop_zero_f1_negatives,
    )


def prepare_rows(
    cfg: TrainConfig,
    examples: Sequence[nd.ChatExample],
    selection: nd.Selection,
    model_path: str,
    tokenize=tokenize_examples,
) -> tuple[list[PackedSequence], dict]:
    """Examples -> training rows, with counts of everything that was selected, cut or dropped.

    Args:
        tokenize: ``(examples, model_path, max_length) -> [TokenizedExample]`` (Ray Data by default).

    Raises:
        DataError: nothing left after the max_length check.
    """
    tokenized = tokenize(examples, model_path, cfg.max_length)
    kept, cut = finalize_examples(tokenized, examples, cfg.overlong)
    rows = pack_examples(kept, cfg.max_length) if cfg.packing else single_rows(kept)
    stats = {
        "positives": len(selection.positives),
        "negatives": len(selection.negatives),
        "selection_dropped": {k: v for k, v in selection.dropped.items() if v},
        **cut,
        "examples": len(kept),
        "rows": len(rows),
        "tokens": sum(len(r) for r in rows),
        "loss_tokens": sum(r.num_loss_tokens for r in rows),
        "packing_efficiency": round(packing_efficiency(rows, cfg.max_length), 4) if cfg.packing else None,
    }
    return rows, stats


# --------------------------------------------------------------------------------------------
# Run directory, resume check, Ray


def storage_root(path: str) -> str:
    """Absolute storage path (Ray Train needs one); URIs (``s3://``) pass through."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def run_fingerprint(cfg: TrainConfig, model_path: str, gpu: bool) -> dict:
    """The settings a resumed run must share with the run that wrote the checkpoint."""
    keep = {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_CHANGES}
    return {**keep, "resolved_model": model_path, "gpu": gpu}


def has_checkpoint(run_dir: Path) -> bool:
    return any(run_dir.glob("step_*"))


def check_resume(run_dir: Path, fingerprint: dict) -> bool:
    """Whether this start resumes a run; refuse it if the saved run's settings differ.

    Returns:
        True when ``run_dir`` holds a checkpoint of a run with the same settings.

    Raises:
        ConfigError: a setting other than :data:`RESUMABLE_CHANGES` differs from the saved run.
    """
    file = run_dir / RUN_FILE
    if not (file.is_file() and has_checkpoint(run_dir)):
        return False
    saved = json.loads(file.read_text())
    changed = {k: (saved.get(k), v) for k, v in fingerprint.items() if saved.get(k) != v}
    if changed:
        listing = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ConfigError(
            f"run {run_dir.name!r} exists in {run_dir.parent} with other settings ({listing}); a resumed "
            f"run may change only {list(RESUMABLE_CHANGES)}. Use a new train.run_name, or delete {run_dir}"
        )
    return True


def write_fingerprint(run_dir: Path, fingerprint: dict) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RUN_FILE).write_text(json.dumps(fingerprint, indent=2))
    except OSError as err:
        raise ConfigError(f"train.storage_path: cannot write {run_dir}: {err}") from None


def init_ray(num_workers: int) -> None:
    """Join ``RAY_ADDRESS``'s cluster, or start a local Ray with room for the workers and Ray Data."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, num_workers + 2, 4))


def check_resources(cfg: TrainConfig, gpu: bool) -> None:
    """Refuse a worker count the cluster can never place (Ray would wait forever).

    Raises:
        ConfigError: not enough CPUs or GPUs for ``train.num_workers``.
    """
    import ray

    total = ray.cluster_resources()
    kind = "GPU" if gpu else "CPU"
    if total.get(kind, 0) < cfg.num_workers:
        raise ConfigError(
            f"train.num_workers={cfg.num_workers} needs {cfg.num_workers} {kind}s, the Ray cluster has "
            f"{total.get(kind, 0):g}; lower num_workers or set train.use_gpu"
        )


# --------------------------------------------------------------------------------------------
# The worker


def _row_to_sequence(row: dict) -> PackedSequence:
    return PackedSequence(
        list(row["input_ids"]),
        list(row["labels"]),
        list(row["position_ids"]),
        tuple(row["example_ids"]),
        tuple(row["lengths"]),
    )


def step_batches(rows: Iterator[dict], start_step: int, pad_id: int, packed: bool) -> Iterator[tuple]:
    """Group a rank's row stream into ``(step, [micro-batch])``, skipping steps before ``start_step``."""
    from nat_ray.packing import collate

    live = (r for r in rows if r["step"] >= start_step)
    for step, step_rows in itertools.groupby(live, key=lambda r: r["step"]):
        micro = [
            collate([_row_to_sequence(r) for r in group], pad_id, packed)
            for _, group in itertools.groupby(step_rows, key=lambda r: r["micro"])
        ]
        yield step, micro


def _shard_rows(shard) -> Iterator[dict]:
    for batch in shard.iter_batches(batch_size=256, batch_format="pyarrow"):
        yield from batch.to_pylist()


def _setup_worker_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: DeepSpeed engine, resume, steps, checkpoints, export. Reads only ``config``.

    ``config`` keys: ``train`` (TrainConfig fields), ``model_path``, ``gpu``, ``schedule`` (Schedule
    fields), ``pad_id``, ``run_dir``, ``local`` (run_dir is a filesystem path), ``export_dir``,
    ``tensorboard_dir``.
    """
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train.torch import get_device

    from nat_ray.train_step import (
        build_model,
        cosine_schedule,
        deepspeed_config,
        deepspeed_step,
        sync_schedule,
    )

    _setup_worker_logging()
    cfg = TrainConfig(**config["train"])
    schedule = Schedule(**config["schedule"])
    gpu = config["gpu"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = get_device() if gpu else torch.device("cpu")

    began = time.perf_counter()
    model = build_model(cfg, config["model_path"], gpu)
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
    state = {"step": 0, "history": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            loaded, _ = engine.load_checkpoint(path, tag=DS_TAG)
            if loaded is None:
                raise RuntimeError(f"no DeepSpeed checkpoint {DS_TAG!r} in {path}")
            state = json.loads((Path(path) / STATE_FILE).read_text())
        sync_schedule(scheduler, schedule.warmup_steps, schedule.total_steps)
        if rank == 0:
            log.info("resuming %s at step %d of %d", cfg.run_name, state["step"], schedule.total_steps)
    start_step = state["step"]
    history: list[dict] = state["history"]

    writer = None
    if rank == 0 and config["tensorboard_dir"]:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(config["tensorboard_dir"])

    shard = ray.train.get_dataset_shard(f"rank{rank}")
    batches = step_batches(_shard_rows(shard), start_step, config["pad_id"], cfg.packing)
    engine.train()
    started = time.perf_counter()
    tokens_done = 0
    for step, micro_batches in batches:
        stats = deepspeed_step(engine, micro_batches, device)
        done = step + 1
        tokens_done += stats.tokens
        elapsed = time.perf_counter() - started
        metrics = {
            "step": done,
            "epoch": step // schedule.steps_per_epoch + 1,
            "loss": stats.loss,
            "lr": stats.lr,
            "tokens_per_s": stats.tokens / stats.seconds,
            "loss_tokens": stats.loss_tokens,
            "tokens": stats.tokens,
            "start_step": start_step,
        }
        history.append({k: metrics[k] for k in ("step", "loss", "lr", "tokens_per_s")})
        if rank == 0:
            eta = elapsed / (done - start_step) * (schedule.total_steps - done)
            log.info(
                "step %d/%d  epoch %d  loss %.4f  tok/s %.1f  lr %.2e  elapsed %.0fs  eta %.0fs",
                done,
                schedule.total_steps,
                metrics["epoch"],
                stats.loss,
                metrics["tokens_per_s"],
                stats.lr,
                elapsed,
                eta,
            )
            if writer is not None:
                for key in ("loss", "lr", "tokens_per_s"):
                    writer.add_scalar(f"train/{key}", metrics[key], done)
        last = done == schedule.total_steps
        if last or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
            state = {
                "step": done,
                "epoch": metrics["epoch"],
                "rows_consumed_per_rank": done * schedule.accum * schedule.micro_batch,
                "history": history,
            }
            _report_checkpoint(
                engine, {**metrics, "history": history}, state, rank, config["run_dir"], config["local"]
            )
        else:
            ray.train.report(metrics)
    if writer is not None:
        writer.close()
    if rank == 0 and tokens_done:
        log.info("trained %d tokens in %.1fs", tokens_done, time.perf_counter() - started)
    started = time.perf_counter()
    export_model(engine.module, cfg, config["model_path"], config["export_dir"], rank, gpu)
    if rank == 0:
        log.info("exported to %s in %.1fs", config["export_dir"], time.perf_counter() - started)
    if dist.is_initialized():
        dist.barrier()


def _report_checkpoint(engine, metrics: dict, state: dict, rank: int, run_dir: str, local: bool) -> None:
    """Every rank saves its DeepSpeed shards, rank 0 the trainer state; Ray Train registers the folder.

    On a filesystem path the shards go straight into ``<run_dir>/step_NNNNNN`` (no copy of a
    checkpoint that holds weights and optimizer state three times over); for a URI they go to a
    temporary folder that Ray Train uploads, merging the ranks' files.
    """
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    name = f"step_{state['step']:06d}"
    started = time.perf_counter()
    target = Path(run_dir) / name if local else Path(tempfile.mkdtemp(prefix="nat-ckpt-"))
    try:
        engine.save_checkpoint(str(target), tag=DS_TAG)
        if rank == 0:
            (target / STATE_FILE).write_text(json.dumps(state))
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


# --------------------------------------------------------------------------------------------
# Export


def gathered_state_dict(module, only_trainable: bool, rank: int) -> dict | None:
    """Full weights on rank 0 (CPU), one parameter at a time: ZeRO-3 shards are gathered collectively."""
    import deepspeed

    out = {}
    for name, param in module.named_parameters():
        if only_trainable and not param.requires_grad:
            continue
        if hasattr(param, "ds_id"):  # partitioned by ZeRO-3: every rank must join the gather
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if rank == 0:
                    out[name] = param.detach().to("cpu", copy=True)
        elif rank == 0:
            out[name] = param.detach().to("cpu", copy=True)
    return out if rank == 0 else None


def export_model(module, cfg: TrainConfig, model_path: str, export_dir: str, rank: int, gpu: bool) -> None:
    """Write the trained model as Hugging Face checkpoints (all ranks gather, rank 0 writes).

    Full: ``export/model``. LoRA: ``export/adapter`` (peft), and ``export/model`` merged when
    ``cfg.export_merged``. Each gets the tokenizer and its chat template. A URI ``export_dir``
    (``s3://...``) is written locally first, then copied there.
    """
    state = gathered_state_dict(module, only_trainable=cfg.mode == "lora", rank=rank)
    if rank != 0:
        return
    if "://" not in export_dir:
        write_export(state, cfg, model_path, Path(export_dir), gpu)
        return
    import pyarrow.fs

    with tempfile.TemporaryDirectory(prefix="nat-export-") as tmp:
        write_export(state, cfg, model_path, Path(tmp), gpu)
        pyarrow.fs.copy_files(tmp, export_dir)


def write_export(state: dict, cfg: TrainConfig, model_path: str, export_dir: Path, gpu: bool) -> dict:
    """Build fresh HF models from ``state`` (names as in the training module) and save them.

    Returns:
        ``{"model": path or None, "adapter": path or None}``.

    Raises:
        RuntimeError: ``state`` does not fit the model (a bug, not bad input).
    """
    from transformers import AutoModelForCausalLM

    from nat_ray.train_step import lora_config, resolve_precision, torch_dtype

    dtype = torch_dtype(resolve_precision(cfg.precision, gpu))
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    tokenizer = _tokenizer(model_path)
    shutil.rmtree(export_dir, ignore_errors=True)
    paths: dict[str, str | None] = {"model": None, "adapter": None}
    if cfg.mode == "lora":
        from peft import get_peft_model

        peft_model = get_peft_model(base, lora_config(cfg))
        result = peft_model.load_state_dict(state, strict=False)
        if result.unexpected_keys or any("lora_" in k for k in result.missing_keys):
            raise RuntimeError(f"LoRA export does not fit: {result}")
        adapter = export_dir / "adapter"
        peft_model.save_pretrained(adapter)
        tokenizer.save_pretrained(adapter)
        paths["adapter"] = str(adapter)
        if cfg.export_merged:
            merged = peft_model.merge_and_unload()
            _save_full(merged, tokenizer, export_dir / "model")
            paths["model"] = str(export_dir / "model")
    else:
        result = base.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if base.config.get_text_config().tie_word_embeddings else set()
        if result.unexpected_keys or set(result.missing_keys) - tied:
            raise RuntimeError(f"full export does not fit: {result}")
        _save_full(base, tokenizer, export_dir / "model")
        paths["model"] = str(export_dir / "model")
    (export_dir / "export.json").write_text(json.dumps({**paths, "base_model": model_path, "mode": cfg.mode}))
    log.info("exported %s", paths)
    return paths


def _save_full(model, tokenizer, out: Path) -> None:
    model.config.use_cache = True  # training turned it off; inference wants it
    model.save_pretrained(out, safe_serialization=True)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


# --------------------------------------------------------------------------------------------
# Driver


def build_trainer(config: dict, datasets: dict, cfg: TrainConfig, gpu: bool, storage: str):
    """The ``TorchTrainer`` (not started)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=gpu),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=MAX_FAILURES),
        ),
        datasets=datasets,
        # Each rank reads only its own dataset; none is split (see the module docstring).
        dataset_config=DataConfig(datasets_to_split=[]),
    )


def run_train(cfg: NatRayConfig) -> dict:
    """Fine-tune ``cfg.train.base_model`` on NAT data; resume the run if it exists; export the model.

    Returns:
        ``{"run_dir", "export", "data", "schedule", "start_step", "step", "history", "final_loss",
        "seconds", "resumed"}``.

    Raises:
        ConfigError / DataError / ModelError: before training starts, for bad settings or inputs.
    """
    import ray

    from nat_ray.models import resolve_model
    from nat_ray.train_step import check_lora_targets_for

    t = cfg.train
    began = time.time()
    model_path = resolve_model(t.base_model)
    if t.mode == "lora":
        check_lora_targets_for(model_path, t.lora_target_modules)
    trajectories = read_trajectories(t.data)
    examples, selection = select_examples(t, trajectories)
    storage = storage_root(t.storage_path)
    local = "://" not in storage
    run_dir = Path(storage) / t.run_name
    export_dir = f"{storage}/{t.run_name}/export"
    init_ray(t.num_workers)
    gpu = t.use_gpu if t.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= t.num_workers
    check_resources(t, gpu)
    fingerprint = run_fingerprint(t, model_path, gpu)
    resumed = check_resume(run_dir, fingerprint) if local else False
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows, data_stats = prepare_rows(t, examples, selection, model_path)
    schedule = make_schedule(len(rows), t)
    log.info(
        "train %s: %d examples -> %d rows (%d tokens, %d with loss; %d truncated, %d dropped), "
        "%d steps (%d per epoch, %d micro-batches per worker per step), %s",
        t.run_name,
        data_stats["examples"],
        data_stats["rows"],
        data_stats["tokens"],
        data_stats["loss_tokens"],
        data_stats["truncated"],
        data_stats["dropped_overlong"],
        schedule.total_steps,
        schedule.steps_per_epoch,
        schedule.accum,
        "GPU" if gpu else "CPU",
    )
    if local:
        write_fingerprint(run_dir, fingerprint)
    tokenizer = _tokenizer(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    datasets = {
        f"rank{r}": ray.data.from_arrow(rank_table(rows, schedule.rank_stream(r, t.seed)))
        for r in range(t.num_workers)
    }
    config = {
        "train": asdict(t),
        "model_path": model_path,
        "gpu": gpu,
        "schedule": asdict(schedule),
        "pad_id": pad_id,
        "run_dir": f"{storage}/{t.run_name}",
        "local": local,
        "export_dir": export_dir,
        "tensorboard_dir": str(run_dir / "tensorboard") if local else None,
    }
    result = build_trainer(config, datasets, t, gpu, storage).fit()
    metrics = result.metrics or {}
    export_file = run_dir / "export" / "export.json"
    history = metrics.get("history", [])
    return {
        "run_dir": str(run_dir),
        "export": json.loads(export_file.read_text()) if export_file.is_file() else None,
        "data": data_stats,
        "schedule": asdict(schedule),
        "start_step": metrics.get("start_step", 0),
        "step": metrics.get("step", 0),
        "history": history,
        "final_loss": history[-1]["loss"] if history else None,
        "seconds": round(time.time() - began, 1),
        "resumed": resumed,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
    }


def format_result(result: dict) -> str:
    d, s = result["data"], result["schedule"]
    lines = [
        f"data      {d['positives']} positives + {d['negatives']} negatives -> {d['examples']} examples "
        f"({d['truncated']} truncated, {d['dropped_overlong']} dropped as over-long, "
        f"{d['dropped_no_loss']} without loss tokens) -> {d['rows']} rows, {d['tokens']} tokens "
        f"({d['loss_tokens']} with loss)"
        + (f", packing efficiency {d['packing_efficiency']:.0%}" if d["packing_efficiency"] else ""),
        f"schedule  {s['total_steps']} steps ({s['steps_per_epoch']} per epoch, global batch {s['global_batch']}, "
        f"micro-batch {s['micro_batch']} x {s['workers']} workers x {s['accum']} accumulation)",
        f"training  steps {result['start_step']} -> {result['step']}"
        + (" (resumed)" if result["start_step"] else "")
        + (f", final loss {result['final_loss']:.4f}" if result["final_loss"] is not None else "")
        + f", {result['seconds']}s",
    ]
    if result["history"]:
        first = result["history"][0]
        lines.append(
            f"loss      step {first['step']}: {first['loss']:.4f} -> step {result['step']}: "
            f"{result['history'][-1]['loss']:.4f}"
        )
    export = result["export"] or {}
    for key in ("model", "adapter"):
        if export.get(key):
            lines.append(f"export    {key}: {export[key]}")
    lines.append(f"run dir   {result['run_dir']}  (same run_name again resumes; TensorBoard: tensorboard/)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``nat-ray train``: load the config, train, print a summary. Returns the exit code."""
    from nat_ray.config import load_config

    cfg = load_config(NatRayConfig, args.config, list(args.overrides))
    result = run_train(cfg)
    print(format_result(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``train`` on the CLI's subparsers; the parser's ``func`` is :func:`run`."""
    p = subparsers.add_parser(
        "train",
        help="fine-tune on NAT data with Ray Train + DeepSpeed (stage 2)",
        description=(
            "Build NAT training data from trajectory Parquet (train.variant, seeded selection), tokenize\n"
            "it with loss on the agent's turns only, optionally pack it, and fine-tune train.base_model\n"
            "(full or LoRA) with Ray Train workers running DeepSpeed ZeRO. Checkpoints every\n"
            "train.checkpoint_every steps; starting the same train.run_name again resumes it. The model is\n"
            "exported to <storage_path>/<run_name>/export/ (model/ and, for LoRA, adapter/).\n"
            "Set RAY_ADDRESS to use a running cluster; otherwise a local Ray starts."
        ),
        epilog=(
            "examples:\n"
            "  nat-ray import-nat && nat-ray train --config configs/train.yaml\n"
            "  nat-ray train --config configs/train_lora.yaml --set train.lora_rank=32\n"
            "  nat-ray train --config configs/train.yaml --set train.variant=nut --set train.run_name=nut"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="YAML", help="config file (values override the defaults)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set train.max_steps=20 (repeatable; value parsed as YAML)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the result (metrics, paths) as JSON")
    p.set_defaults(func=run)
    return p
