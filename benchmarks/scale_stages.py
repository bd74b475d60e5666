"""Sections of ``benchmarks/scale.py`` (issue 19) for the agent's stages: the rollout curve and the headline fractions.

Each section is ``fn(args) -> dict`` plus ``plot_fn(ax, figures)``, as in ``scale.py``. ``args`` is
read with ``getattr`` only: ``quick`` (small sizes, for a smoke run of a few minutes),
``rollout_sizes`` (default ``(32, 128, 512)``; quick ``(8, 16, 32)``) and ``rollout_lora``.

- ``rollout_curve``: the rollout stage (:func:`nat_ray.rollout.run.run_rollout`, through
  :func:`nat_ray.rollout.engine_pool.rollout_with_pool` so that one engine stays up across the sizes and
  each size measures rollout, not engine start-up; the engine actor is the pool's
  ``EngineHolder`` with the engine ``nat-ray rollout`` builds, no LoRA, unless ``args.rollout_lora``
  asks for ``start_pool``'s LoRA-enabled one) on 32, 128 and 512 GSM8K training questions
  (1x, 4x, 16x), one trajectory each at temperature 0.7, with ``benchmarks/rollout.py``'s settings
  (its ``ENGINE``/``AGENT``/``ROLLOUT``: the agent of ``configs/rollout.yaml`` -- one-shot, 7 turns,
  128 new tokens a turn, ``max_model_len`` 2048, 2 GB KV cache -- on one engine with
  ``max_num_seqs`` = ``max_in_flight`` = 64, calculators in 2 tool actors); each size is one batch.
  Per size: the whole call's seconds, the generation window (earliest ``started_at`` to latest
  ``ended_at`` of its rows, as ``benchmarks/rollout.py`` defines it), seconds per trajectory,
  generated tokens, and the peak RSS during that call of the driver and of the engine actor (its
  process and children, read from the driver by pid): psutil sampling threads, reset per size
  (``ru_maxrss`` would be the process's peak so far). The prefix cache is reset before each size.
  After the largest size, the same engine runs raw ``llm.generate`` on the first
  ``raw_sequences`` of that size's first-turn prompts (:func:`rollout.raw_generate`), for the
  rollout's fraction of raw vLLM. ``rollout_marginal_flatness`` = seconds per ADDED trajectory
  from 32 to 128 over from 128 to 512 (:func:`marginal_flatness` of the calls' seconds: the fixed
  cost of a call cancels out, while ``rollout_time_flatness``'s small size carries all of it);
  ``engine_rss_flatness`` = the engine's peak RSS at 128 over at 512 (the second-largest size
  over the largest).
- ``headline_fractions``: each stage's rate over this machine's limit for it, measured pairwise in
  the same run: rollout tokens/s / raw vLLM (from ``rollout_curve`` when it ran in this process,
  else a one-size curve); the served agent at 32 concurrent clients / the engine's own batch-32
  ceiling (``benchmarks/serve.py``'s ``measure_ceiling`` and ``phase_concurrent``); training
  tokens/s through Ray Train + DeepSpeed (:func:`nat_ray.train.run.run_train`, ``configs/train.yaml``)
  / the bare step (:func:`nat_ray.train.step.train_step` via ``benchmarks/train_step.py``'s
  ``time_training``) on the same NAT StrategyQA data, model and packing.
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _p in (str(ROOT), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

log = logging.getLogger("benchmarks.scale_stages")

ROLLOUT_SIZES = (32, 128, 512)
QUICK_ROLLOUT_SIZES = (8, 16, 32)
RAW_SEQUENCES = 128  # raw vLLM on this many of the largest size's first-turn prompts (a rate)
QUICK_RAW_SEQUENCES = 16
SERVE_CLIENTS = 32
QUICK_SERVE_CLIENTS = 8
TRAIN_STEPS = 4  # stage optimizer steps (the first is not counted); the bare step times as many
QUICK_TRAIN_STEPS = 2
TARGETS = {
    "rollout_time_flatness": 0.83,
    "rollout_rss_flatness": 0.77,
    "rollout_marginal_flatness": 0.8,
    "engine_rss_flatness": 0.8,
}

# The last rollout curve of this process, for headline_fractions to reuse (same run, no second curve).
_LAST_CURVE: dict | None = None


# ---------------------------------------------------------------------------------------------------
# Pure helpers


class PeakRSS:
    """Peak resident memory of this process between :meth:`start` and :meth:`stop`, by sampling.

    ``resource.getrusage(...).ru_maxrss`` is the peak over the process's whole life, so it cannot
    tell a later, smaller run's peak; a thread reading ``psutil`` every ``interval`` seconds can.
    """

    def __init__(self, interval: float = 0.05, read=None) -> None:
        self.interval = interval
        if read is None:
            import psutil

            proc = psutil.Process()
            read = lambda: proc.memory_info().rss  # noqa: E731
        self._read = read
        self.peak = 0
        self.start_rss = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        self.peak = max(self.peak, self._read())
        self.samples += 1

    def start(self) -> PeakRSS:
        self._stop.clear()
        self.samples = 0
        self.start_rss = self.peak = self._read()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def stop(self) -> int:
        """Stops sampling (one last sample first); returns the peak in bytes."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._sample()
        return self.peak

    def __enter__(self) -> PeakRSS:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def flatness(small: float | None, large: float | None) -> float | None:
    """``small / large`` (e.g. seconds per trajectory at 1x over at 16x): 1.0 = flat, None if undefined."""
    if small is None or large is None or large <= 0:
        return None
    return round(small / large, 3)


def window_seconds(started: list[float], ended: list[float]) -> float:
    """The generation window of ``benchmarks/rollout.py``: earliest start to latest end."""
    if not started or not ended:
        return 0.0
    return max(ended) - min(started)


def marginal_costs(sizes: list[int], seconds: list[float]) -> list[float]:
    """Seconds per ADDED unit between consecutive sizes: ``(t[i+1] - t[i]) / (n[i+1] - n[i])``.

    The fixed cost (start-up, first-call set-up) cancels out, so these stay equal when each
    unit's own cost does not grow with the size.
    """
    return [(tb - ta) / (nb - na) for na, nb, ta, tb in zip(sizes, sizes[1:], seconds, seconds[1:])]


def marginal_flatness(sizes: list[int], seconds: list[float]) -> float | None:
    """The first marginal cost over the last (e.g. per trajectory added 32->128 over 128->512).

    1.0 = each added unit costs the same at every size; below 1 = it costs more at larger sizes
    (a super-linear cost); None with fewer than three sizes or a last marginal cost that is not
    positive.
    """
    costs = marginal_costs(sizes, seconds)
    if len(costs) < 2:
        return None
    return flatness(costs[0], costs[-1])


def process_tree_rss(pids: list[int]) -> tuple[Callable[[], int], int]:
    """A reader for :class:`PeakRSS` of other processes, and how many processes it reads.

    The reader sums the RSS of ``pids`` and of the descendants they have now. They are found once
    (a vLLM engine's processes live as long as it does), so each sample reads only their ``/proc``
    entries; one that has ended counts 0.
    """
    import psutil

    procs = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue

    def read() -> int:
        total = 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total

    return read, len(procs)


def fraction(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def _mib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def _quick(args) -> bool:
    return bool(getattr(args, "quick", False))


# ---------------------------------------------------------------------------------------------------
# rollout_curve


def _rows_stats(parts_dir: Path) -> dict:
    """Window and token figures of one size's rows (only the columns needed are read)."""
    import pyarrow.parquet as pq
    import rollout as rollout_bench

    from nat_ray.core import nat_data as columns

    cols = [columns.STARTED_AT, columns.ENDED_AT, columns.COMPLETION_TOKENS, columns.TURNS, columns.FINISHED]
    tables = [pq.read_table(p, columns=cols).to_pydict() for p in sorted(parts_dir.glob("*.parquet"))]
    get = lambda c: [v for t in tables for v in t[c]]  # noqa: E731
    starts = [rollout_bench.parse_time(s) for s in get(columns.STARTED_AT)]
    ends = [rollout_bench.parse_time(s) for s in get(columns.ENDED_AT)]
    n = len(starts)
    return {
        "trajectories": n,
        "generation_window_s": round(window_seconds(starts, ends), 2),
        "completion_tokens": sum(get(columns.COMPLETION_TOKENS)),
        "turns": sum(get(columns.TURNS)),
        "finished_rate": round(sum(get(columns.FINISHED)) / n, 4) if n else None,
    }


def _make_raw_in_holder(bench_dir: str):
    """A closure run inside the engine actor (``__ray_call__``): raw vLLM on the stage's first-turn prompts.

    Nested, so Ray pickles it by value; it puts ``benchmarks/`` on the actor's path itself to use
    ``rollout.make_config`` / ``make_episodes`` / ``raw_generate`` there.
    """

    def raw_in_holder(holder, n_questions: int, per_seq: int) -> dict:
        import sys

        if bench_dir not in sys.path:
            sys.path.insert(0, bench_dir)
        import rollout as rollout_bench

        from nat_ray.engines.vllm_engine import render_prompt_ids
        from nat_ray.tasks import get_task

        cfg = rollout_bench.make_config(n_questions, "/nonexistent")
        questions = get_task(rollout_bench.TASK).load(rollout_bench.SPLIT, limit=n_questions)
        pairs = rollout_bench.make_episodes(cfg, questions)
        engine = holder.engine
        prompts = [render_prompt_ids(engine.tokenizer, ep.conversation()) for ep, _ in pairs]
        seeds = [ep.next_sampling().seed for ep, _ in pairs]
        tokens, seconds = rollout_bench.raw_generate(engine.llm, prompts, seeds, per_seq)
        return {
            "sequences": len(prompts),
            "tokens_per_sequence": per_seq,
            "completion_tokens": tokens,
            "prompt_tokens": sum(len(p) for p in prompts),
            "seconds": round(seconds, 2),
            "completion_tokens_per_s": rollout_bench.rate(tokens, seconds),
        }

    return raw_in_holder


def _local_engine_pids(actors) -> list[int]:
    """The engine actors' process ids, those on this node only (psutil reads this machine's processes)."""
    import ray

    def where(holder) -> tuple[int, str]:  # nested: Ray pickles it by value for the engine actor
        import os

        import ray

        return os.getpid(), ray.get_runtime_context().get_node_id()

    here = ray.get_runtime_context().get_node_id()
    return [pid for pid, node in ray.get([a.__ray_call__.remote(where) for a in actors]) if node == here]


def _start_engines(cfg, lora: bool):
    """The rollout's engine actor(s), started once for every size.

    ``lora=True``: :func:`nat_ray.rollout.engine_pool.start_pool` as the closed loop runs it (LoRA enabled,
    which on this CPU build makes every vLLM step slower). ``lora=False``: the same
    :class:`nat_ray.rollout.engine_pool.EngineHolder` actors and :class:`~nat_ray.rollout.engine_pool.EnginePool`,
    placed as ``start_pool`` places them, with the engine exactly as ``nat-ray rollout`` builds it
    (``cfg.engine``, no LoRA), so each size measures the stage's own engine without its start-up.
    """
    from dataclasses import asdict

    import ray

    from nat_ray.models import check_model
    from nat_ray.ray_runtime import init_ray
    from nat_ray.rollout.engine_pool import POOL_NAME, EngineHolder, EnginePool, start_pool
    from nat_ray.rollout.run import engine_cpus
    from nat_ray.tools.actors import actor_runtime_env

    if lora:
        return start_pool(cfg)
    model_path = check_model(cfg.engine.model)
    engine_cfg = {**asdict(cfg.engine), "model": model_path, "lora": False}
    num_cpus = engine_cpus(cfg)
    init_ray(cfg.rollout.num_engines * num_cpus)
    env = actor_runtime_env(cfg.tools.plugins)
    actors = [
        ray.remote(EngineHolder)
        .options(
            name=f"{POOL_NAME}-scale-{i}",
            num_cpus=num_cpus,
            num_gpus=cfg.rollout.engine_num_gpus,
            max_concurrency=1,
            **({"runtime_env": env} if env else {}),
        )
        .remote({**asdict(cfg), "engine": engine_cfg})
        for i in range(cfg.rollout.num_engines)
    ]
    ray.get([actor.ready.remote() for actor in actors])
    return EnginePool(actors, model_path, engine_cfg)


def _run_curve(sizes: tuple[int, ...], raw_sequences: int, lora: bool = False) -> dict:
    import ray
    import rollout as rollout_bench

    from nat_ray.models import ensure_embedded
    from nat_ray.paths import PARTS_DIR
    from nat_ray.rollout.engine_pool import rollout_with_pool

    def reset_prefix_cache(holder) -> None:  # nested: Ray pickles it by value for the engine actor
        holder.engine.llm.reset_prefix_cache()

    ensure_embedded()  # the model converted once, outside every timing
    sizes = tuple(sorted(sizes))
    tmp = Path(tempfile.mkdtemp(prefix="nat_ray_scale_rollout_"))
    sampler = PeakRSS()
    by_size, walls = [], []  # walls: each size's call seconds, unrounded, for the marginal costs
    raw = None
    try:
        base_cfg = rollout_bench.make_config(max(sizes), str(tmp / "unused"))
        t0 = time.perf_counter()
        pool = _start_engines(base_cfg, lora)
        pool_start_s = time.perf_counter() - t0
        log.info("rollout_curve: engine pool up in %.1fs", pool_start_s)
        # The engine actor's memory beside the driver's: sampled from here, reset per size too.
        read_engine, engine_processes = process_tree_rss(_local_engine_pids(pool.actors))
        engine_sampler = PeakRSS(read=read_engine) if engine_processes else None
        try:
            for n in sizes:
                from dataclasses import replace

                out = tmp / f"size-{n}"
                cfg = rollout_bench.make_config(n, str(out))
                # One batch per size: the engine's occupancy is limited only by max_in_flight.
                cfg = replace(cfg, rollout=replace(cfg.rollout, batch_size=n))
                ray.get([a.__ray_call__.remote(reset_prefix_cache) for a in pool.actors])
                engine_before = engine_sampler.start().start_rss if engine_sampler else None
                rss_before = sampler.start().start_rss
                t1 = time.perf_counter()
                result = rollout_with_pool(cfg, pool, None, progress=False)
                call_s = time.perf_counter() - t1
                peak = sampler.stop()
                engine_peak = engine_sampler.stop() if engine_sampler else None
                if result.generated != n or result.skipped:
                    raise RuntimeError(f"expected {n} fresh trajectories, got {result}")
                stats = _rows_stats(out / PARTS_DIR)
                window = stats["generation_window_s"]
                row = {
                    "size": n,
                    **stats,
                    "call_s": round(call_s, 2),
                    "seconds_per_trajectory": round(window / n, 4),
                    "seconds_per_trajectory_call": round(call_s / n, 4),
                    "completion_tokens_per_s": rollout_bench.rate(stats["completion_tokens"], window),
                    "driver_rss_before_mib": _mib(rss_before),
                    "driver_peak_rss_mib": _mib(peak),
                    "rss_samples": sampler.samples,
                    "engine_rss_before_mib": _mib(engine_before),
                    "engine_peak_rss_mib": _mib(engine_peak),
                }
                log.info("rollout_curve at %d: %s", n, row)
                by_size.append(row)
                walls.append(call_s)
                shutil.rmtree(out, ignore_errors=True)
            largest = by_size[-1]
            m = min(raw_sequences, largest["size"])
            per_seq = max(1, round(largest["completion_tokens"] / largest["trajectories"]))
            raw = ray.get(pool.actors[0].__ray_call__.remote(_make_raw_in_holder(str(BENCH)), m, per_seq))
            log.info("rollout_curve: raw vLLM %s", raw)
        finally:
            pool.close()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    one, big = by_size[0], by_size[-1]
    rollout_tps = big["completion_tokens_per_s"]
    ran = [r["size"] for r in by_size]
    # The engine's peak at the second-largest size over the largest's (128 / 512 by default).
    engine_pair = [r["engine_peak_rss_mib"] for r in by_size[-2:]] if len(by_size) >= 2 else [None, None]
    return {
        "rollout_time_flatness": flatness(one["seconds_per_trajectory"], big["seconds_per_trajectory"]),
        "rollout_rss_flatness": flatness(one["driver_peak_rss_mib"], big["driver_peak_rss_mib"]),
        "rollout_marginal_flatness": marginal_flatness(ran, walls),
        "engine_rss_flatness": flatness(*engine_pair),
        "rollout_fraction_of_raw_vllm": fraction(rollout_tps, raw and raw["completion_tokens_per_s"]),
        "rollout_marginal_s_per_trajectory": [round(c, 4) for c in marginal_costs(ran, walls)],
        "rollout_marginal_flatness_window": marginal_flatness(
            ran, [r["generation_window_s"] for r in by_size]
        ),
        "engine_rss_sampled": f"{engine_processes} process(es): the engine actor and its children"
        if engine_processes
        else "not sampled: the engine actor runs on another node",
        "by_size": by_size,
        "raw_vllm": raw,
        "engine_pool_start_s": round(pool_start_s, 2),
        "engines": "kept up across sizes: one nat_ray.rollout.engine_pool EngineHolder actor "
        + (
            "from start_pool (vLLM with LoRA enabled, as the closed loop runs it; no adapter)"
            if lora
            else "placed as start_pool places it, its vLLM engine as nat-ray rollout builds it (no LoRA)"
        )
        + "; each size through rollout_with_pool -> run_rollout (plan, Parquet parts, scored rows); "
        "prefix cache reset before each size",
        "lora_enabled_engine": lora,
        "settings": {
            "source": "benchmarks/rollout.py ENGINE/AGENT/ROLLOUT (the agent of configs/rollout.yaml), "
            "batch_size = size (one batch)",
            "engine": rollout_bench.ENGINE,
            "agent": rollout_bench.AGENT,
            "rollout": {**rollout_bench.ROLLOUT, "batch_size": "= size"},
            "questions": f"first N {rollout_bench.TASK} {rollout_bench.SPLIT} questions, one trajectory each",
        },
        "definitions": {
            "seconds_per_trajectory": "generation window (earliest started_at to latest ended_at of the "
            "size's rows) / trajectories; seconds_per_trajectory_call uses the whole rollout_with_pool call",
            "rollout_time_flatness": "seconds_per_trajectory at the smallest size / at the largest "
            "(engine start-up excluded: the pool is up before the first size)",
            "rollout_rss_flatness": "driver peak RSS during the smallest size's call / during the largest's "
            "(psutil sampled every 50 ms, reset per size)",
            "rollout_marginal_flatness": "seconds per ADDED trajectory between the first two sizes / between "
            "the last two, from each size's whole rollout_with_pool call (32->128 over 128->512: "
            "((t128 - t32) / 96) / ((t512 - t128) / 384)); the fixed cost per call cancels out; "
            "rollout_marginal_flatness_window uses the generation windows instead",
            "engine_rss_flatness": "the engine actor's peak RSS (its process and children, sampled by the "
            "driver with psutil every 50 ms, reset per size) during the second-largest size / during the "
            "largest (128 / 512 by default)",
            "rollout_fraction_of_raw_vllm": "the largest size's generated tokens/s over its window / raw "
            f"llm.generate on the same engine of its first {raw_sequences} first-turn prompts (same "
            "seeds and temperature), max_tokens=min_tokens=that size's mean tokens per trajectory, "
            "ignore_eos (benchmarks/rollout.py raw_generate)",
        },
    }


def rollout_curve(args) -> dict:
    global _LAST_CURVE
    quick = _quick(args)
    sizes = tuple(getattr(args, "rollout_sizes", None) or (QUICK_ROLLOUT_SIZES if quick else ROLLOUT_SIZES))
    t0 = time.perf_counter()
    lora = bool(getattr(args, "rollout_lora", False))
    out = _run_curve(sizes, QUICK_RAW_SEQUENCES if quick else RAW_SEQUENCES, lora)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["targets"] = dict(TARGETS)
    out["quick"] = quick
    _LAST_CURVE = out
    return out


def plot_rollout_curve(ax, figures: dict) -> None:
    rows = figures["by_size"]
    sizes = [r["size"] for r in rows]
    ax.plot(sizes, [r["seconds_per_trajectory"] for r in rows], "o-", label="s / trajectory (window)")
    ax.plot(sizes, [r["seconds_per_trajectory_call"] for r in rows], "o--", label="s / trajectory (call)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("trajectories")
    ax.set_ylabel("seconds per trajectory")
    rss = ax.twinx()
    rss.plot(sizes, [r["driver_peak_rss_mib"] for r in rows], "s-", color="#d62728", label="driver peak RSS")
    engine = [r.get("engine_peak_rss_mib") for r in rows]  # absent from results before it was measured
    if any(v is not None for v in engine):
        rss.plot(sizes, engine, "^-", color="#9467bd", label="engine peak RSS")
    rss.set_ylabel("peak RSS (MiB)")
    rss.set_ylim(bottom=0)
    ax.set_ylim(bottom=0)
    ax.set_title(
        f"rollout: time flatness {figures['rollout_time_flatness']}, "
        f"RSS flatness {figures['rollout_rss_flatness']}\n"
        f"marginal flatness {figures.get('rollout_marginal_flatness')}, "
        f"engine RSS flatness {figures.get('engine_rss_flatness')}",
        fontsize=9,
    )
    lines = ax.get_legend_handles_labels()
    more = rss.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8)


# ---------------------------------------------------------------------------------------------------
# headline_fractions


def _serve_fraction(clients: int) -> dict:
    """The served agent at ``clients`` concurrent clients / the engine's batch-``clients`` ceiling."""
    import ray
    import requests
    import serve as serve_bench  # sets its Ray env (worker niceness 0, memory monitor off) on import
    from machine_info import load_average
    from ray import serve

    from nat_ray.config import NatRayConfig, from_dict
    from nat_ray.models import ensure_embedded
    from nat_ray.serve.app import APP_NAME, build_app, served_model_ids
    from nat_ray.tasks import get_task

    t0 = time.perf_counter()
    math_questions = get_task("gsm8k").load("test")
    questions = math_questions[:clients]
    load_at_start = load_average()
    ceiling = serve_bench.measure_ceiling(questions)  # a child process, before Ray starts
    log.info("serve: engine ceiling before serving %s", ceiling)
    port = serve_bench.free_port()
    cfg = from_dict(
        NatRayConfig, {**serve_bench.CONFIG, "serve": {**serve_bench.CONFIG["serve"], "port": port}}
    )
    model_id, _ = served_model_ids(cfg, str(ensure_embedded()))
    llm_deployment = "LLMServer:" + model_id.replace("/", "--").replace(".", "_")
    url = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        t1 = time.perf_counter()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
        serve_start_s = time.perf_counter() - t1
        warm = requests.Session()
        for i in range(2):  # first requests load lazy state
            serve_bench.post_agent(warm, url, serve_bench.gsm8k_body(math_questions[-1 - i], 10_000 + i))
        serve_bench.reset_prefix_cache(llm_deployment)
        concurrent = serve_bench.phase_concurrent(url, questions)
    finally:
        serve.shutdown()
        ray.shutdown()
    # Again after serving: a CPU vLLM engine's OpenMP threads slow down manyfold when another job
    # takes a core (a full run here once measured 23 tok/s at batch 32 against 150 normally), and
    # the ceiling is the machine's limit, so the better of the two bracketing measurements counts.
    ceiling_after = serve_bench.measure_ceiling(questions)
    log.info("serve: engine ceiling after serving %s", ceiling_after)
    key = f"batch_{clients}_tokens_per_s"
    ceiling_tps = max(ceiling[key], ceiling_after[key])
    served_tps = concurrent["completion_tokens_per_s"]
    return {
        "serve_fraction_of_batch32_ceiling": fraction(served_tps, ceiling_tps),
        "served_completion_tokens_per_s": round(served_tps, 2),
        "ceiling_tokens_per_s": ceiling_tps,
        "clients": clients,
        "concurrent": concurrent,
        "engine_ceiling": ceiling,
        "engine_ceiling_after": ceiling_after,
        "load_average_at_start": load_at_start,
        "load_average_at_end": load_average(),
        "serve_start_s": round(serve_start_s, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "how": f"benchmarks/serve.py: measure_ceiling (vLLM offline in a child process, same engine "
        f"settings, the {clients} first-turn prompts, {serve_bench.CEILING_TOKENS} tokens each, ignore_eos, "
        f"batch {clients}; run before and after serving, the better counts) against the app of nat-ray serve "
        f"(build_app) with {clients} clients x 1 agent request each (phase_concurrent, first GSM8K test "
        "questions, seeded); generated tokens/s over the phase",
    }


def _train_fraction(steps: int) -> dict:
    """Ray Train + DeepSpeed tokens/s / the bare step's, same data, model, packing and micro-batch."""
    import ray
    import torch
    import train as train_bench  # benchmarks/train.py (nat_examples)
    import yaml
    from train_step import micro_batches_of, time_training

    from nat_ray.config import NatRayConfig, TrainConfig, from_dict
    from nat_ray.core import records
    from nat_ray.import_nat import import_nat, resolve_inputs
    from nat_ray.models import resolve_model
    from nat_ray.train.data import pad_token_id
    from nat_ray.train.packing import pack_examples
    from nat_ray.train.run import run_train
    from nat_ray.train.step import build_model

    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="nat_ray_scale_train_"))
    try:
        rows, _ = import_nat(resolve_inputs([]))  # what `nat-ray import-nat` writes
        data = tmp / "nat_strategyqa.parquet"
        records.write_rows(rows, data)
        train = yaml.safe_load((ROOT / "configs" / "train.yaml").read_text())["train"]
        train.update(
            data=[str(data)],
            storage_path=str(tmp / "runs"),
            run_name="scale",
            max_steps=steps,
            checkpoint_every=0,
        )
        cfg = from_dict(NatRayConfig, {"train": train})
        t1 = time.perf_counter()
        try:
            result = run_train(cfg)
        finally:
            if ray.is_initialized():
                ray.shutdown()
        stage_s = time.perf_counter() - t1
        history = result.history
        # deepspeed_step's tokens are summed over the ranks: each step's tokens/s is the stage's.
        timed = [h["tokens_per_s"] for h in history[1:]] or [h["tokens_per_s"] for h in history]
        workers = cfg.train.num_workers
        stage_tps = statistics.fmean(timed)
        log.info("train stage: %d steps, tokens/s %s", len(history), timed)

        # The bare step: one process, every core, the same kind of rows (NAT examples, packed to
        # max_length, micro-batch of train.yaml), the same model and precision.
        threads = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or 1)
        try:
            from transformers import AutoTokenizer

            t2 = time.perf_counter()
            model_path = resolve_model(cfg.train.base_model)
            tokenizer = AutoTokenizer.from_pretrained(model_path)
            pad_id = pad_token_id(tokenizer)
            examples, source = train_bench.nat_examples(tokenizer, 4 * (steps + 2))
            packed = pack_examples(examples, cfg.train.max_length)
            tc = TrainConfig(**{**train, "num_workers": 1})
            model = build_model(tc, model_path, False)
            mbs = micro_batches_of(packed, cfg.train.micro_batch_size, pad_id, True, train_bench.SEED)
            bare = time_training(model, mbs, torch.device("cpu"), 1, 1, steps - 1 if steps > 1 else 1)
            bare_total_s = time.perf_counter() - t2
            del model
        finally:
            torch.set_num_threads(threads)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "train_fraction_of_bare_step": fraction(stage_tps, bare["tokens_per_s"]),
        "stage_tokens_per_s": round(stage_tps, 2),
        "bare_step_tokens_per_s": round(bare["tokens_per_s"], 2),
        "stage": {
            "workers": workers,
            "steps": len(history),
            "tokens_per_s_by_step": [round(h["tokens_per_s"], 2) for h in history],
            "data": result.data,
            "seconds": round(stage_s, 1),
            "how": "nat_ray.train.run.run_train with configs/train.yaml (2 gloo workers, DeepSpeed ZeRO-3, "
            f"fp32, packed 1024-token rows, micro-batch 1) on the imported NAT StrategyQA trajectories, "
            f"max_steps={steps}, checkpoint only at the end; tokens/s = mean over the steps after the first "
            "of each step's tokens/s as the stage reports it (deepspeed_step: real tokens summed over "
            "the ranks / the step's wall time, all-reduces included)",
        },
        "bare_step": {
            **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in bare.items()},
            "torch_threads": os.cpu_count() or 1,
            "data": source,
            "seconds_with_model_load": round(bare_total_s, 1),
            "how": "benchmarks/train_step.py time_training (nat_ray.train.step.train_step: forward, "
            "backward, clipping, AdamW; no Ray, no DeepSpeed) in the driver, one process with every core, "
            "NAT examples packed to 1024 tokens, micro-batch 1, first step untimed",
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }


def headline_fractions(args) -> dict:
    quick = _quick(args)
    t0 = time.perf_counter()
    out: dict = {}
    if _LAST_CURVE is not None and _LAST_CURVE.get("raw_vllm"):
        curve, reused = _LAST_CURVE, True
    else:  # one size only: the largest of a curve would need the whole curve
        n = QUICK_ROLLOUT_SIZES[-1] if quick else ROLLOUT_SIZES[1]
        curve, reused = _run_curve((n,), QUICK_RAW_SEQUENCES if quick else RAW_SEQUENCES), False
    big = curve["by_size"][-1]
    rollout = {
        "rollout_tokens_per_s": big["completion_tokens_per_s"],
        "raw_vllm_tokens_per_s": curve["raw_vllm"]["completion_tokens_per_s"],
        "trajectories": big["size"],
        "raw_vllm": curve["raw_vllm"],
        "reused_rollout_curve": reused,
        "how": curve["definitions"]["rollout_fraction_of_raw_vllm"],
    }
    serve_part = _serve_fraction(QUICK_SERVE_CLIENTS if quick else SERVE_CLIENTS)
    train_part = _train_fraction(QUICK_TRAIN_STEPS if quick else TRAIN_STEPS)
    out = {
        "rollout_fraction_of_raw_vllm": curve["rollout_fraction_of_raw_vllm"],
        "serve_fraction_of_batch32_ceiling": serve_part.pop("serve_fraction_of_batch32_ceiling"),
        "train_fraction_of_bare_step": train_part.pop("train_fraction_of_bare_step"),
        "rollout": rollout,
        "serve": serve_part,
        "train": train_part,
        "quick": quick,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if quick:
        out["note"] = (
            f"quick: serve at {QUICK_SERVE_CLIENTS} clients against the batch-{QUICK_SERVE_CLIENTS} ceiling; "
            f"{QUICK_TRAIN_STEPS} training steps"
        )
    return out


def plot_headline_fractions(ax, figures: dict) -> None:
    keys = [
        "rollout_fraction_of_raw_vllm",
        "serve_fraction_of_batch32_ceiling",
        "train_fraction_of_bare_step",
    ]
    labels = ["rollout /\nraw vLLM", "serve (32 clients) /\nbatch-32 ceiling", "Ray Train + DS /\nbare step"]
    values = [figures.get(k) or 0.0 for k in keys]
    bars = ax.bar(labels, values, color=["#1f77b4", "#ff7f0e", "#2ca02c"])
    for bar, v in zip(bars, values, strict=True):
        ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom")
    ax.axhline(1.0, color="#999999", linestyle="--", linewidth=1)
    ax.set_ylim(0, max(1.1, max(values) * 1.15))
    ax.set_ylabel("fraction of this machine's limit")
    ax.set_title("headline fractions (each pair measured in one run)")
