"""``--dry-run``: every check a command makes before it starts Ray, all of them, nothing written.

Each check is a function the stage itself calls before its first piece of work (task files, the
prompt, the data, the model, tool plug-ins, MCP servers, the output folder); the dry run calls them all and
collects their errors instead of stopping at the first, so a config is fixed in one round. No Ray,
no engine, no model weights: seconds. The checks that need a running cluster (resources, a
resumable run's settings against its GPUs) are not here; the stage still makes them when it starts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from nat_ray.config import NatRayConfig
from nat_ray.errors import ConfigError, NatRayError

# (what is checked, the check): a check raises a NatRayError naming the problem.
Check = tuple[str, Callable[[], object]]


def run_checks(checks: Iterable[Check]) -> list[str]:
    """``"<what>: <problem>"`` for every check that failed, in order."""
    problems = []
    for what, check in checks:
        try:
            check()
        except NatRayError as err:
            problems.append(f"{what}: {err}")
    return problems


def writable_folder(path: str | Path, field: str) -> None:
    """``path`` is a folder, or can be made one, where this user may write; nothing is created.

    Raises:
        ConfigError: ``path`` is a file, or its nearest existing parent is not a writable folder.
    """
    target = Path(path).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{field}={str(path)!r} is a file, not a folder")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{field}={str(path)!r}: {existing} is not a folder this user can write in")


def existing_path(path: str, field: str) -> None:
    if not Path(path).expanduser().exists():
        raise ConfigError(f"{field}={path!r} does not exist")


def model_available(model: str | None, backend: str = "vllm") -> None:
    """The model's files (or, for the embedded default, its GGUF) are there; no weights are read.

    Raises:
        ModelError: a missing path, a folder without ``config.json``, an unknown hub id (offline too).
    """
    from nat_ray.models import EMBEDDED_ALIASES, _gguf_path, check_model, models_dir

    if backend == "openai":
        return  # an endpoint, asked when the stage starts
    if model is None or model in EMBEDDED_ALIASES:
        from nat_ray.models import EMBEDDED

        if not (models_dir() / EMBEDDED).is_dir():
            _gguf_path()  # not converted yet: the package it is converted from must be installed
        return
    from nat_ray.models import resolve_export

    check_model(resolve_export(model, "model"))


# --------------------------------------------------------------------------------------------
# Per command


def _task_checks(
    cfg: NatRayConfig, field: str, refs: list[str], split: str | None, limit: int | None
) -> list[Check]:
    """Task files and names, the prompt each task builds, its data split, and its tool plug-ins."""
    from nat_ray.agent import prepare_tasks, tools_for
    from nat_ray.tools import configured_versions
    from nat_ray.tools.mcp import require_servers

    state: dict = {}

    def resolve() -> None:
        # One by one, so the tasks that do resolve still get their prompt, data and tools checked.
        tasks, errors = [], []
        for ref in refs:
            try:
                tasks += prepare_tasks([ref], cfg)[0]
            except NatRayError as err:
                errors.append(str(err))
        state["tasks"], state["tools"] = tasks, tools_for(tasks, cfg)
        if errors:
            raise ConfigError("; ".join(errors))

    def each(fn: Callable) -> Callable[[], None]:
        def run() -> None:
            errors = []
            for task in state.get("tasks", []):
                try:
                    fn(task)
                except NatRayError as err:
                    errors.append(f"{task.name}: {err}")
            if errors:
                raise ConfigError("; ".join(errors))

        return run

    prompt = each(lambda t: t.build_messages("?", cfg.agent.template, None, cfg.agent.shots))
    checks: list[Check] = [
        (field, resolve),
        (f"{field}: prompt", prompt),
        (
            f"{field}: tool plug-ins",
            lambda: configured_versions(state["tools"]) if "tools" in state else None,
        ),
        (
            f"{field}: MCP servers",
            lambda: require_servers(state["tools"].plugins) if "tools" in state else None,
        ),
    ]
    if split is not None:
        checks.append((f"{field}: {split} data", each(lambda t: t.load(split, limit=limit))))
    return checks


def agent_checks(cfg: NatRayConfig) -> list[Check]:
    return [
        *_task_checks(cfg, "agent.task", [cfg.agent.task], None, None),
        ("engine.model", lambda: model_available(cfg.engine.model, cfg.engine.backend)),
    ]


def rollout_checks(cfg: NatRayConfig) -> list[Check]:
    r = cfg.rollout
    return [
        *_task_checks(cfg, "rollout.tasks", r.tasks, r.split, r.limit),
        ("engine.model", lambda: model_available(cfg.engine.model, cfg.engine.backend)),
        ("rollout.output_dir", lambda: writable_folder(r.output_dir, "rollout.output_dir")),
    ]


def train_checks(cfg: NatRayConfig, data: bool = True) -> list[Check]:
    from nat_ray.core.nat_data import get_variant
    from nat_ray.core.preference import check_objective
    from nat_ray.train.data import trajectory_files

    t = cfg.train

    def lora_targets() -> None:
        if t.mode == "lora" and (t.base_model is None or Path(t.base_model).expanduser().is_dir()):
            from nat_ray.models import resolve_model
            from nat_ray.train.step import check_lora_targets_for

            check_lora_targets_for(resolve_model(t.base_model), t.lora_target_modules)

    checks: list[Check] = [
        ("train.variant", lambda: check_objective(t.objective, get_variant(t.variant))),
        ("train.base_model", lambda: model_available(t.base_model)),
        ("train.lora_target_modules", lora_targets),
        ("train.storage_path", lambda: writable_folder(t.storage_path, "train.storage_path")),
    ]
    if data:
        checks.insert(0, ("train.data", lambda: trajectory_files(t.data)))
    return checks


def eval_checks(cfg: NatRayConfig) -> list[Check]:
    from nat_ray.models import check_lora

    e = cfg.eval
    checks = [*_task_checks(cfg, "eval.tasks", e.tasks, e.split, e.limit)]
    if not e.endpoint:
        checks.append(("engine.model", lambda: model_available(cfg.engine.model, cfg.engine.backend)))
    if cfg.serve.lora:
        checks.append(("serve.lora", lambda: check_lora(cfg.serve.lora)))
    checks.append(("eval.output_dir", lambda: writable_folder(e.output_dir, "eval.output_dir")))
    return checks


def serve_checks(cfg: NatRayConfig) -> list[Check]:
    from nat_ray.models import check_lora
    from nat_ray.serve.app import check_limits

    s = cfg.serve
    checks: list[Check] = [
        ("limits", lambda: check_limits(cfg)),
        *_task_checks(cfg, "serve.tasks", s.tasks, None, None),
        ("engine.model", lambda: model_available(cfg.engine.model)),
    ]
    if s.lora:
        checks.append(("serve.lora", lambda: check_lora(s.lora)))
    if s.lora_dir and "://" not in s.lora_dir:
        checks.append(("serve.lora_dir", lambda: writable_folder(s.lora_dir, "serve.lora_dir")))
    return checks


# A run that chains the stages makes their folders itself, under its own; its variants are its own.
_CHAINED_SKIP = ("rollout.output_dir", "train.variant", "train.storage_path", "eval.output_dir")


def _chained_checks(cfg: NatRayConfig, rollout: bool) -> list[Check]:
    """The rollout (when the run collects its data), training and evaluation checks of a pipeline or loop."""
    checks = [*(rollout_checks(cfg) if rollout else []), *train_checks(cfg, data=False), *eval_checks(cfg)]
    return [c for c in checks if c[0] not in _CHAINED_SKIP]


def pipeline_checks(cfg: NatRayConfig) -> list[Check]:
    from nat_ray.core.preference import split_run_variant

    p = cfg.pipeline
    checks: list[Check] = [(f"pipeline.variants: {v}", lambda v=v: split_run_variant(v)) for v in p.variants]
    if p.trajectories:
        checks.append(
            ("pipeline.trajectories", lambda: existing_path(p.trajectories, "pipeline.trajectories"))
        )
    checks += [
        (f"pipeline.extra_trajectories[{i}]", lambda x=x: existing_path(x, "pipeline.extra_trajectories"))
        for i, x in enumerate(p.extra_trajectories)
    ]
    checks += _chained_checks(cfg, rollout=not p.trajectories)
    checks.append(("pipeline.runs_dir", lambda: writable_folder(p.runs_dir, "pipeline.runs_dir")))
    return _unique(checks)


def loop_checks(cfg: NatRayConfig) -> list[Check]:
    from nat_ray.experiment.loop import check_loop_config

    lp = cfg.loop
    checks: list[Check] = [("loop", lambda: check_loop_config(cfg)), *_chained_checks(cfg, rollout=True)]
    checks.append(("loop.runs_dir", lambda: writable_folder(lp.runs_dir, "loop.runs_dir")))
    return _unique(checks)


def index_checks(cfg: NatRayConfig) -> list[Check]:
    def corpus() -> None:
        if cfg.tools.search_backend != "local":
            raise ConfigError("nat-ray index builds the local search index; tools.search_backend is 'http'")
        if cfg.tools.search_corpus:
            existing_path(cfg.tools.search_corpus, "tools.search_corpus")

    return [("tools.search_corpus", corpus)]


def _unique(checks: list[Check]) -> list[Check]:
    """The first check of each name (the pipeline's stages share tasks, prompt and model checks)."""
    seen: set[str] = set()
    out = []
    for name, check in checks:
        if name not in seen:
            seen.add(name)
            out.append((name, check))
    return out


CHECKS: dict[str, Callable[[NatRayConfig], list[Check]]] = {
    "agent": agent_checks,
    "rollout": rollout_checks,
    "train": train_checks,
    "eval": eval_checks,
    "serve": serve_checks,
    "pipeline": pipeline_checks,
    "loop": loop_checks,
    "index": index_checks,
}


def dry_run(command: str, cfg: NatRayConfig) -> str:
    """What ``nat-ray <command> --dry-run`` prints when every check passed.

    Raises:
        ConfigError: every problem found, one per line (the command exits 2 with them).
    """
    checks = CHECKS[command](cfg)
    problems = run_checks(checks)
    if problems:
        lines = [f"dry run: {len(problems)} of {len(checks)} checks failed:"]
        raise ConfigError("\n".join([*lines, *(f"  - {p}" for p in problems)]))
    names = ", ".join(name for name, _ in checks)
    return f"nat-ray {command}: dry run: all {len(checks)} checks passed ({names}); nothing was started"
