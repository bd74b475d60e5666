"""The loop's decisions, without Ray or an engine: which rounds train on what, when to stop, where
to resume, stacking adapters, the results table and plot, and tracking into a local MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nat_ray.config import LoopConfig, NatRayConfig, TrainConfig, load_config
from nat_ray.errors import ConfigError
from nat_ray.evaluation.plots import plot_accuracy
from nat_ray.experiment.loop import (
    best_round,
    check_loop_config,
    format_results,
    next_round,
    round_score,
    stages_to_run,
    stop_reason,
    training_rounds,
)


def summary(**accuracies: tuple[float, float]) -> dict:
    """An evaluation summary: task -> (robust %, paper %), 10 trajectories each."""
    tasks = {}
    for task, (robust, paper) in accuracies.items():
        tasks[task] = {
            "family": "math",
            "acc_robust": {
                "mean": robust,
                "std": 0.0,
                "n": 10,
                "wilson95": [robust / 2, min(100.0, robust + 20)],
                "seed_ci95": None,
            },
            "acc_paper": {
                "mean": paper,
                "std": 0.0,
                "n": 10,
                "wilson95": [paper / 2, min(100.0, paper + 20)],
                "seed_ci95": None,
            },
            "mean_turns": {"mean": 2.5},
            "failures": {"wrong_answer": 3, "turn_cap": 1},
        }
    return {"tasks": tasks, "math_average": None}


# -- which data a round trains on ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("r", "carry", "expected"),
    [(0, 0, [0]), (3, 0, [3]), (3, 1, [2, 3]), (3, 5, [0, 1, 2, 3]), (3, None, [0, 1, 2, 3]), (0, None, [0])],
)
def test_training_rounds(r, carry, expected):
    assert training_rounds(r, carry) == expected


def test_training_rounds_refuses_a_negative_round():
    with pytest.raises(ValueError):
        training_rounds(-1, 0)


# -- stopping ------------------------------------------------------------------------------------


def test_stops_after_the_configured_rounds():
    loop = LoopConfig(rounds=2)
    assert stop_reason([10.0], loop) is None
    assert "loop.rounds = 2" in stop_reason([10.0, 5.0], loop)


def test_without_patience_a_bad_round_does_not_stop_the_loop():
    assert stop_reason([50.0, 10.0, 5.0], LoopConfig(rounds=5)) is None


def test_patience_counts_rounds_in_a_row_without_a_new_best():
    loop = LoopConfig(rounds=10, patience=2)
    assert stop_reason([10.0, 20.0, 15.0], loop) is None  # one stale round
    assert "patience = 2" in stop_reason([10.0, 20.0, 15.0, 20.0], loop)  # equal is no improvement
    assert stop_reason([10.0, 20.0, 15.0, 25.0, 24.0], loop) is None  # the new best reset the count


def test_patience_starts_from_the_base_models_accuracy():
    loop = LoopConfig(rounds=10, patience=1)
    assert "has not improved on the best, 30.0%" in stop_reason([20.0], loop, base_score=30.0)
    assert stop_reason([40.0], loop, base_score=30.0) is None


def test_min_delta_makes_a_tiny_gain_no_improvement():
    loop = LoopConfig(rounds=10, patience=1, min_delta=2.0)
    assert stop_reason([10.0, 11.5], loop) is not None
    assert stop_reason([10.0, 12.5], loop) is None


# -- resuming ------------------------------------------------------------------------------------


def test_next_round_is_the_first_not_evaluated_and_resume_ignores_gaps():
    loop = LoopConfig(rounds=4)
    assert next_round({}, loop) == (0, None)
    assert next_round({0: 10.0, 1: 20.0}, loop) == (2, None)
    # Round 1 was interrupted before its evaluation; round 2's score (from an older run) waits.
    assert next_round({0: 10.0, 2: 30.0}, loop) == (1, None)
    r, why = next_round({0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}, loop)
    assert r is None and "loop.rounds = 4" in why


def test_raising_rounds_on_a_finished_loop_continues_it_and_patience_keeps_it_stopped():
    scores = {0: 10.0, 1: 5.0}
    assert next_round(scores, LoopConfig(rounds=3)) == (2, None)
    assert next_round(scores, LoopConfig(rounds=3, patience=1))[0] is None


def test_stages_to_run_lists_what_the_manifest_does_not_mark_done():
    assert stages_to_run({}) == ["rollout", "train", "eval", "publish"]
    stages = {"rollout": {"status": "done"}, "train": {"status": "running"}, "eval": "garbage"}
    assert stages_to_run(stages) == ["train", "eval", "publish"]
    assert stages_to_run({s: {"status": "done"} for s in ("rollout", "train", "eval", "publish")}) == []


# -- scores and the table ------------------------------------------------------------------------


def test_round_score_is_the_unweighted_mean_over_tasks_by_the_chosen_rule():
    s = summary(gsm8k=(20.0, 10.0), strategyqa=(60.0, 50.0))
    assert round_score(s, "robust") == 40.0 and round_score(s, "paper") == 30.0
    assert round_score({"tasks": {}}, "robust") is None


def test_best_round_prefers_the_higher_then_the_earlier():
    rounds = [{"round": 0, "score": 10.0}, {"round": 1, "score": 30.0}, {"round": 2, "score": 30.0}]
    assert best_round(rounds)["round"] == 1
    assert best_round([{"round": 0, "score": None}]) is None


def rounds_for_table() -> list[dict]:
    common = {"trajectories": 12, "trained_on": 12, "examples": 10, "positives": 4, "negatives": 6}
    return [
        {
            "round": 0,
            "collected_with": "base",
            "final_loss": 1.5,
            "summary": summary(gsm8k=(20.0, 10.0)),
            "score": 20.0,
            "adapter": "a0",
            **common,
        },
        {
            "round": 1,
            "collected_with": "round-0",
            "final_loss": 1.2,
            "summary": summary(gsm8k=(10.0, 10.0)),
            "score": 10.0,
            "adapter": "a1",
            **common,
        },
    ]


def test_results_table_has_a_row_per_round_with_n_intervals_and_the_banner():
    base = {"summary": summary(gsm8k=(15.0, 15.0)), "score": 15.0}
    text = format_results(
        base, rounds_for_table(), LoopConfig(), "ran loop.rounds = 2 rounds", smoke_test=True
    )
    assert text.startswith("> **Smoke test")
    assert "# NAT loop results" in text
    assert "| base |" in text and "| round-0 |" in text and "| round-1 |" in text
    assert "n=10" in text and "[10.0, 40.0]" in text  # the Wilson interval as given
    row0 = next(line for line in text.splitlines() if line.startswith("| 0 |"))
    row1 = next(line for line in text.splitlines() if line.startswith("| 1 |"))
    assert (
        "20.0 (new best)" in row0 and "12 / 12" in row0 and "10 (4 + 6)" in row0 and "wrong_answer 3" in row0
    )
    assert "(new best)" not in row1 and "| 20.0 |" in row1 and "round-0" in row1
    assert "stop: ran loop.rounds = 2 rounds" in text


def test_plot_is_a_png(tmp_path):
    out = plot_accuracy({"summary": summary(gsm8k=(15.0, 15.0))}, rounds_for_table(), tmp_path / "acc.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_accuracy(None, [], tmp_path / "none.png") is None


# -- adapters ------------------------------------------------------------------------------------


def fake_adapter(folder: Path, a, b, r: int, alpha: int) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    key = "base_model.model.layers.0.q_proj"
    save_file(
        {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}, str(folder / "adapter_model.safetensors")
    )
    (folder / "adapter_config.json").write_text(
        json.dumps({"r": r, "lora_alpha": alpha, "target_modules": ["q_proj"]})
    )
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_stacked_adapters_apply_the_two_updates_one_after_the_other(tmp_path):
    import torch
    from safetensors.torch import load_file

    from nat_ray.train.export import stack_adapters

    torch.manual_seed(0)
    a1, b1, a2, b2 = torch.randn(2, 6), torch.randn(5, 2), torch.randn(4, 6), torch.randn(5, 4)
    first = fake_adapter(tmp_path / "first", a1, b1, r=2, alpha=4)
    second = fake_adapter(tmp_path / "second", a2, b2, r=4, alpha=4)
    out = stack_adapters(first, second, tmp_path / "stacked", base_model="/models/base")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (
        config["r"] == 6 and config["lora_alpha"] == 6 and config["base_model_name_or_path"] == "/models/base"
    )
    w = load_file(str(out / "adapter_model.safetensors"))
    key = "base_model.model.layers.0.q_proj"
    delta = w[f"{key}.lora_B.weight"] @ w[f"{key}.lora_A.weight"]  # scale 1 = alpha / r
    assert torch.allclose(delta, (4 / 2) * b1 @ a1 + (4 / 4) * b2 @ a2, atol=1e-5)
    assert (out / "tokenizer.json").is_file()


def test_adapters_on_different_layers_cannot_be_stacked(tmp_path):
    import torch

    from nat_ray.train.export import stack_adapters

    first = fake_adapter(tmp_path / "first", torch.ones(2, 3), torch.ones(3, 2), 2, 2)
    second = tmp_path / "second"
    second.mkdir()
    from safetensors.torch import save_file

    save_file({"other.lora_A.weight": torch.ones(2, 3)}, str(second / "adapter_model.safetensors"))
    (second / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 2}))
    with pytest.raises(ConfigError, match="different layers"):
        stack_adapters(first, second, tmp_path / "out", "base")


# -- config --------------------------------------------------------------------------------------


def test_loop_config_rejects_bad_values_all_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(NatRayConfig, None, ["loop.rounds=0", "loop.metric=f1"])
    assert "loop" in str(err.value)
    for bad in (["loop.name=a/b"], ["loop.patience=0"], ["loop.carry_rounds=-1"], ["loop.min_delta=-1"]):
        with pytest.raises(ConfigError):
            load_config(NatRayConfig, None, bad)


def test_the_loop_needs_lora_training_and_existing_teacher_data(tmp_path):
    with pytest.raises(ConfigError, match="train.mode: lora"):
        check_loop_config(NatRayConfig(train=TrainConfig(mode="full")))
    lora = TrainConfig(mode="lora")
    with pytest.raises(ConfigError, match="loop.round0"):
        check_loop_config(NatRayConfig(train=lora, loop=LoopConfig(round0=str(tmp_path / "missing.parquet"))))
    check_loop_config(NatRayConfig(train=lora))


def test_shipped_loop_config_is_two_lora_rounds():
    cfg = load_config(NatRayConfig, Path(__file__).resolve().parent.parent / "configs" / "loop.yaml")
    assert cfg.loop.rounds == 2 and cfg.train.mode == "lora"
    check_loop_config(cfg)


# -- tracking ------------------------------------------------------------------------------------


def test_tracking_splits_outputs_into_metrics_and_params():
    from nat_ray.experiment.tracking import split_values

    metrics, params = split_values(
        {
            "score": 12.5,
            "ok": True,
            "nan": float("nan"),
            "export": {"model": "/m"},
            "tasks": {"gsm8k": [1, 2]},
            "train:x": 3,
        }
    )
    assert metrics == {"score": 12.5, "tasks.gsm8k.0": 1.0, "tasks.gsm8k.1": 2.0, "train-x": 3.0}
    assert params == {"ok": "True", "export.model": "/m"}


def test_tracker_logs_a_parent_and_nested_stage_runs_and_resumes_the_parent(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from nat_ray.experiment.manifest import Manifest, run_stage
    from nat_ray.experiment.tracking import tracked_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    manifest = Manifest(tmp_path / "manifest.json")
    for _ in range(2):  # the second pass is a resume: the stage is skipped and not logged again
        with tracked_run(tmp_path, "exp", "pipeline", {"train": {"lora_rank": 8}}) as tracker:
            outputs = {"final_loss": 0.5, "history": [{"step": 1, "loss": 0.9}, {"step": 2, "loss": 0.5}]}
            run_stage(
                manifest,
                "train",
                tracker.stage("train", lambda o=outputs: o, artifacts=(tmp_path / "manifest.json",)),
            )
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    runs = {
        r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    }
    assert set(runs) == {"exp", "train"}
    assert runs["exp"].data.params["train.lora_rank"] == "8" and runs["exp"].info.status == "FINISHED"
    assert runs["train"].data.tags["mlflow.parentRunId"] == runs["exp"].info.run_id
    assert [m.value for m in client.get_metric_history(runs["train"].info.run_id, "loss")] == [0.9, 0.5]
    assert "manifest.json" in {a.path for a in client.list_artifacts(runs["train"].info.run_id)}
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_a_failing_stage_marks_its_run_failed_and_tracking_errors_never_raise(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from nat_ray.experiment.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker(tmp_path, "exp", "loop")

    def boom() -> dict:
        raise RuntimeError("stage failed")

    with pytest.raises(RuntimeError):
        tracker.stage("round-0/train", boom)()
    tracker.client = object()  # a store that fails on every call
    tracker.log_metrics({"score": 1.0})
    tracker.close()
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    runs = {
        r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    }
    assert runs["round-0/train"].info.status == "FAILED"


# -- the orchestration, with stand-in stages -------------------------------------------------------
# The real stages need Ray, vLLM and DeepSpeed (tests/integration/test_loop.py runs them); these
# stand-ins record what each round was asked to do, so the chaining and resuming is checked alone.


class Stages:
    """Stand-ins for run_rollout / run_train / run_eval that log their calls and can fail once."""

    def __init__(self, scores: list[float], fail_eval_of_round: int | None = None) -> None:
        self.scores = scores
        self.fail_eval_of_round = fail_eval_of_round
        self.calls: list[tuple] = []

    def rollout(self, cfg, progress=True):
        self.calls.append(("rollout", cfg.engine.model, cfg.agent.shots))
        out = Path(cfg.rollout.output_dir) / "trajectories"
        out.mkdir(parents=True, exist_ok=True)
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"x": [1, 2, 3]}), out / "part-0.parquet")
        from nat_ray.rollout.run import RolloutResult

        return RolloutResult(str(out.parent), generated=3, skipped=0, total=3, summary=[], seconds=0.0)

    def train(self, cfg):
        self.calls.append(("train", cfg.train.run_name, cfg.train.base_model, tuple(cfg.train.data)))
        export = Path(cfg.train.storage_path) / cfg.train.run_name / "export"
        (export / "adapter").mkdir(parents=True, exist_ok=True)
        (export / "adapter" / "adapter_config.json").write_text("{}")
        (export / "model").mkdir(exist_ok=True)
        from nat_ray.train.run import TrainResult

        return TrainResult(
            run_dir=str(export.parent),
            export={"model": str(export / "model"), "adapter": str(export / "adapter")},
            data={"examples": 3, "positives": 1, "negatives": 2},
            schedule={},
            start_step=0,
            step=1,
            history=[{"step": 1, "loss": 1.0}],
            final_loss=1.0,
            seconds=0.0,
            resumed=False,
            checkpoint=None,
        )

    def eval(self, cfg, smoke_test=None):
        evaluated = sum(c[0] == "eval" for c in self.calls)
        self.calls.append(("eval", cfg.engine.model))
        if cfg.engine.model != "embedded" and self.fail_eval_of_round is not None:
            r = int(Path(cfg.eval.output_dir).parent.name)
            if r == self.fail_eval_of_round:
                self.fail_eval_of_round = None
                raise RuntimeError("killed")
        score = self.scores[min(evaluated, len(self.scores) - 1)]
        from nat_ray.evaluation.run import EvalResult

        table = summary(gsm8k=(score, score))
        return EvalResult({}, table["tasks"], table["math_average"], cfg.eval.output_dir, 0.0)


@pytest.fixture
def stages(monkeypatch, tmp_path):
    import nat_ray.evaluation.run
    import nat_ray.rollout.run
    import nat_ray.train.run

    def install(scores, fail_eval_of_round=None) -> Stages:
        fake = Stages(scores, fail_eval_of_round)
        monkeypatch.setattr(nat_ray.rollout.run, "run_rollout", fake.rollout)
        monkeypatch.setattr(nat_ray.train.run, "run_train", fake.train)
        monkeypatch.setattr(nat_ray.evaluation.run, "run_eval", fake.eval)
        return fake

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return install


def loop_cfg(tmp_path, **loop) -> NatRayConfig:
    # Fake stages stand in for run_rollout, so the rollout starts engines afresh (no engine pool);
    # tests/integration/test_loop.py runs the hot-loading path on real engines.
    loop = {"hot_load": False, **loop}
    return NatRayConfig(
        train=TrainConfig(mode="lora"), loop=LoopConfig(name="l", runs_dir=str(tmp_path), **loop)
    )


def test_each_round_collects_with_the_last_agent_and_carries_earlier_data(tmp_path, stages):
    from nat_ray.experiment.loop import run_loop

    fake = stages([10.0, 20.0, 30.0, 40.0])
    result = run_loop(loop_cfg(tmp_path, rounds=3, carry_rounds=1))
    rollouts = [c for c in fake.calls if c[0] == "rollout"]
    trains = [c for c in fake.calls if c[0] == "train"]
    assert rollouts[0][1:] == ("embedded", 1)  # the base model, with its demonstration
    assert rollouts[1][1].endswith("train/round-0/export/model") and rollouts[1][2] == 0
    assert [len(t[3]) for t in trains] == [1, 2, 2]  # own data, plus the round before
    assert all(t[2] == "embedded" for t in trains)  # fresh adapters on the base
    assert [r["score"] for r in result["rounds"]] == [20.0, 30.0, 40.0]  # 10 was the base
    assert (tmp_path / "l" / "adapters" / "round-2" / "adapter_config.json").is_file()


def test_patience_stops_the_loop_and_the_reason_is_in_the_results(tmp_path, stages):
    from nat_ray.experiment.loop import run_loop

    stages([30.0, 20.0, 25.0, 50.0])
    result = run_loop(loop_cfg(tmp_path, rounds=5, patience=2))
    assert [r["round"] for r in result["rounds"]] == [0, 1]
    assert "patience = 2" in result["stopped"]
    assert "patience = 2" in json.loads((tmp_path / "l" / "results.json").read_text())["stopped"]


def test_an_interrupted_round_resumes_at_the_stage_it_stopped_in(tmp_path, stages):
    from nat_ray.experiment.loop import run_loop

    fake = stages([10.0, 20.0, 30.0], fail_eval_of_round=1)
    with pytest.raises(RuntimeError, match="killed"):
        run_loop(loop_cfg(tmp_path, rounds=2))
    fake.calls.clear()
    result = run_loop(loop_cfg(tmp_path, rounds=2))
    # Base, round 0 and round 1's rollout and training were done: only round 1's evaluation runs.
    assert [c[0] for c in fake.calls] == ["eval"]
    assert [r["round"] for r in result["rounds"]] == [0, 1]
    fake.calls.clear()
    run_loop(loop_cfg(tmp_path, rounds=2))
    assert fake.calls == []


def test_continue_adapter_trains_on_the_last_agent(tmp_path, stages, monkeypatch):
    import nat_ray.train.export
    from nat_ray.experiment.loop import run_loop

    fake = stages([10.0, 20.0, 30.0])
    stacked = []
    monkeypatch.setattr(
        nat_ray.train.export, "stack_adapters", lambda a, b, out, base: stacked.append((a, b)) or Path(b)
    )
    run_loop(loop_cfg(tmp_path, rounds=2, continue_adapter=True))
    trains = [c for c in fake.calls if c[0] == "train"]
    assert trains[0][2] == "embedded" and trains[1][2].endswith("train/round-0/export/model")
    assert len(stacked) == 1 and str(stacked[0][0]).endswith("adapters/round-0")


def test_a_traffic_round_takes_only_what_earlier_rounds_did_not_and_traffic_only_needs_labels(tmp_path):
    from test_capture import _row

    from nat_ray.errors import DataError
    from nat_ray.experiment.loop import TRAFFIC_FILE, _Loop, _Round, check_loop_config
    from nat_ray.serve.capture import CaptureWriter, FeedbackLog

    with pytest.raises(ConfigError, match="traffic_only needs loop.traffic_dir"):
        LoopConfig(traffic_only=True)
    folder = tmp_path / "capture"
    writer = CaptureWriter(folder, flush_rows=1, flush_s=60)
    writer.add(_row("ep-1"))
    writer.close()
    overrides = [
        f"loop.traffic_dir={folder}",
        "loop.traffic_only=true",
        f"loop.runs_dir={tmp_path}",
        "train.mode=lora",
    ]
    cfg = load_config(NatRayConfig, None, overrides)
    check_loop_config(cfg)  # a capture location
    with pytest.raises(ConfigError, match="is not a capture location"):
        check_loop_config(load_config(NatRayConfig, None, [*overrides, f"loop.traffic_dir={tmp_path}/none"]))
    loop = _Loop(cfg, tracker=None)
    with pytest.raises(DataError, match=r"round 0: no new labelled episode .* 1 unlabelled \(left out\)"):
        loop.traffic(_Round(0, loop.run_dir / "rounds" / "0", {}))
    FeedbackLog(folder, "person").record("ep-1", 1.0)
    took = loop.traffic(_Round(0, loop.run_dir / "rounds" / "0", {}))
    assert took["data"] == [str(loop.run_dir / "rounds" / "0" / TRAFFIC_FILE)] and took["feedback"] == 1
    with pytest.raises(DataError, match=r"round 1: .*0 new of 1 captured"):
        loop.traffic(_Round(1, loop.run_dir / "rounds" / "1", {}))
