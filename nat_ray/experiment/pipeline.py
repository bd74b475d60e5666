"""The whole NAT experiment in one command, resumable stage by stage.

rollout (or imported trajectories) -> train each data variant (w/o-Neg, NUT, NAT by default) ->
evaluate the base model and every tuned model -> ``results.md`` / ``results.json``.

Every stage's outcome goes into ``runs/<name>/manifest.json`` the moment it finishes, with the
resolved config, package versions, git commit, data file hashes, model ids and timings; running
the same name again skips the stages the manifest marks done (and the rollout and training
stages resume inside themselves too).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from nat_ray import safe_files
from nat_ray.config import NatRayConfig, to_dict, with_sections
from nat_ray.core import nat_data, records
from nat_ray.core.preference import inference_template, split_run_variant
from nat_ray.errors import ConfigError
from nat_ray.evaluation.results_table import format_comparison, is_smoke_test
from nat_ray.experiment.manifest import Manifest as StageManifest
from nat_ray.experiment.manifest import provenance, run_stage
from nat_ray.experiment.tracking import tracked_run

log = logging.getLogger(__name__)


def file_hashes(paths: list[str]) -> dict[str, str]:
    """sha256 of every Parquet file under the given files/folders (the data a model was trained on)."""
    hashes = {}
    for path in map(Path, paths):
        files = records.part_files(path) if path.is_dir() else [path]
        for file in files:
            hashes[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return hashes


def data_sources(paths: list[str]) -> list[dict]:
    """Where the training data came from: per file or folder, trajectories, positives and negatives by model.

    A tiny model rarely solves a question alone, so whether its positives came from itself or from a
    teacher is part of what a results table means.
    """
    import pyarrow.dataset as ds

    sources = []
    for path in paths:
        table = ds.dataset(path, format="parquet").to_table(columns=[nat_data.MODEL, nat_data.CORRECT_ROBUST])
        by_model: dict[str, dict[str, int]] = {}
        for model, correct in zip(
            table.column(nat_data.MODEL).to_pylist(), table.column(nat_data.CORRECT_ROBUST).to_pylist()
        ):
            counts = by_model.setdefault(str(model), {"trajectories": 0, "positives": 0, "negatives": 0})
            counts["trajectories"] += 1
            counts["positives" if correct else "negatives"] += 1
        sources.append({"path": path, "models": by_model})
    return sources


def format_sources(sources: list[dict]) -> str:
    """``results.md``'s account of the training data: the source of every positive and negative."""
    lines = [
        "",
        "## Training data",
        "",
        "| Source | Model | Trajectories | Positives | Negatives |",
        "|---|---|---|---|---|",
    ]
    for source in sources:
        for model, counts in source["models"].items():
            lines.append(
                f"| {source['path']} | {model} | {counts['trajectories']} | {counts['positives']} | "
                f"{counts['negatives']} |"
            )
    lines += [
        "",
        "Positives and negatives by the robust verdict, before each variant's selection (w/o-Neg trains "
        "on the positives only).",
    ]
    return "\n".join(lines) + "\n"


def base_label(shots: int, all_shots: list[int]) -> str:
    """The base model's row: ``base``, or ``base-0shot`` / ``base-1shot`` when it is asked both ways."""
    return "base" if len(all_shots) == 1 else f"base-{shots}shot"


class Manifest(StageManifest):
    """``runs/<name>/manifest.json``: the pipeline's stages, headed by its name, resolved config and provenance.

    A damaged one is set aside and the stages run again (:mod:`nat_ray.experiment.manifest` says why).
    """

    def __init__(self, path: Path, cfg: NatRayConfig) -> None:
        super().__init__(path, {"name": cfg.pipeline.name, "config": to_dict(cfg), **provenance()})


def run_pipeline(cfg: NatRayConfig) -> dict:
    """Run (or resume) the experiment ``cfg.pipeline`` describes; return the results table as data."""
    # Every check that needs no work comes before the run folder is made.
    for variant in cfg.pipeline.variants:
        split_run_variant(variant)
    if cfg.pipeline.trajectories and not Path(cfg.pipeline.trajectories).exists():
        raise ConfigError(
            f"pipeline.trajectories={cfg.pipeline.trajectories!r} does not exist (run `nat-ray import-nat`?)"
        )
    for extra in cfg.pipeline.extra_trajectories:
        if not Path(extra).exists():
            raise ConfigError(f"pipeline.extra_trajectories: {extra!r} does not exist")
    run_dir = Path(cfg.pipeline.runs_dir) / cfg.pipeline.name
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(run_dir / "manifest.json", cfg)
    # MLflow (<run>/mlruns) and TensorBoard: a parent run, ended FAILED when a stage raises, and a
    # nested run per stage that runs now.
    with tracked_run(run_dir, cfg.pipeline.name, "pipeline", to_dict(cfg)) as tracker:
        return _run_stages(cfg, run_dir, manifest, tracker)


def _run_stages(cfg: NatRayConfig, run_dir: Path, manifest: Manifest, tracker) -> dict:
    from nat_ray.evaluation.run import run_eval
    from nat_ray.rollout.run import run_rollout
    from nat_ray.train.run import run_train

    if cfg.pipeline.trajectories:
        data = [str(Path(cfg.pipeline.trajectories))]
        run_stage(
            manifest,
            "rollout",
            tracker.stage("rollout", lambda: {"skipped": "pipeline.trajectories given", "data": data}),
        )
    else:
        rollout_cfg = with_sections(cfg, rollout={"output_dir": str(run_dir / "rollout")})

        def rollout() -> dict:
            result = run_rollout(rollout_cfg)
            return {"data": [str(run_dir / "rollout" / "trajectories")], "summary": result.summary}

        data = run_stage(manifest, "rollout", tracker.stage("rollout", rollout))["data"]
    data = [*data, *cfg.pipeline.extra_trajectories]
    manifest.data["data_files"] = file_hashes(data)
    manifest.data["data_sources"] = data_sources(data)
    manifest.save()

    models = {}
    if cfg.pipeline.evaluate_base:
        for shots in cfg.pipeline.base_shots:
            label = base_label(shots, cfg.pipeline.base_shots)
            models[label] = {"model": cfg.engine.model, "template": cfg.agent.template, "shots": shots}
    for variant in cfg.pipeline.variants:
        recipe, objective = split_run_variant(variant)
        train_cfg = with_sections(
            cfg,
            train={
                "data": data,
                "variant": recipe,
                "objective": objective,
                "run_name": variant,
                "storage_path": str(run_dir / "train"),
            },
        )

        def train(train_cfg=train_cfg) -> dict:
            result = run_train(train_cfg)
            # The history goes to MLflow by step (loss; KTO's and DPO's rewards, margin, KL).
            return {
                "export": result.export,
                "final_loss": result.final_loss,
                "step": result.step,
                "objective": result.objective,
                "history": result.history,
            }

        entry = run_stage(manifest, f"train:{variant}", tracker.stage(f"train:{variant}", train))
        # A tuned model answers the prompt it was trained with: zero-shot, its variant's template
        # (KTO's and DPO's: the plain one).
        models[variant] = {
            "model": entry["export"]["model"],
            "template": inference_template(recipe, objective),
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
            return {"summary": run_eval(eval_cfg, smoke_test=smoke_test).scores}

        results[label] = run_stage(manifest, f"eval:{label}", tracker.stage(f"eval:{label}", evaluate))[
            "summary"
        ]
    table = format_comparison(results, smoke_test=smoke_test)
    table += format_sources(manifest.data["data_sources"])
    (run_dir / "results.json").write_text(json.dumps({"models": models, "results": results}, indent=2))
    (run_dir / "results.md").write_text(table)
    tracker.log_artifacts([run_dir / "results.md", run_dir / "results.json"])
    return {"run_dir": str(run_dir), "table": table, "results": results}


def main_pipeline(cfg: NatRayConfig, json_path: str | None = None) -> int:
    result = run_pipeline(cfg)
    out = safe_files.tables_stream(json_path)
    print(result["table"], file=out)
    print(f"run folder: {result['run_dir']} (manifest.json, results.md, results.json)", file=out)
    if json_path:
        safe_files.write_result(json_path, result)
    return 0
