"""Benchmark of stage 1, rollout (issue 6): the Ray Data rollout stage against the NAT repo's way.

Run from the repository root (no arguments; about 14 minutes on the 2-core CPU machine)::

    .venv/bin/python benchmarks/rollout.py            # writes benchmarks/results/rollout.json
    .venv/bin/python benchmarks/rollout.py --quick    # a few minutes, small counts, for development

Every side uses the same model (the embedded SmolLM2-135M-Instruct, fp32 on CPU), the same GSM8K
training questions, the same tool (the calculator), the same prompt (one-shot), the same token
limits (7 turns, 128 new tokens per turn, ``max_model_len`` 2048) and the same sampling
(temperature 0.7, per-turn seeds derived from one seed and the trajectory id).

Three phases, one after the other, each shut down before the next starts:

1. **Rollout stage** -- :func:`nat_ray.rollout.run.run_rollout` exactly as ``nat-ray rollout`` runs it
   (local Ray, one engine actor owning a vLLM engine, calculator tool actors, Parquet output in a
   temporary folder). Its trajectories/s are measured over the *generation window*: from the
   earliest ``started_at`` (the time the actor began its batch, after its engine was built) to the
   latest ``ended_at`` of the rows it wrote. The end-to-end figure (the whole ``run_rollout`` call:
   Ray start, engine start, generation, Parquet) is reported too, labelled as such.
2. **Sequential baseline** -- the NAT repo's way: :class:`nat_ray.engines.hf_engine.HFEngine`
   (transformers ``generate`` at batch 1, the whole prompt encoded anew each turn), one episode
   after another (``Stepper(hf).run([episode])``), local tools. Timed from after the model is
   loaded; the end-to-end figure adds the load time. It runs on the first questions of the same
   question list (it is ~15x slower, so a smaller sample; trajectories/s is a rate).
3. **Agent loop vs raw vLLM** -- one in-process :class:`nat_ray.engines.vllm_engine.VLLMEngine`:
   (a) the agent loop (``Stepper`` with local tools -- streaming: each episode's next turn goes to
   vLLM as soon as its own previous turn ends -- kept full with the same refill strategy as
   ``RolloutWorker.__call__``) over N episodes, counting completion tokens per wall second; then
   (b) raw ``llm.generate`` on the same N first-turn prompts with ``max_tokens = min_tokens = T``
   and ``ignore_eos``, where N x T is the agent loop's total generated tokens (same sampling
   temperature and per-request seeds). The prefix cache is reset before each of the two.

``speedup_vs_sequential`` = trajectories/s of phase 1 / trajectories/s of phase 2 (both without
start-up). ``fraction_of_raw_vllm`` = tokens/s of 3a / tokens/s of 3b.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/rollout.py` from the repo root
    sys.path.insert(0, str(ROOT))

from machine_info import load_average, machine  # noqa: E402 - beside this script

# Quiet vLLM (it logs to stdout by default); set before vllm is imported anywhere, Ray workers included.
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

log = logging.getLogger("bench.rollout")

RESULTS = ROOT / "benchmarks" / "results" / "rollout.json"

TASK = "gsm8k"
SPLIT = "train"
TEMPERATURE = 0.7
SEED = 0
TARGET_SPEEDUP = 10.0
TARGET_FRACTION = 0.7

FULL = {
    "rollout_questions": 192,  # phase 1: one trajectory per question at one temperature
    # phase 2: the first 48 of those questions (~5 s each). A trajectory's length varies 10x
    # (23-224 tokens), so 24 gave a mean that one or two 7-turn episodes move by a third.
    "baseline_episodes": 48,
    "agent_loop_episodes": 192,  # phase 3: the same 192 questions as phase 1
}
QUICK = {"rollout_questions": 32, "baseline_episodes": 2, "agent_loop_episodes": 32}

ENGINE = {
    "model": "embedded",
    "max_model_len": 2048,
    "kv_cache_gb": 2.0,
    "enable_prefix_caching": True,
    "max_num_seqs": 64,
    "seed": SEED,
    # vLLM 0.32 on CPU kills its engine when a seeded request's prompt is prefilled in chunks
    # ("CPU Generator does not use offset"), and every agent turn is seeded: no chunked prefill.
    "extra": {"enable_chunked_prefill": False},
}
AGENT = {
    "task": TASK,
    "shots": 1,
    "max_turns": 7,
    "max_new_tokens": 128,
    "temperature": TEMPERATURE,
    "top_p": 1.0,
    "seed": SEED,
}
ROLLOUT = {
    "num_engines": 1,
    "engine_num_cpus": None,  # all cores of this machine: a CPU engine computes with its CPUs
    "batch_size": 256,  # >= the question count: the actor gets every episode in one batch
    "max_in_flight": 64,  # = engine.max_num_seqs: the engine's batch stays full
    "tool_actors": True,  # the stage's default: calculators run in Ray actors
    "num_calculators": 2,
}


# --------------------------------------------------------------------------------------------
# Helpers


def parse_time(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def make_config(n_questions: int, output_dir: str):
    from nat_ray.config import NatRayConfig, from_dict

    return from_dict(
        NatRayConfig,
        {
            "engine": dict(ENGINE),
            "agent": dict(AGENT),
            "rollout": {
                **ROLLOUT,
                "tasks": [TASK],
                "split": SPLIT,
                "limit": n_questions,
                "samples": 1,
                "temperatures": [TEMPERATURE],
                "seed": SEED,
                "output_dir": output_dir,
            },
        },
    )


def make_episodes(cfg, questions):
    """The same episodes the rollout stage makes: same ids (so same per-turn seeds), same prompt."""
    from nat_ray.agent import new_episode, sampling_from
    from nat_ray.core import records
    from nat_ray.tasks import get_task

    task = get_task(TASK)
    out = []
    for q in questions:
        tid = records.trajectory_id(cfg.engine.model, task.name, q.id, TEMPERATURE, 0, cfg.rollout.seed)
        sampling = sampling_from(cfg.agent, TEMPERATURE, cfg.rollout.seed)
        ep = new_episode(task, q.question, cfg.agent, tid, sampling)
        out.append((ep, task.scoring_gold(q)))
    return out


def episode_stats(pairs) -> dict:
    """Sanity figures of finished episodes: accuracy, finish rate, turns, failure reasons."""
    from nat_ray.tasks import get_task

    task = get_task(TASK)
    n = len(pairs)
    correct = sum(bool(task.score(ep.answer, gold).correct_robust) for ep, gold in pairs)
    reasons = collections.Counter(ep.failure_reason for ep, _ in pairs if ep.failure_reason)
    return {
        "accuracy_robust": round(correct / n, 4) if n else None,
        "finished_rate": round(sum(ep.finished for ep, _ in pairs) / n, 4) if n else None,
        "mean_turns": round(sum(ep.turns for ep, _ in pairs) / n, 3) if n else None,
        "failure_reasons": dict(reasons.most_common()),
    }


def rate(count: float, seconds: float) -> float | None:
    return round(count / seconds, 4) if seconds > 0 else None


def occupancy(trace: list[tuple[int, int, float]]) -> dict:
    """How full the agent loop kept the engine: time-weighted open episodes, and the drain at the end.

    ``trace`` holds one ``(episodes open, tokens generated, seconds)`` per stepper step.
    """
    total = sum(sec for _, _, sec in trace) or 1e-9
    out = {"time_weighted_open_episodes": round(sum(n * sec for n, _, sec in trace) / total, 1)}
    full = max((n for n, _, _ in trace), default=0)
    for label, test in (
        ("at_least_half_full", lambda n: n >= full / 2),
        ("under_quarter_full", lambda n: n < full / 4),
    ):
        secs = sum(sec for n, _, sec in trace if test(n))
        toks = sum(tok for n, tok, _ in trace if test(n))
        out[label] = {"seconds": round(secs, 2), "tokens": toks, "tokens_per_s": rate(toks, secs)}
    return out


# --------------------------------------------------------------------------------------------
# Phase 1: the rollout stage


def bench_rollout_stage(cfg) -> dict:
    import ray

    from nat_ray.core import nat_data as columns
    from nat_ray.core import records
    from nat_ray.rollout.run import PARTS_DIR, run_rollout

    log.info(
        "phase 1: rollout stage on %d questions (Ray Data, %d engine actor, max_in_flight=%d)",
        cfg.rollout.limit,
        cfg.rollout.num_engines,
        cfg.rollout.max_in_flight,
    )
    t0 = time.perf_counter()
    result = run_rollout(cfg, progress=True)
    e2e = time.perf_counter() - t0
    rows = records.read_rows(Path(cfg.rollout.output_dir) / PARTS_DIR)
    if ray.is_initialized():
        ray.shutdown()  # stop the engine actor before the next phase needs the CPUs
    if result.generated != len(rows) or result.skipped:
        raise RuntimeError(f"expected a fresh run, got {result}")
    starts = [parse_time(r[columns.STARTED_AT]) for r in rows]
    ends = [parse_time(r[columns.ENDED_AT]) for r in rows]
    window = max(ends) - min(starts)
    n = len(rows)
    completion = sum(r[columns.COMPLETION_TOKENS] for r in rows)
    reasons = collections.Counter(r[columns.FAILURE_REASON] for r in rows if r[columns.FAILURE_REASON])
    out = {
        "trajectories": n,
        "batches": len(set(r[columns.STARTED_AT] for r in rows)),
        "generation_window_s": round(window, 2),
        "end_to_end_s": round(e2e, 2),
        "startup_and_output_s": round(e2e - window, 2),
        "trajectories_per_s": rate(n, window),
        "trajectories_per_s_end_to_end": rate(n, e2e),
        "completion_tokens": completion,
        "prompt_tokens": sum(r[columns.PROMPT_TOKENS] for r in rows),
        "completion_tokens_per_s": rate(completion, window),
        "turns": sum(r[columns.TURNS] for r in rows),
        "mean_turns": round(sum(r[columns.TURNS] for r in rows) / n, 3),
        "accuracy_robust": round(sum(r[columns.CORRECT_ROBUST] for r in rows) / n, 4),
        "accuracy_paper": round(sum(r[columns.CORRECT_PAPER] for r in rows) / n, 4),
        "finished_rate": round(sum(r[columns.FINISHED] for r in rows) / n, 4),
        "failure_reasons": dict(reasons.most_common()),
    }
    log.info(
        "phase 1: %d trajectories, %d tokens in a %.1fs window (%.3f traj/s, %.1f tok/s); %.1fs end to end",
        n,
        completion,
        window,
        out["trajectories_per_s"],
        out["completion_tokens_per_s"],
        e2e,
    )
    return out


# --------------------------------------------------------------------------------------------
# Phase 2: the NAT repo's way


def cost_model(seconds: list[float], episodes) -> dict | None:
    """Least-squares fit of the baseline's seconds per episode to the tokens it encodes and generates.

    Why: a trajectory's cost is not fixed; the sampler decides how many turns and tokens it takes,
    and a small baseline sample can be shorter or longer on average than the rollout stage's
    (measured here: 71 vs 111 tokens a trajectory on the same first 24 questions). The NAT repo's
    way costs, per episode, about ``a`` seconds per prompt token (each turn encodes the whole
    prompt again) plus ``b`` per generated token; with ``a`` and ``b`` from the baseline's own
    episodes, the time it would need for the rollout stage's exact trajectories is predicted.
    """
    import numpy as np

    if len(seconds) < 3:
        return None
    x = np.array([[ep.prompt_tokens, ep.completion_tokens] for ep in episodes], dtype=float)
    y = np.array(seconds, dtype=float)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    if (coef <= 0).any():  # not a usable cost model (too few or too alike episodes)
        return None
    fit = x @ coef
    r2 = 1 - float(((y - fit) ** 2).sum()) / float(((y - y.mean()) ** 2).sum() or 1.0)
    return {
        "seconds_per_prompt_token": float(coef[0]),
        "seconds_per_completion_token": float(coef[1]),
        "r2": round(r2, 3),
    }


def bench_sequential(cfg, questions) -> dict:
    from dataclasses import replace

    from nat_ray.core.react import LocalTools, Stepper
    from nat_ray.engines.hf_engine import HFEngine

    log.info("phase 2: sequential baseline (transformers generate, batch 1) on %d episodes", len(questions))
    t0 = time.perf_counter()
    engine = HFEngine(replace(cfg.engine, backend="hf"))
    load_s = time.perf_counter() - t0
    import torch

    pairs = make_episodes(cfg, questions)
    tools = LocalTools()
    per_episode = []
    t1 = time.perf_counter()
    for i, (ep, _) in enumerate(pairs, 1):
        s = time.perf_counter()
        Stepper(engine, tools, stop_on_tool_error=cfg.agent.stop_on_tool_error).run([ep])
        per_episode.append(time.perf_counter() - s)
        log.info(
            "phase 2: episode %d/%d: %d turns, %d tokens, %.1fs",
            i,
            len(pairs),
            ep.turns,
            ep.completion_tokens,
            per_episode[-1],
        )
    gen_s = time.perf_counter() - t1
    engine.close()
    n = len(pairs)
    completion = sum(ep.completion_tokens for ep, _ in pairs)
    out = {
        "trajectories": n,
        "model_load_s": round(load_s, 2),
        "generation_s": round(gen_s, 2),
        "end_to_end_s": round(load_s + gen_s, 2),
        "trajectories_per_s": rate(n, gen_s),
        "trajectories_per_s_end_to_end": rate(n, load_s + gen_s),
        "completion_tokens": completion,
        "prompt_tokens": sum(ep.prompt_tokens for ep, _ in pairs),
        "completion_tokens_per_s": rate(completion, gen_s),
        "turns": sum(ep.turns for ep, _ in pairs),
        "seconds_per_episode": [round(x, 2) for x in per_episode],
        "episodes": [
            {
                "seconds": round(sec, 3),
                "prompt_tokens": ep.prompt_tokens,
                "completion_tokens": ep.completion_tokens,
            }
            for sec, (ep, _) in zip(per_episode, pairs)
        ],
        "cost_model": cost_model(per_episode, [ep for ep, _ in pairs]),
        "torch_threads": torch.get_num_threads(),
        **episode_stats(pairs),
    }
    log.info(
        "phase 2: %d trajectories, %d tokens in %.1fs (%.4f traj/s, %.1f tok/s); model load %.1fs",
        n,
        completion,
        gen_s,
        out["trajectories_per_s"],
        out["completion_tokens_per_s"],
        load_s,
    )
    return out


# --------------------------------------------------------------------------------------------
# Phase 3: agent loop vs raw vLLM in one engine


def raw_generate(llm, prompts: list[list[int]], seeds: list[int], per_seq: int) -> tuple[int, float]:
    """Raw ``llm.generate`` of ``per_seq`` tokens for each prompt (token ids), prefix cache reset first.

    Phase 3b's measurement (also used by ``benchmarks/scale_stages.py``): ``ignore_eos`` with
    ``min_tokens = max_tokens = per_seq``, the agent's temperature and top-p, one seed per request.
    Returns ``(generated tokens, seconds)``.
    """
    from vllm import SamplingParams

    params = [
        SamplingParams(
            temperature=TEMPERATURE,
            top_p=1.0,
            max_tokens=per_seq,
            min_tokens=per_seq,
            ignore_eos=True,
            seed=seed,
        )
        for seed in seeds
    ]
    llm.reset_prefix_cache()
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - started
    return sum(len(o.outputs[0].token_ids) for o in outputs), seconds


def bench_agent_vs_raw(cfg, questions) -> dict:
    from vllm import SamplingParams

    from nat_ray.core.react import LocalTools, Stepper
    from nat_ray.engines.vllm_engine import VLLMEngine, render_prompt_ids

    log.info("phase 3: in-process vLLM engine; agent loop then raw generate on %d episodes", len(questions))
    t0 = time.perf_counter()
    engine = VLLMEngine(cfg.engine)
    startup_s = time.perf_counter() - t0
    llm = engine.llm
    try:
        # Warm-up on unrelated text, so neither measurement pays a first-call cost; then no cache.
        llm.generate(
            [{"prompt_token_ids": list(range(100, 140))}] * 4,
            SamplingParams(max_tokens=16, min_tokens=16, ignore_eos=True),
            use_tqdm=False,
        )

        # (a) the agent loop, kept full like RolloutWorker.__call__
        pairs = make_episodes(cfg, questions)
        first_prompts = [render_prompt_ids(engine.tokenizer, ep.conversation()) for ep, _ in pairs]
        first_seeds = [ep.next_sampling().seed for ep, _ in pairs]
        llm.reset_prefix_cache()
        stepper = Stepper(engine, LocalTools(), stop_on_tool_error=cfg.agent.stop_on_tool_error)
        trace = []  # per stepper step (one engine scheduler step when streaming): (open, tokens, seconds)
        steps = stepper.run_refilling((ep for ep, _ in pairs), cfg.rollout.max_in_flight)
        t1 = time.perf_counter()
        while True:
            before = sum(ep.completion_tokens for ep, _ in pairs)
            s = time.perf_counter()
            ended = next(steps, None)
            if ended is None:
                break
            open_during_step = stepper.open + len(ended)
            trace.append(
                (
                    open_during_step,
                    sum(ep.completion_tokens for ep, _ in pairs) - before,
                    time.perf_counter() - s,
                )
            )
        agent_s = time.perf_counter() - t1
        steps = len(trace)
        n = len(pairs)
        agent_tokens = sum(ep.completion_tokens for ep, _ in pairs)
        agent_turns = sum(ep.turns for ep, _ in pairs)
        log.info(
            "phase 3a: agent loop: %d episodes, %d turns, %d tokens in %.1fs (%.1f tok/s, %d steps)",
            n,
            agent_turns,
            agent_tokens,
            agent_s,
            agent_tokens / agent_s,
            steps,
        )

        # (b) raw offline generation: same N sequences, same total tokens, same engine
        per_seq = max(1, round(agent_tokens / n))
        raw_tokens, raw_s = raw_generate(llm, first_prompts, first_seeds, per_seq)
        log.info(
            "phase 3b: raw vLLM: %d sequences x %d tokens = %d tokens in %.1fs (%.1f tok/s)",
            n,
            per_seq,
            raw_tokens,
            raw_s,
            raw_tokens / raw_s,
        )
    finally:
        engine.close()
    return {
        "engine_startup_s": round(startup_s, 2),
        "agent_loop": {
            "episodes": n,
            "turns": agent_turns,
            "stepper_steps": steps,
            "completion_tokens": agent_tokens,
            "prompt_tokens": sum(ep.prompt_tokens for ep, _ in pairs),
            "seconds": round(agent_s, 2),
            "completion_tokens_per_s": rate(agent_tokens, agent_s),
            "trajectories_per_s": rate(n, agent_s),
            "max_in_flight": cfg.rollout.max_in_flight,
            **episode_stats(pairs),
            "occupancy": occupancy(trace),
        },
        "raw_vllm": {
            "sequences": n,
            "tokens_per_sequence": per_seq,
            "completion_tokens": raw_tokens,
            "prompt_tokens": sum(len(p) for p in first_prompts),
            "seconds": round(raw_s, 2),
            "completion_tokens_per_s": rate(raw_tokens, raw_s),
            "sampling": f"temperature={TEMPERATURE}, top_p=1.0, per-request seeds, "
            f"max_tokens=min_tokens={per_seq}, ignore_eos=True",
        },
    }


# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--quick", action="store_true", help="small counts for development (not the benchmark)"
    )
    parser.add_argument("--out", type=Path, default=None, help=f"result file (default {RESULTS})")
    parser.add_argument(
        "--phases", default="1,2,3", help="comma-separated phases to run (development only; default all)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("vllm", "ray", "transformers", "nat_ray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("nat_ray.rollout.run").setLevel(logging.INFO)

    counts = QUICK if args.quick else FULL
    phases = {int(p) for p in args.phases.split(",") if p.strip()}
    out_path = args.out or (RESULTS.with_name("rollout_quick.json") if args.quick else RESULTS)
    from nat_ray.models import ensure_embedded
    from nat_ray.tasks import get_task

    ensure_embedded()  # convert the embedded model once, outside every timing
    n_rollout = counts["rollout_questions"]
    questions = get_task(TASK).load(SPLIT, limit=n_rollout)
    if len(questions) < n_rollout:
        raise SystemExit(f"only {len(questions)} {TASK} {SPLIT} questions available, need {n_rollout}")

    start = time.perf_counter()
    machine_at_start = machine()
    tmp = tempfile.mkdtemp(prefix="nat_ray_bench_rollout_")
    cfg = make_config(n_rollout, str(Path(tmp) / "rollout"))
    results: dict = {}
    try:
        if 1 in phases:
            results["rollout_stage"] = bench_rollout_stage(cfg)
        if 2 in phases:
            results["sequential_baseline"] = bench_sequential(cfg, questions[: counts["baseline_episodes"]])
        if 3 in phases:
            results["agent_loop_vs_raw"] = bench_agent_vs_raw(cfg, questions[: counts["agent_loop_episodes"]])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    report: dict = {
        "benchmark": "rollout (issue 6)",
        "quick": args.quick,
        "speedup_vs_sequential": None,
        "speedup_vs_sequential_end_to_end": None,
        "fraction_of_raw_vllm": None,
    }
    stage, sequential, agent_vs_raw = (
        results.get(k) for k in ("rollout_stage", "sequential_baseline", "agent_loop_vs_raw")
    )
    if stage and sequential:
        report["speedup_vs_sequential"] = round(
            stage["trajectories_per_s"] / sequential["trajectories_per_s"], 2
        )
        report["speedup_vs_sequential_end_to_end"] = round(
            stage["trajectories_per_s_end_to_end"] / sequential["trajectories_per_s_end_to_end"], 2
        )
        report["speedup_tokens_per_s"] = round(
            stage["completion_tokens_per_s"] / sequential["completion_tokens_per_s"], 2
        )
        model = sequential.get("cost_model")
        if model:
            predicted = (
                model["seconds_per_prompt_token"] * stage["prompt_tokens"]
                + model["seconds_per_completion_token"] * stage["completion_tokens"]
            )
            report["speedup_same_trajectories"] = round(predicted / stage["generation_window_s"], 2)
    if agent_vs_raw:
        report["fraction_of_raw_vllm"] = round(
            agent_vs_raw["agent_loop"]["completion_tokens_per_s"]
            / agent_vs_raw["raw_vllm"]["completion_tokens_per_s"],
            3,
        )
    report["targets"] = {
        "speedup_vs_sequential": {
            "target": TARGET_SPEEDUP,
            "met": None
            if report["speedup_vs_sequential"] is None
            else report["speedup_vs_sequential"] >= TARGET_SPEEDUP,
        },
        "fraction_of_raw_vllm": {
            "target": TARGET_FRACTION,
            "met": None
            if report["fraction_of_raw_vllm"] is None
            else report["fraction_of_raw_vllm"] >= TARGET_FRACTION,
        },
    }
    report["definitions"] = {
        "speedup_vs_sequential": "rollout stage trajectories/s over its generation window (earliest started_at "
        "to latest ended_at of its rows; engine start-up excluded) / sequential HF batch-1 trajectories/s "
        "(timed after the model is loaded)",
        "speedup_vs_sequential_end_to_end": "the same ratio with start-up included on both sides: the whole "
        "run_rollout call (Ray start, engine actor start, generation, Parquet) vs HF model load + episodes",
        "speedup_tokens_per_s": "generated tokens/s of the rollout window / of the baseline (insensitive to the "
        "two samples having different mean lengths)",
        "speedup_same_trajectories": "seconds the baseline would need for the rollout stage's own "
        "trajectories (its prompt and completion tokens, priced by a least-squares fit of the baseline's "
        "per-episode seconds, sequential_baseline.cost_model) / the stage's generation window: the same "
        "work on both sides, whatever the two samplers' mean trajectory lengths",
        "fraction_of_raw_vllm": "generated tokens/s of the agent loop (Stepper + local tools, max_in_flight "
        "refill) / raw llm.generate of the same N first-turn prompts with N x T ~ the agent loop's tokens "
        "(ignore_eos, min_tokens=max_tokens=T), same in-process engine",
    }
    report["questions"] = {
        "task": TASK,
        "split": SPLIT,
        "rollout_stage": counts["rollout_questions"],
        "sequential_baseline": counts["baseline_episodes"],
        "agent_loop_vs_raw": counts["agent_loop_episodes"],
        "note": "each side takes the first N questions of the same list; one trajectory per question",
    }
    report["settings"] = {
        "engine": ENGINE,
        "agent": AGENT,
        "rollout": {**ROLLOUT, "temperatures": [TEMPERATURE], "samples": 1, "seed": SEED},
        "tools": "calculator (GSM8K's only tool); Ray tool actors in the rollout stage, local elsewhere",
        "baseline_engine": "nat_ray.engines.hf_engine.HFEngine (transformers generate, batch 1, fp32 CPU)",
        "env": {k: os.environ.get(k) for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND")},
    }
    report.update(results)
    report["machine"] = {**machine_at_start, "load_average_at_end": load_average()}
    report["total_benchmark_s"] = round(time.perf_counter() - start, 1)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", out_path)
    print(
        json.dumps(
            {
                k: report[k]
                for k in ("speedup_vs_sequential", "speedup_vs_sequential_end_to_end", "fraction_of_raw_vllm")
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
