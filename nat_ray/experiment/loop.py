"""The closed NAT loop: collect where the agent fails, train on it, evaluate, and go again.

Round 0 collects with the base model (or takes imported teacher trajectories); round r collects
with the agent round r-1 made. Each round then builds NAT data from its trajectories (and, with
``loop.carry_rounds``, earlier rounds'), trains a LoRA adapter (``train.mode: lora``), evaluates
the new agent on the test split and publishes the adapter to ``<run>/adapters/round-<r>/``. The
loop stops after ``loop.rounds`` rounds or once accuracy has not improved for ``loop.patience``.

The stages are the pipeline's own (:func:`~nat_ray.rollout.run.run_rollout`,
:func:`~nat_ray.train.run.run_train`, :func:`~nat_ray.evaluation.run.run_eval`); this module only
chains them. Each round keeps ``<run>/rounds/<r>/manifest.json``, so re-running the name skips
finished rounds and stages (and the stages resume inside themselves too). With ``loop.hot_load``
the rollout's vLLM engines stay up between rounds (:mod:`nat_ray.rollout.engine_pool`) and a round only
sends them a LoRA request for the previous round's adapter; evaluation runs the previous round's
merged export (base + adapter, the same weights a server applies the adapter to).

Everything above the ``run_loop`` section is pure (no Ray, no engine) and unit-tested alone.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from nat_ray import safe_files
from nat_ray.config import LoopConfig, NatRayConfig, to_dict, with_sections
from nat_ray.core import nat_data as columns
from nat_ray.core import records, traffic
from nat_ray.core.nat_data import get_variant
from nat_ray.core.preference import check_objective, inference_template
from nat_ray.errors import ConfigError, DataError, ModelError
from nat_ray.evaluation.results_table import format_comparison, is_smoke_test, round_score
from nat_ray.experiment.judge import judge_episodes, task_judges
from nat_ray.experiment.manifest import Manifest, provenance, run_stage
from nat_ray.experiment.tracking import tracked_run
from nat_ray.models import resolve_model
from nat_ray.paths import PARTS_DIR
from nat_ray.rollout.engine_pool import rollout_with_pool, start_pool
from nat_ray.serve.adapters import publish_adapter
from nat_ray.serve.capture import has_captured, read_captured, read_feedback

log = logging.getLogger(__name__)

ROUND_STAGES = ("rollout", "train", "eval", "publish")
ADAPTERS_DIR = "adapters"
ROUNDS_DIR = "rounds"
TRAFFIC_FILE = "traffic.parquet"  # a round's labelled served episodes, under rounds/<r>/
PLOT_FILE = "accuracy_by_round.png"


# --------------------------------------------------------------------------------------------
# Planning: which round next, on which data, and when to stop (pure)


def round_label(r: int) -> str:
    return f"round-{r}"


def training_rounds(r: int, carry_rounds: int | None) -> list[int]:
    """The rounds whose trajectories train round ``r``, oldest first (``r`` itself always)."""
    if r < 0:
        raise ValueError(f"round must be >= 0, got {r}")
    first = 0 if carry_rounds is None else max(0, r - carry_rounds)
    return list(range(first, r + 1))


def stop_reason(scores: list[float], loop: LoopConfig, base_score: float | None = None) -> str | None:
    """Why the loop ends after rounds ``0..len(scores)-1`` scored ``scores``, or None to go on.

    A round improves when it beats the best accuracy so far (the base model's, when given) by
    more than ``loop.min_delta``; ``loop.patience`` rounds in a row without one end the loop.
    """
    if len(scores) >= loop.rounds:
        return f"ran loop.rounds = {loop.rounds} rounds"
    if loop.patience is None or not scores:
        return None
    best, stale = base_score, 0
    for score in scores:
        if best is None or score > best + loop.min_delta:
            best, stale = score, 0
        else:
            stale += 1
    if stale >= loop.patience:
        return (
            f"{loop.metric} accuracy has not improved on the best, {best:.1f}%, for {stale} round(s) "
            f"(loop.patience = {loop.patience})"
        )
    return None


def next_round(
    scores: dict[int, float], loop: LoopConfig, base_score: float | None = None
) -> tuple[int | None, str | None]:
    """The round to run (or finish) next and None, or None and why the loop is over.

    ``scores`` holds the evaluated rounds; only an unbroken run from round 0 counts, so a round
    that was interrupted before its evaluation is the one to resume.
    """
    done: list[float] = []
    while len(done) in scores:
        done.append(scores[len(done)])
    reason = stop_reason(done, loop, base_score)
    return (None, reason) if reason else (len(done), None)


def stages_to_run(stages: dict) -> list[str]:
    """The round's stages a manifest's ``stages`` mapping does not mark done, in order."""
    return [
        s for s in ROUND_STAGES if not (isinstance(stages.get(s), dict) and stages[s].get("status") == "done")
    ]


def best_round(rounds: list[dict]) -> dict | None:
    """The round with the highest score (the earliest of equals)."""
    scored = [r for r in rounds if r.get("score") is not None]
    return max(scored, key=lambda r: (r["score"], -r["round"])) if scored else None


# --------------------------------------------------------------------------------------------
# Adapters: stacking one on another, publishing (no Ray)


def count_rows(paths: list[str]) -> int:
    """Trajectories in Parquet files or folders (from the footers, nothing is read)."""
    import pyarrow.parquet as pq

    total = 0
    for path in map(Path, paths):
        files = records.part_files(path) if path.is_dir() else [path]
        total += sum(pq.read_metadata(f).num_rows for f in files if f.is_file())
    return total


# --------------------------------------------------------------------------------------------
# Results: table, JSON, plot (pure but for the files)


def eval_digest(summary: dict) -> dict:
    """Mean turns and failure reasons of a round's evaluation, over its tasks."""
    tasks = summary.get("tasks", {})
    failures: Counter = Counter()
    for t in tasks.values():
        failures.update(t.get("failures", {}))
    turns = [t["mean_turns"]["mean"] for t in tasks.values() if "mean_turns" in t]
    return {
        "mean_turns": statistics.fmean(turns) if turns else None,
        "failures": dict(failures.most_common()),
    }


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_results(
    base: dict | None, rounds: list[dict], loop: LoopConfig, stopped: str | None, smoke_test: bool
) -> str:
    """``results.md``: accuracy per round (both rules, n, Wilson intervals, ``~`` within noise of
    the first row) from :func:`nat_ray.evaluation.results_table.format_comparison`, then a row per round of
    what it trained on and how it behaved."""
    results = {}
    if base is not None:
        results["base"] = base["summary"]
    for r in rounds:
        if r.get("summary"):
            results[round_label(r["round"])] = r["summary"]
    text = format_comparison(results, smoke_test=smoke_test) if results else ""
    text = text.replace("# NAT pipeline results", "# NAT loop results", 1)
    lines = [
        "",
        f"## Rounds ({loop.metric} accuracy decides; stop: {stopped or 'not yet'})",
        "",
        "| Round | Collected with | Trajectories (round / trained on) | Training examples (pos + neg) "
        f"| Final loss | Acc. {loop.metric} % (mean of tasks) | Best so far | Mean turns | Failure reasons | Adapter |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    best = base.get("score") if base else None
    for r in rounds:
        score = r.get("score")
        improved = score is not None and (best is None or score > best + loop.min_delta)
        if improved:
            best = score
        digest = eval_digest(r.get("summary") or {})
        failures = ", ".join(f"{k} {v}" for k, v in digest["failures"].items()) or "-"
        cells = [
            str(r["round"]),
            str(r.get("collected_with") or "-"),
            f"{r.get('trajectories', '-')} / {r.get('trained_on', '-')}",
            f"{r.get('examples', '-')} ({r.get('positives', '-')} + {r.get('negatives', '-')})",
            _num(r.get("final_loss"), ".4f"),
            _num(score, ".1f") + (" (new best)" if improved else ""),
            _num(best, ".1f"),
            _num(digest["mean_turns"], ".2f"),
            failures,
            "/".join(Path(r["adapter"]).parts[-2:]) if r.get("adapter") else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Trajectories: collected by the round / the round's NAT data was built from (with "
        "loop.carry_rounds, earlier rounds' too). Failure reasons and turns: the round's evaluation.",
    ]
    served = [(r["round"], r["traffic"]) for r in rounds if r.get("traffic")]
    if served:
        lines += ["", f"## Served traffic ({loop.traffic_dir})", ""]
        lines += [f"- round {r}: {traffic.describe(counts)}" for r, counts in served]
    return text + "\n".join(lines) + "\n"


def write_results(
    run_dir: Path,
    base: dict | None,
    rounds: list[dict],
    loop: LoopConfig,
    stopped: str | None,
    smoke_test: bool,
) -> str:
    """``results.md``, ``results.json`` and the plot; returns the Markdown."""
    text = format_results(base, rounds, loop, stopped, smoke_test)
    best = best_round(rounds)
    safe_files.write_json(
        run_dir / "results.json",
        {
            "metric": loop.metric,
            "stopped": stopped,
            "best_round": best["round"] if best else None,
            "base": base,
            "rounds": rounds,
            "smoke_test": smoke_test,
        },
    )
    safe_files.write_bytes(run_dir / "results.md", text.encode())
    try:
        from nat_ray.evaluation.plots import plot_accuracy  # matplotlib: only when there is a plot

        plot_accuracy(base, rounds, run_dir / PLOT_FILE)
    except ImportError as err:  # matplotlib comes with the dev extra; the table does not need it
        log.warning("no %s: %s (pip install matplotlib)", PLOT_FILE, err)
    return text


# --------------------------------------------------------------------------------------------
# run_loop: the stages, chained (Ray, engines and DeepSpeed start inside the stages)


def check_loop_config(cfg: NatRayConfig) -> None:
    """Refuse what would fail rounds later, before any work starts.

    Raises:
        ConfigError: training is not LoRA, the variant is unknown, or the teacher data is missing.
    """

    if cfg.train.mode != "lora":
        raise ConfigError(f"the loop trains LoRA adapters: set train.mode: lora (got {cfg.train.mode!r})")
    check_objective(cfg.train.objective, get_variant(cfg.train.variant))
    if cfg.loop.round0 != "base" and not Path(cfg.loop.round0).exists():
        raise ConfigError(
            f"loop.round0={cfg.loop.round0!r} is neither 'base' nor an existing Parquet file or folder"
        )
    traffic_dir = cfg.loop.traffic_dir
    if traffic_dir is not None and not has_captured(traffic_dir):
        raise ConfigError(
            f"loop.traffic_dir={traffic_dir!r} is not a capture location (give a server's serve.capture_dir; "
            "the server needs serve.capture: true)"
        )
    if cfg.loop.continue_adapter and cfg.loop.rounds * cfg.train.lora_rank > cfg.engine.max_lora_rank:
        log.warning(
            "loop.continue_adapter stacks adapters: after %d rounds the rank is %d, above engine.max_lora_rank=%d "
            "(a server needs that much)",
            cfg.loop.rounds,
            cfg.loop.rounds * cfg.train.lora_rank,
            cfg.engine.max_lora_rank,
        )


class _Loop:
    """One loop run: its folder, tracker and the stage functions of a round."""

    def __init__(self, cfg: NatRayConfig, tracker) -> None:

        self.cfg = cfg
        self.loop = cfg.loop
        self.run_dir = Path(self.loop.runs_dir) / self.loop.name
        self.tracker = tracker
        self.smoke_test = is_smoke_test(cfg.engine.model, cfg.engine.device)
        self.tuned_agent = {
            "template": inference_template(cfg.train.variant, cfg.train.objective),
            "shots": 0,
        }
        # Hot-loading needs vLLM engines that stay up; a teacher or HF engine starts afresh each round.
        self.hot_load = cfg.loop.hot_load and cfg.engine.backend == "vllm"
        self._pool = None

    def engine_pool(self):
        """The rollout's engines, started on first use and kept up until :meth:`close`."""
        if self._pool is None:
            self._pool = start_pool(self.cfg, name=f"nat-ray-loop-{self.loop.name}", hold_cpus=False)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def manifest(self, path: Path, header: dict):

        return Manifest(path, {**header, "config": to_dict(self.cfg), **provenance()})

    def stage(self, manifest, name: str, fn, step: int, tracked_as: str | None = None) -> dict:
        """:func:`nat_ray.experiment.manifest.run_stage`, logged as a nested run ``tracked_as`` when it runs."""

        return run_stage(manifest, name, self.tracker.stage(tracked_as or name, fn, step=step))

    def evaluate(self, model: str, agent: dict, out: Path) -> dict:
        from nat_ray.evaluation.run import run_eval

        eval_cfg = with_sections(
            self.cfg, engine={"model": model}, agent=agent, eval={"output_dir": str(out)}
        )
        summary = run_eval(eval_cfg, smoke_test=self.smoke_test).scores
        return {
            "summary": summary,
            "score": round_score(summary, self.loop.metric),
            "score_robust": round_score(summary, "robust"),
            "score_paper": round_score(summary, "paper"),
        }

    def base(self) -> dict | None:
        if not self.loop.evaluate_base:
            return None
        manifest = self.manifest(self.run_dir / "manifest.json", {"name": self.loop.name})
        agent = {"template": self.cfg.agent.template, "shots": self.cfg.agent.shots}
        return self.stage(
            manifest,
            "eval:base",
            lambda: self.evaluate(self.cfg.engine.model, agent, self.run_dir / "eval-base"),
            step=0,
        )

    def round(self, r: int, earlier: dict[int, dict]) -> tuple[dict, bool]:
        """Run (or finish, or just read back) round ``r``: collect, train, evaluate, publish.

        Returns its record and whether any stage ran now. Each stage's result is kept in the round's
        manifest, so a finished stage is read back instead of run again.
        """
        rnd = _Round(r, self.run_dir / ROUNDS_DIR / str(r), earlier)
        manifest = self.manifest(rnd.dir / "manifest.json", {"name": self.loop.name, "round": r})
        todo = stages_to_run(manifest.data["stages"])
        label = round_label(r)
        # MLflow's nested runs carry the round in their names: round-<r>/rollout, ...
        collected = self.stage(manifest, "rollout", lambda: self.collect(rnd), r, f"{label}/rollout")
        trained = self.stage(manifest, "train", lambda: self.train(rnd, collected), r, f"{label}/train")
        model = trained["export"]["model"]
        evaluated = self.stage(
            manifest,
            "eval",
            lambda: self.evaluate(model, self.tuned_agent, rnd.dir / "eval"),
            r,
            f"{label}/eval",
        )
        published = self.stage(manifest, "publish", lambda: self.publish(rnd, trained), r, f"{label}/publish")
        record = {
            "round": r,
            "collected_with": collected.get("collected_with"),
            "trajectories": collected.get("trajectories"),
            "traffic": collected.get("traffic"),
            "collected": collected["data"],
            "data": trained["data"],
            "trained_on": trained.get("trained_on"),
            "examples": trained.get("examples"),
            "positives": trained.get("positives"),
            "negatives": trained.get("negatives"),
            "final_loss": trained.get("final_loss"),
            "model": model,
            "adapter": published["adapter"],
            "published": published.get("published"),
            "summary": evaluated["summary"],
            "score": evaluated["score"],
            "score_robust": evaluated["score_robust"],
            "score_paper": evaluated["score_paper"],
            "seconds": round(sum(manifest.data["stages"][s].get("seconds", 0) for s in ROUND_STAGES), 1),
        }
        return record, bool(todo)

    def collect(self, rnd: _Round) -> dict:
        """The round's trajectories: a rollout's (:meth:`roll_out`) unless ``loop.traffic_only`` (round 0
        still takes ``loop.round0``'s teacher trajectories), and with ``loop.traffic_dir`` the served
        episodes captured since the earlier rounds (:meth:`traffic`)."""
        teacher = rnd.r == 0 and self.loop.round0 != "base"
        if self.loop.traffic_only and not teacher:
            collected = {"data": [], "trajectories": 0, "collected_with": "traffic"}
        else:
            collected = self.roll_out(rnd)
        if self.loop.traffic_dir:
            served = self.traffic(rnd)
            collected["data"] = collected["data"] + served.pop("data")
            collected["traffic"] = served
        return collected

    def traffic(self, rnd: _Round) -> dict:
        """The captured episodes no earlier round trained on, labelled (feedback, else gold), written to
        ``rounds/<r>/traffic.parquet``; with the counts of each label and of those left out. Episodes
        neither labels go to their task's judge, when it names one."""
        import pyarrow.parquet as pq

        folder = self.loop.traffic_dir
        used: set[str] = set()
        for k in range(rnd.r):
            part = self.run_dir / ROUNDS_DIR / str(k) / TRAFFIC_FILE
            if part.is_file():
                used.update(pq.read_table(part, columns=[columns.TRAJECTORY_ID]).column(0).to_pylist())
        rows, counts = traffic.label_traffic(
            read_captured(folder),
            read_feedback(folder),
            used,
            judge=lambda waiting: judge_episodes(waiting, task_judges(waiting), folder),
        )
        log.info("round %d, traffic from %s: %s", rnd.r, folder, traffic.describe(counts))
        if not rows:
            if self.loop.traffic_only and not (rnd.r == 0 and self.loop.round0 != "base"):
                raise DataError(
                    f"round {rnd.r}: no new labelled episode in {folder} ({traffic.describe(counts)}); "
                    "send feedback (POST /v1/feedback) or requests with gold"
                )
            return {"data": [], **counts}
        path = rnd.dir / TRAFFIC_FILE
        records.write_rows(rows, path)
        return {"data": [str(path)], **counts}

    def roll_out(self, rnd: _Round) -> dict:
        """The teacher's trajectories for round 0 when ``loop.round0`` names them, else a rollout with the
        previous round's agent (the base model's for round 0)."""
        from nat_ray.rollout.run import run_rollout

        if rnd.r == 0 and self.loop.round0 != "base":
            return {
                "data": [self.loop.round0],
                "trajectories": count_rows([self.loop.round0]),
                "collected_with": "teacher",
            }
        previous = rnd.previous
        agent = (
            self.tuned_agent
            if previous
            else {"template": self.cfg.agent.template, "shots": self.cfg.agent.shots}
        )
        output = {"output_dir": str(rnd.dir / "rollout")}
        if self.hot_load:  # the running engines load the last adapter (published on the base)
            rollout_cfg = with_sections(self.cfg, agent=agent, rollout=output)
            adapter = previous["adapter"] if previous else None
            result = rollout_with_pool(rollout_cfg, self.engine_pool(), adapter, progress=False)
        else:
            model = previous["model"] if previous else self.cfg.engine.model
            rollout_cfg = with_sections(self.cfg, engine={"model": model}, agent=agent, rollout=output)
            result = run_rollout(rollout_cfg, progress=False)
        return {
            "data": [str(rnd.dir / "rollout" / PARTS_DIR)],
            "trajectories": result.total,
            "collected_with": round_label(rnd.r - 1) if previous else "base",
            "summary": result.summary,
        }

    def train(self, rnd: _Round, collected: dict) -> dict:
        """A LoRA adapter trained on the round's trajectories (and earlier rounds', by
        ``loop.carry_rounds``), exported with its merged model."""
        from nat_ray.train.run import run_train

        carried = [k for k in training_rounds(rnd.r, self.loop.carry_rounds) if k != rnd.r]
        data = [p for k in carried for p in rnd.earlier[k]["collected"]] + collected["data"]
        previous = rnd.previous
        continued = previous is not None and self.loop.continue_adapter
        train_cfg = with_sections(
            self.cfg,
            train={
                "data": data,
                "run_name": round_label(rnd.r),
                "storage_path": str(self.run_dir / "train"),
                "base_model": previous["model"] if continued else self.cfg.train.base_model,
                "export_merged": True,
            },
        )
        try:
            result = run_train(train_cfg)
        except DataError as err:
            # A weak agent can fail every question of a round: say which round and what helps.
            raise DataError(
                f"round {rnd.r}: {err} (more questions or samples per round, rollout.limit / "
                "rollout.samples, or loop.carry_rounds to train on earlier rounds too, would help)"
            ) from None
        if not (result.export or {}).get("adapter"):
            raise ModelError(
                f"round {rnd.r}: training exported no LoRA adapter (see {result.run_dir}/export)"
            )
        return {
            "data": data,
            "trained_on": count_rows(data),
            "examples": result.data["examples"],
            "positives": result.data["positives"],
            "negatives": result.data["negatives"],
            "export": result.export,
            "final_loss": result.final_loss,
            "step": result.step,
            "history": result.history,
        }

    def publish(self, rnd: _Round, trained: dict) -> dict:
        """The round's adapter under ``<run>/adapters/round-<r>/`` (and ``loop.publish_dir``); with
        ``loop.continue_adapter`` stacked on the previous round's, so it is an adapter of the base."""
        adapter = Path(trained["export"]["adapter"])
        label = round_label(rnd.r)
        if rnd.previous and self.loop.continue_adapter:
            from nat_ray.train.export import stack_adapters  # torch: only when stacking

            adapter = stack_adapters(
                Path(rnd.previous["adapter"]),
                adapter,
                rnd.dir / "stacked-adapter",
                resolve_model(self.cfg.train.base_model),
            )
        out = {"adapter": publish_adapter(adapter, self.run_dir / ADAPTERS_DIR, label)}
        if self.loop.publish_dir:  # versioned by round: a name is never reused for other weights
            out["published"] = publish_adapter(adapter, self.loop.publish_dir, f"{self.loop.name}-{label}")
        return out


@dataclass(frozen=True)
class _Round:
    """What a round's stages share: its number and folder, and the rounds before it."""

    r: int
    dir: Path
    earlier: dict[int, dict]

    @property
    def previous(self) -> dict | None:
        """The round before this one, when there is one."""
        return self.earlier.get(self.r - 1)


def run_loop(cfg: NatRayConfig) -> dict:
    """Run (or resume) the loop ``cfg.loop`` describes; return the rounds and the results table.

    Raises:
        ConfigError / DataError / ModelError: for bad settings or inputs, before the first stage.
    """

    check_loop_config(cfg)
    loop = cfg.loop
    run_dir = Path(loop.runs_dir) / loop.name
    run_dir.mkdir(parents=True, exist_ok=True)
    with (
        tracked_run(run_dir, loop.name, "loop", to_dict(cfg)) as tracker,
        contextlib.closing(_Loop(cfg, tracker)) as runner,
    ):
        base = runner.base()
        base_score = base["score"] if base else None
        rounds: dict[int, dict] = {}
        stopped = None
        while True:
            r, stopped = next_round({k: v["score"] for k, v in rounds.items()}, loop, base_score)
            if r is None:
                break
            record, ran = runner.round(r, rounds)
            rounds[r] = record
            if ran:
                tracker.log_metrics(
                    {
                        k: record[k]
                        for k in (
                            "score",
                            "score_robust",
                            "score_paper",
                            "trajectories",
                            "trained_on",
                            "examples",
                            "final_loss",
                        )
                        if record.get(k) is not None
                    },
                    step=r,
                    prefix="loop",
                )
            write_results(run_dir, base, list(rounds.values()), loop, None, runner.smoke_test)
        ordered = [rounds[k] for k in sorted(rounds)]
        log.info("loop %s: stopped: %s", loop.name, stopped)
        table = write_results(run_dir, base, ordered, loop, stopped, runner.smoke_test)
        best = best_round(ordered)
        if best is not None:
            tracker.log_metrics({"best_round": best["round"], "best_score": best["score"]})
        tracker.log_artifacts([run_dir / "results.md", run_dir / "results.json", run_dir / PLOT_FILE])
    return {"run_dir": str(run_dir), "rounds": ordered, "base": base, "stopped": stopped, "table": table}


def main_loop(cfg: NatRayConfig, json_path: str | None = None) -> int:
    """``nat-ray loop``: run or resume the loop, print the table and where everything went."""
    result = run_loop(cfg)
    out = safe_files.tables_stream(json_path)
    print(result["table"], file=out)
    run_dir = result["run_dir"]
    print(f"stopped: {result['stopped']}", file=out)
    print(
        f"run folder: {run_dir} (results.md, results.json, {PLOT_FILE}, adapters/round-<r>/, rounds/<r>/manifest.json)",
        file=out,
    )
    print(
        f"look: pipx run mlflow ui --backend-store-uri {run_dir}/mlruns   |   "
        f"tensorboard --logdir {run_dir}/tensorboard (neither is in .venv: README, 'Closed loop')",
        file=out,
    )
    if json_path:
        safe_files.write_result(json_path, result)
    return 0
