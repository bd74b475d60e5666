"""The training run, driver side: check everything, resume or start, build the TorchTrainer, summarize.

Everything that can be wrong with the inputs is checked before the trainer starts. A run started
again with the same ``run_name`` and ``storage_path`` resumes from its latest checkpoint (Ray Train
restores it; the worker reloads the DeepSpeed state and skips the steps already taken); a run
whose settings changed in a way that breaks that is refused.

Layout under ``<storage_path>/<run_name>/``: Ray Train's ``step_NNNNNN/`` checkpoints,
``nat_run.json`` (the settings a resume must match), ``tensorboard/``, and ``export/``
(:mod:`nat_ray.train.export`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from nat_ray import safe_files
from nat_ray.config import NatRayConfig, TrainConfig
from nat_ray.core import nat_data
from nat_ray.core.agent_card import AgentCard, write_card
from nat_ray.core.nat_data import get_variant
from nat_ray.core.preference import check_objective, inference_template
from nat_ray.errors import ConfigError
from nat_ray.models import resolve_model
from nat_ray.paths import LOSS_SAMPLE_FILE, PROGRESS_FILE
from nat_ray.ray_runtime import init_ray
from nat_ray.tasks import get_task, register_tasks
from nat_ray.train.checkpoints import checkpoint_folders, set_aside_damaged
from nat_ray.train.data import load_tokenizer, make_schedule, pad_token_id, trajectory_files
from nat_ray.train.prepare import (
    custom_task_files,
    loss_sample,
    prepare_data,
    rank_dataset,
    register_task_files,
)
from nat_ray.train.step import check_lora_targets_for

log = logging.getLogger(__name__)

RUN_FILE = "nat_run.json"
# Settings a resumed run may change; any other difference from the saved run is refused.
RESUMABLE_CHANGES = (
    "max_steps",
    "epochs",
    "checkpoint_every",
    "keep_checkpoints",
    "export_merged",
    "max_failures",
    "placement_strategy",
    "storage_path",  # a run folder moved elsewhere (another disk, a copy) resumes where it is
)
# Logical CPUs a local Ray gets beyond one per worker: room for Ray Data's tokenize and read tasks.
RAY_DATA_CPUS = 2


# --------------------------------------------------------------------------------------------
# Run directory and resume check


def storage_root(path: str) -> str:
    """Absolute storage path (Ray Train needs one); URIs (``s3://``) pass through."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def run_fingerprint(cfg: TrainConfig, model_path: str, gpu: bool) -> dict:
    """The settings a resumed run must share with the run that wrote the checkpoint."""
    keep = {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_CHANGES}
    return {**keep, "resolved_model": model_path, "gpu": gpu}


def has_checkpoint(run_dir: Path) -> bool:
    return bool(checkpoint_folders(run_dir))


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
    saved = _read_fingerprint(file)
    # A setting added since the run was saved counts as unchanged at its default.
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    changed = (
        {k: (saved.get(k), v) for k, v in fingerprint.items() if saved.get(k, defaults.get(k)) != v}
        if saved
        else {}
    )
    if changed:
        listing = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ConfigError(
            f"run {run_dir.name!r} exists in {run_dir.parent} with other settings ({listing}); a resumed "
            f"run may change only {list(RESUMABLE_CHANGES)}. Use a new train.run_name, or delete {run_dir}"
        )
    for line in set_aside_damaged(run_dir):
        log.warning("checkpoint damaged, the resume skips it: %s", line)
    return True


def _read_fingerprint(file: Path) -> dict | None:
    """The saved run's settings; None (warned, set aside) when the file is damaged."""
    try:
        saved = safe_files.read_json(file)
        if not isinstance(saved, dict):
            raise safe_files.DamagedFile(file, "not a mapping of settings")
        return saved
    except safe_files.DamagedFile as damaged:
        kept = safe_files.set_aside(file)
        log.warning(
            "%s is damaged (%s); set aside as %s: resuming without checking the saved run's settings",
            file,
            damaged.why,
            kept.name if kept else "nothing",
        )
        return None


def write_fingerprint(run_dir: Path, fingerprint: dict) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        safe_files.write_json(run_dir / RUN_FILE, fingerprint)
    except OSError as err:
        raise ConfigError(f"train.storage_path: cannot write {run_dir}: {err}") from None


# --------------------------------------------------------------------------------------------
# Ray


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


def build_trainer(config: dict, datasets: dict, cfg: TrainConfig, gpu: bool, storage: str):
    """The ``TorchTrainer`` (not started)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from nat_ray.train.worker import train_loop_per_worker

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=gpu, placement_strategy=cfg.placement_strategy
        ),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets=datasets,
        # Each rank reads only its own dataset (nat_ray.train.data): none is split.
        dataset_config=DataConfig(datasets_to_split=[]),
    )


# --------------------------------------------------------------------------------------------
# The run


class ProgressEcho:
    """Logs the workers' step lines in the driver when Ray hides their output (see ``write_progress``)."""

    def __init__(self, run_dir: Path, enabled: bool, every_s: float = 5.0) -> None:
        import threading

        self.path = run_dir / PROGRESS_FILE
        self.enabled, self.every_s = enabled, every_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="train-progress", daemon=True)

    def __enter__(self) -> ProgressEcho:
        if self.enabled:
            self.path.unlink(missing_ok=True)
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=self.every_s * 2)

    def _run(self) -> None:
        last = ""
        while not self.stop.wait(self.every_s):
            try:
                line = self.path.read_text().strip()
            except OSError:
                continue
            if line and line != last:
                log.info("%s: %s", self.path.parent.name, line)
                last = line


def agent_card_for(cfg: NatRayConfig, files: list[str]) -> AgentCard:
    """The card of a model trained on ``files`` with ``cfg``: asked zero-shot with its variant's template."""
    import pyarrow.dataset as ds

    register_task_files(custom_task_files(files))
    names = sorted(
        set(ds.dataset(files, format="parquet").to_table(columns=[nat_data.TASK]).column(0).to_pylist())
    )
    tasks = []
    for name in names:
        try:
            tasks.append(get_task(name))
        except ConfigError as err:  # the card still names it; its tools and marker come from the others
            log.warning("agent card: task %r is not known here (%s)", name, err)
    template = inference_template(cfg.train.variant, cfg.train.objective)  # KTO, DPO: the plain prompt
    marker = tasks[0].build_messages("{question}", template, None, 0)[-1]["content"] if tasks else ""
    return AgentCard(
        base_model=cfg.train.base_model,
        variant=cfg.train.variant,
        objective=cfg.train.objective,
        template=template,
        shots=0,
        marker=marker,
        tools=sorted({tool for task in tasks for tool in task.tools} | {"finish"}),
        max_turns=cfg.agent.max_turns,
        max_new_tokens=cfg.agent.max_new_tokens,
        tasks=names,
    )


def register_configured_tasks(cfg: NatRayConfig) -> None:
    """Register the config's own tasks (rollout and eval) in this process: rows of a custom task made
    elsewhere (a teacher set shipped with the task) are rebuilt from the task file configured here."""

    for ref in dict.fromkeys([*cfg.rollout.tasks, *cfg.eval.tasks]):
        try:
            register_tasks([ref], cfg.tasks_dir)
        except ConfigError as err:  # not needed to train; the rows' own task files may still be found
            log.debug("not registering task %s: %s", ref, err)


def write_agent_cards(cfg: NatRayConfig, files: list[str], export: dict) -> None:
    """``agent_card.json`` beside every exported model and adapter (see :mod:`nat_ray.core.agent_card`)."""
    card = agent_card_for(cfg, files)
    for key in ("model", "adapter"):
        if export.get(key):
            write_card(card, export[key])


@dataclass(frozen=True)
class TrainResult:
    """What a training run did and made (:func:`run_train`); :meth:`to_dict` for JSON and manifests.

    Attributes:
        run_dir: the run's folder (checkpoints, export, TensorBoard).
        export: ``export/export.json``: the paths of the merged ``model`` and the ``adapter`` (LoRA),
            with the run's precision; ``None`` when nothing was exported.
        data: the training data's counts (positives, negatives, examples, rows, tokens, ...).
        schedule: steps, batches and accumulation, as :class:`~nat_ray.train.data.Schedule`.
        start_step: the step this start resumed from (0: a fresh run).
        step: the last step trained.
        history: one entry per step (loss, learning rate, tokens/s).
        final_loss: the last step's loss.
        seconds: wall time of this start.
        resumed: whether this start resumed a checkpoint.
        checkpoint: the last checkpoint Ray Train kept.
        objective: ``train.objective`` (sft, kto, dpo); the data counts say how DPO drew its pairs
            (``pairs``) or which class weights KTO used (``kto_weights``).
    """

    run_dir: str
    export: dict | None
    data: dict
    schedule: dict
    start_step: int
    step: int
    history: list[dict]
    final_loss: float | None
    seconds: float
    resumed: bool
    checkpoint: str | None
    objective: str = "sft"

    def to_dict(self) -> dict:
        return asdict(self)


def run_train(cfg: NatRayConfig) -> TrainResult:
    """Fine-tune ``cfg.train.base_model`` on NAT data; resume the run if it exists; export the model.

    Returns:
        a :class:`TrainResult`.

    Raises:
        ConfigError / DataError / ModelError: before training starts, for bad settings or inputs.
    """
    import ray

    t = cfg.train
    began = time.time()
    model_path = resolve_model(t.base_model)
    if t.mode == "lora":
        check_lora_targets_for(model_path, t.lora_target_modules)
    # Bad input fails here, before Ray starts; the rows are read on Ray Data below.
    files = trajectory_files(t.data)
    register_configured_tasks(cfg)
    check_objective(t.objective, get_variant(t.variant))
    storage = storage_root(t.storage_path)
    local = "://" not in storage
    run_dir = Path(storage) / t.run_name
    export_dir = f"{storage}/{t.run_name}/export"
    workers_visible = not ray.is_initialized()  # a Ray started before (the rollout's) hides worker logs
    init_ray(t.num_workers + RAY_DATA_CPUS, worker_logs=True)
    gpu = t.use_gpu if t.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= t.num_workers
    check_resources(t, gpu)
    fingerprint = run_fingerprint(t, model_path, gpu)
    resumed = check_resume(run_dir, fingerprint) if local else False
    ray.data.DataContext.get_current().enable_progress_bars = False
    prepared = prepare_data(t, model_path, files)
    data_stats = prepared.stats
    if local:
        write_loss_sample(run_dir, prepared, load_tokenizer(model_path), t)
    schedule = make_schedule(prepared.num_rows, t)
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
    datasets = {
        f"rank{r}": rank_dataset(prepared, schedule.rank_stream(r, t.seed)) for r in range(t.num_workers)
    }
    pad_id = pad_token_id(load_tokenizer(model_path))
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
        "preference": preference_settings(t, data_stats, pad_id),
    }
    log.info("train %s: starting %d workers (model load, then one line per step)", t.run_name, t.num_workers)
    with ProgressEcho(run_dir, enabled=local and not workers_visible):
        result = build_trainer(config, datasets, t, gpu, storage).fit()
    metrics = result.metrics or {}
    export_file = run_dir / "export" / "export.json"
    if local and export_file.is_file():
        write_agent_cards(cfg, files, json.loads(export_file.read_text()))
    history = metrics.get("history", [])
    return TrainResult(
        run_dir=str(run_dir),
        export=json.loads(export_file.read_text()) if export_file.is_file() else None,
        data=data_stats,
        schedule=asdict(schedule),
        start_step=metrics.get("start_step", 0),
        step=metrics.get("step", 0),
        history=history,
        final_loss=history[-1]["loss"] if history else None,
        seconds=round(time.time() - began, 1),
        resumed=resumed,
        checkpoint=result.checkpoint.path if result.checkpoint else None,
        objective=t.objective,
    )


def write_loss_sample(run_dir: Path, prepared, tokenizer, t: TrainConfig) -> None:
    """``loss_sample.json``: a few of the run's examples, token by token, with the loss each one carries
    (``nat-ray view`` shows them); a courtesy, so a failure to write it never stops training."""
    try:
        sample = {
            "objective": t.objective,
            "variant": t.variant,
            "examples": loss_sample(prepared, tokenizer),
        }
        run_dir.mkdir(parents=True, exist_ok=True)
        safe_files.write_json(run_dir / LOSS_SAMPLE_FILE, sample, checksum=False)
    except (OSError, ValueError) as err:
        log.warning("could not write %s: %s", run_dir / LOSS_SAMPLE_FILE, err)


def preference_settings(t: TrainConfig, data_stats: dict, pad_id: int) -> dict | None:
    """What the workers need of a preference objective (:class:`~nat_ray.train.objectives.Preference`)."""
    if t.objective == "sft":
        return None
    weights = data_stats.get("kto_weights", {})
    return {
        "objective": t.objective,
        "beta": t.dpo_beta if t.objective == "dpo" else t.kto_beta,
        "desirable_weight": weights.get("desirable", 1.0),
        "undesirable_weight": weights.get("undesirable", 1.0),
        "positives": data_stats["positives"],
        "pad_id": pad_id,
    }


def objective_line(objective: str, d: dict) -> str:
    """KTO's class weights or DPO's pair draw, in one summary line."""
    if d.get("pairs"):
        p = d["pairs"]
        return (
            f"objective {objective}: {p['pairs']} pairs from {p['paired_questions']} of {p['questions']} questions "
            f"({p['unused_positives']} positives and {p['unused_negatives']} negatives without a partner, "
            f"seed {p['seed']})"
        )
    if d.get("kto_weights"):
        w = d["kto_weights"]
        return f"objective {objective}: class weights desirable {w['desirable']:.3f}, undesirable {w['undesirable']:.3f}"
    return f"objective {objective}"


def format_result(result: TrainResult) -> str:
    """The human summary of :func:`run_train`'s result: data, schedule, training, loss, export, run dir."""
    result = result.to_dict()
    d, s = result["data"], result["schedule"]
    lines = [objective_line(result["objective"], d)] if result["objective"] != "sft" else []
    lines += [
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


def main_train(cfg: NatRayConfig, json_path: str | None = None) -> int:
    """``nat-ray train``: train, print the summary, optionally write the result as JSON. Returns 0.

    Args:
        cfg: the loaded, validated config (the CLI's ``--config`` / ``--set``).
        json_path: also write :func:`run_train`'s result here (the CLI's ``--json``; ``-``: standard output).
    """
    result = run_train(cfg)
    print(format_result(result), file=safe_files.tables_stream(json_path))
    if json_path:
        safe_files.write_result(json_path, result.to_dict())
    return 0
