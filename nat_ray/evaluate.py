"""Batched ReAct evaluation, the paper's way (spec §6): in-process on vLLM, or against a running server.

Every (task, question, seed) becomes one episode with the inference ("correct") prompt of
``agent.template`` and the paper's decoding (T=0.2, top-p 0.9; or greedy with ``eval.greedy``).
In-process, all episodes of all tasks and seeds share one batched :class:`nat_ray.react.Stepper`
(``engine.max_num_seqs`` open at once, refilled as they end); with ``eval.endpoint`` they are sent
as concurrent ``POST /v1/agent`` requests, which the server batches the same way.

Outputs in ``eval.output_dir``: one trajectory Parquet file per task (:mod:`nat_ray.records` schema,
every seed), ``summary.json`` and ``results.md``, whose tables have the paper's layout (spec §7:
math accuracy per dataset plus the unweighted average of the math datasets, HotpotQA EM/F1,
StrategyQA accuracy), with paper and robust scoring side by side and mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nat_ray import nat_data as nd
from nat_ray import records
from nat_ray.config import NatRayConfig, load_config
from nat_ray.errors import ConfigError, ModelError
from nat_ray.react import GENERATION_ERROR, Episode, Sampling, Step
from nat_ray.tasks import Question, get_task

log = logging.getLogger(__name__)

PARTS_DIR = "trajectories"
# The paper's names, and its column order (Table 2: GSM8K, ASDiv, SVAMP, MultiArith).
PAPER_NAMES = {
    "gsm8k": "GSM8K",
    "asdiv": "ASDiv",
    "svamp": "SVAMP",
    "multiarith": "MultiArith",
    "hotpotqa": "HotpotQA",
    "strategyqa": "StrategyQA",
}
ENDPOINT_RETRIES = 3  # connection errors and 502/503/504, with exponential backoff


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One episode to run: a question of a task under one seed."""

    task: str
    question: Question
    seed: int
    trajectory_id: str


# --------------------------------------------------------------------------------------------
# Plan (pure)


def decoding(cfg: NatRayConfig) -> tuple[float, float]:
    """``(temperature, top_p)`` of the evaluation: greedy, or the paper's sampling."""
    return (0.0, 1.0) if cfg.eval.greedy else (cfg.eval.temperature, cfg.eval.top_p)


def model_label(cfg: NatRayConfig) -> str:
    """The model as rows name it: ``engine.model``, plus ``+lora:<path>`` with an adapter."""
    return cfg.engine.model + (f"+lora:{cfg.serve.lora}" if cfg.serve.lora else "")


def plan_items(cfg: NatRayConfig, model: str) -> list[EvalItem]:
    """Every (task, question, seed) of the evaluation, each with its trajectory id.

    Raises:
        ConfigError / DataError: unknown task or split, missing data.
    """
    temperature, _ = decoding(cfg)
    items = []
    for seed in cfg.eval.seeds:
        for name in cfg.eval.tasks:
            task = get_task(name)
            for q in task.load(cfg.eval.split, limit=cfg.eval.limit):
                tid = records.trajectory_id(model, task.name, q.id, temperature, 0, seed)
                items.append(EvalItem(task.name, q, seed, tid))
    return items


# --------------------------------------------------------------------------------------------
# Metrics and tables (pure)


def seed_metrics(rows: Sequence[dict]) -> list[dict]:
    """One record per (task, seed): accuracy in percent (paper and robust), HotpotQA EM/F1, finish rate."""
    groups: dict[tuple[str, int], list[dict]] = collections.defaultdict(list)
    for row in rows:
        groups[(row[nd.TASK], row[nd.SEED])].append(row)
    out = []
    for (task, seed), group in sorted(groups.items()):
        n = len(group)
        record = {
            "task": task,
            "family": group[0][nd.FAMILY],
            "seed": seed,
            "count": n,
            "acc_paper": 100.0 * sum(r[nd.CORRECT_PAPER] for r in group) / n,
            "acc_robust": 100.0 * sum(r[nd.CORRECT_ROBUST] for r in group) / n,
            "finished": 100.0 * sum(r[nd.FINISHED] for r in group) / n,
            "mean_turns": sum(r[nd.TURNS] for r in group) / n,
            "failures": dict(
                collections.Counter(r[nd.FAILURE_REASON] for r in group if r[nd.FAILURE_REASON]).most_common()
            ),
        }
        if record["family"] == "hotpotqa":
            # EM is already normalised, so it is the paper's and the robust verdict at once.
            record["em"] = record["acc_paper"]
            record["f1"] = 100.0 * sum(r[nd.F1] or 0.0 for r in group) / n
        out.append(record)
    return out


def mean_std(values: Sequence[float]) -> dict:
    """``{"mean", "std", "values"}``; std is the sample standard deviation (0 for a single seed)."""
    values = list(values)
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def summarize(rows: Sequence[dict]) -> dict:
    """Mean ± std over seeds per task and metric, and the math average (spec §6).

    The math average is computed per seed as the unweighted mean of the math datasets' accuracies
    (Tables 2, 3 and 7), then averaged over seeds.

    Returns:
        ``{"tasks": {task: {...}}, "math_average": {...} | None}``.
    """
    per_seed = seed_metrics(rows)
    by_task: dict[str, list[dict]] = collections.defaultdict(list)
    for record in per_seed:
        by_task[record["task"]].append(record)
    tasks = {}
    for task, recs in by_task.items():
        metrics = ["acc_paper", "acc_robust", "finished", "mean_turns"]
        if recs[0]["family"] == "hotpotqa":
            metrics += ["em", "f1"]
        failures: collections.Counter = collections.Counter()
        for r in recs:
            failures.update(r["failures"])
        tasks[task] = {
            "family": recs[0]["family"],
            "seeds": [r["seed"] for r in recs],
            "questions": recs[0]["count"],
            "trajectories": sum(r["count"] for r in recs),
            "failures": dict(failures.most_common()),
            **{m: mean_std([r[m] for r in recs]) for m in metrics},
        }
    math_tasks = [t for t in PAPER_NAMES if t in tasks and tasks[t]["family"] == "math"]
    math_average = None
    if math_tasks:
        seeds = sorted(set.intersection(*(set(tasks[t]["seeds"]) for t in math_tasks)))
        per = {(r["task"], r["seed"]): r for r in per_seed}
        math_average = {
            "tasks": math_tasks,
            **{
                mode: mean_std([statistics.fmean(per[(t, s)][mode] for t in math_tasks) for s in seeds])
                for mode in ("acc_paper", "acc_robust")
            },
        }
    return {"tasks": tasks, "math_average": math_average}


def _cell(stat: dict) -> str:
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}"


def format_results(summary: dict, header: dict) -> str:
    """Markdown tables shaped like the paper's (spec §7), paper and robust scoring side by side."""
    tasks = summary["tasks"]
    lines = ["# NAT evaluation", ""]
    lines += [f"- **{k}**: {v}" for k, v in header.items()]
    lines += ["", "Cells are mean ± std over seeds (sample std; 0 with one seed), in percent.", ""]
    math = summary["math_average"]
    if math is not None:
        cols = math["tasks"]
        names = [PAPER_NAMES[t] for t in cols]
        avg = "Avg" if len(cols) == 4 else f"Avg ({len(cols)} of 4)"
        lines += ["## Math (accuracy %; Table 2 layout)", ""]
        lines += ["| Scoring | " + " | ".join([*names, avg]) + " |", "|---" * (len(cols) + 2) + "|"]
        for mode, label in (("acc_paper", "paper"), ("acc_robust", "robust")):
            cells = [_cell(tasks[t][mode]) for t in cols] + [_cell(math[mode])]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    if "hotpotqa" in tasks:
        t = tasks["hotpotqa"]
        lines += ["## HotpotQA (EM and F1 ×100; Table 5 layout)", ""]
        lines += ["| Scoring | EM | F1 |", "|---|---|---|"]
        lines.append(f"| paper = robust | {_cell(t['em'])} | {_cell(t['f1'])} |")
        lines += ["", "EM compares normalised answers, so the paper's and the robust verdicts coincide.", ""]
    if "strategyqa" in tasks:
        t = tasks["strategyqa"]
        lines += ["## StrategyQA (accuracy %; Table 6 layout)", ""]
        lines += ["| Scoring | Accuracy |", "|---|---|"]
        lines.append(f"| paper | {_cell(t['acc_paper'])} |")
        lines.append(f"| robust | {_cell(t['acc_robust'])} |")
        lines.append("")
    lines += ["## Per task", ""]
    lines += [
        "| Task | Questions | Seeds | Acc. paper | Acc. robust | Finished % | Turns | Failures |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in [t for t in PAPER_NAMES if t in tasks]:
        t = tasks[name]
        failures = ", ".join(f"{k} {v}" for k, v in t["failures"].items()) or "-"
        lines.append(
            f"| {PAPER_NAMES[name]} | {t['questions']} | {len(t['seeds'])} | {_cell(t['acc_paper'])} | "
            f"{_cell(t['acc_robust'])} | {_cell(t['finished'])} | {t['mean_turns']['mean']:.2f} | {failures} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Running


def _row(cfg: NatRayConfig, item: EvalItem, ep: Episode, model: str, engine: str, chash: str, started: str):
    task = get_task(item.task)
    temperature, _ = decoding(cfg)
    return records.episode_row(
        ep,
        task=task.name,
        family=task.family,
        question_id=item.question.id,
        question=item.question.question,
        gold=item.question.gold,
        score=task.score(ep.answer, item.question),
        temperature=temperature,
        sample_index=0,
        seed=item.seed,
        model=model,
        engine=engine,
        config_hash=chash,
        started_at=started,
    )


def _episode(cfg: NatRayConfig, item: EvalItem) -> Episode:
    from nat_ray.agent import new_episode

    temperature, top_p = decoding(cfg)
    sampling = Sampling(temperature, top_p, cfg.agent.max_new_tokens, item.seed)
    return new_episode(get_task(item.task), item.question.question, cfg.agent, item.trajectory_id, sampling)


class _LoraEngine:
    """The in-process vLLM engine with every request routed through one LoRA adapter (batch or streaming)."""

    def __init__(self, engine, path: str) -> None:
        from vllm.lora.request import LoRARequest

        self.engine = engine
        self.request = LoRARequest("nat-lora", 1, path)

    def generate(self, conversations, sampling):
        return self.engine.generate(conversations, sampling, lora_request=self.request)

    def submit(self, conversation, sampling) -> str:
        return self.engine.submit(conversation, sampling, lora_request=self.request)

    def poll(self):
        return self.engine.poll()

    def close(self) -> None:
        self.engine.close()


def run_in_process(cfg: NatRayConfig, items: Sequence[EvalItem], chash: str, engine=None) -> list[dict]:
    """Run every item in one batched stepper on an in-process engine; return the trajectory rows.

    Args:
        engine: a ready :class:`nat_ray.react.ChatEngine` to use (not closed here); ``None`` builds
            ``engine`` from the config (with ``serve.lora`` as a LoRA adapter) and closes it after.
    """
    from tqdm import tqdm

    from nat_ray.react import LocalTools, Stepper
    from nat_ray.tools import configure_tools

    own = engine is None
    if own:
        from nat_ray.engines import build_engine
        from nat_ray.engines.vllm_engine import on_gpu
        from nat_ray.serve import check_lora, resolve_export

        # A training export folder stands for its model/ (and, as --lora, its adapter/).
        engine_cfg = dataclasses.replace(cfg.engine, model=resolve_export(cfg.engine.model, "model"))
        if engine_cfg.backend == "vllm" and not on_gpu(engine_cfg):
            # vLLM's CPU build kills its engine when a seeded request shares a step with a chunked
            # prefill ("CPU Generator does not use offset"), and every evaluation turn is seeded.
            engine_cfg = dataclasses.replace(
                engine_cfg, extra={"enable_chunked_prefill": False, **engine_cfg.extra}
            )
        lora = check_lora(cfg.serve.lora) if cfg.serve.lora else None
        if lora is not None:
            if engine_cfg.backend != "vllm":
                raise ConfigError(f"a LoRA adapter needs engine.backend='vllm', got {engine_cfg.backend!r}")
            if not engine_cfg.lora:
                log.info("evaluating the adapter %s: vLLM starts with LoRA enabled (engine.lora)", lora)
                engine_cfg = dataclasses.replace(engine_cfg, lora=True)
        engine = build_engine(engine_cfg)
        if lora is not None:
            engine = _LoraEngine(engine, lora)
    configure_tools(cfg.tools)
    model, started = model_label(cfg), records.now_iso()
    by_id = {item.trajectory_id: item for item in items}
    rows: list[dict] = []
    bar = tqdm(total=len(items), desc="episodes", unit="ep", file=sys.stderr)

    def finish(ep: Episode) -> None:
        rows.append(_row(cfg, by_id[ep.id], ep, model, cfg.engine.backend, chash, started))
        bar.update(1)

    stepper = Stepper(engine, LocalTools(), stop_on_tool_error=cfg.agent.stop_on_tool_error, on_done=finish)
    queue = collections.deque(items)
    try:
        while queue or stepper.open:
            while queue and stepper.open < cfg.engine.max_num_seqs:
                stepper.add(_episode(cfg, queue.popleft()))
            stepper.step()
    finally:
        bar.close()
        if own:
            engine.close()
    return rows


def _session(concurrency: int):
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util import Retry

    retry = Retry(
        total=ENDPOINT_RETRIES,
        backoff_factor=0.5,
        status_forcelist=(502, 503, 504),
        allowed_methods=["GET", "POST"],
        raise_on_status=False,
    )
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=retry, pool_maxsize=concurrency, pool_block=True))
    session.mount("https://", HTTPAdapter(max_retries=retry, pool_maxsize=concurrency, pool_block=True))
    return session


def _remote_episode(item: EvalItem, body: dict) -> Episode:
    """An :class:`Episode` rebuilt from a ``/v1/agent`` answer (the server reports token totals only)."""
    steps: list[Step] = []
    for turn in body["trajectory"]:
        if turn["role"] == "assistant":
            steps.append(Step(turn["content"]))
        elif steps:
            steps[-1].observation = turn["content"].removeprefix("Observation: ")
    if steps:
        steps[0].prompt_tokens = body["usage"]["prompt_tokens"]
        steps[0].completion_tokens = body["usage"]["completion_tokens"]
    return Episode(
        id=item.trajectory_id,
        prompt=body["prompt"],
        tools=get_task(item.task).tools,
        steps=steps,
        answer=body["answer"],
        finished=body["finished"],
        failure_reason=body["failure_reason"],
    )


def check_endpoint(url: str, timeout_s: float = 30.0) -> str:
    """The agent model id a running server reports on ``/healthz``.

    Raises:
        ModelError: the server cannot be reached or is not healthy.
    """
    import requests

    try:
        response = requests.get(f"{url}/healthz", timeout=timeout_s)
    except requests.RequestException as err:
        raise ModelError(
            f"cannot reach the server at {url} ({type(err).__name__}); is `nat-ray serve` running, "
            "and is eval.endpoint right (http://host:port)?"
        ) from None
    if response.status_code != 200:
        raise ModelError(f"GET {url}/healthz answered HTTP {response.status_code}: {response.text[:300]}")
    return response.json()["model"]


def run_endpoint(cfg: NatRayConfig, items: Sequence[EvalItem], chash: str) -> list[dict]:
    """Send every item to ``eval.endpoint``'s ``/v1/agent``, ``serve.max_concurrent_episodes`` at a time.

    Raises:
        ConfigError: the server refuses a request (4xx): the eval's settings break its limits.
        ModelError: the server cannot be reached.
    """
    from tqdm import tqdm

    url = cfg.eval.endpoint.rstrip("/")
    model = check_endpoint(url)
    temperature, top_p = decoding(cfg)
    concurrency = cfg.serve.max_concurrent_episodes
    session = _session(concurrency)
    started = records.now_iso()
    failed = 0

    def one(item: EvalItem) -> dict:
        nonlocal failed
        body = {
            "id": item.trajectory_id,
            "task": item.task,
            "question": item.question.question,
            "max_turns": cfg.agent.max_turns,
            "max_tokens": cfg.agent.max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": item.seed,
        }
        response = session.post(f"{url}/v1/agent", json=body, timeout=cfg.serve.request_timeout_s + 30)
        if 400 <= response.status_code < 500:
            raise ConfigError(
                f"{url}/v1/agent refused a request (HTTP {response.status_code}): {response.text[:500]}"
            )
        if response.status_code != 200:
            failed += 1
            log.warning("%s/v1/agent answered HTTP %d: %s", url, response.status_code, response.text[:200])
            ep = Episode(item.trajectory_id, [], get_task(item.task).tools, failure_reason=GENERATION_ERROR)
        else:
            ep = _remote_episode(item, response.json())
        return _row(cfg, item, ep, model, "endpoint", chash, started)

    with ThreadPoolExecutor(concurrency) as pool:
        rows = list(tqdm(pool.map(one, items), total=len(items), desc="episodes", unit="ep", file=sys.stderr))
    session.close()
    if failed:
        log.warning(
            "%d of %d requests failed on the server; they count as unfinished episodes", failed, len(items)
        )
    return rows


def eval_header(cfg: NatRayConfig, model: str, count: int) -> dict:
    """The settings a reader needs next to the tables."""
    temperature, top_p = decoding(cfg)
    return {
        "model": model,
        "runs on": f"server {cfg.eval.endpoint}" if cfg.eval.endpoint else f"in-process {cfg.engine.backend}",
        "split": cfg.eval.split,
        "questions per task": cfg.eval.limit if cfg.eval.limit is not None else "all",
        "seeds": ", ".join(str(s) for s in cfg.eval.seeds),
        "decoding": "greedy" if cfg.eval.greedy else f"temperature {temperature:g}, top-p {top_p:g}",
        "prompt": f"{cfg.agent.template} ({cfg.agent.shots}-shot), at most {cfg.agent.max_turns} turns "
        f"of {cfg.agent.max_new_tokens} tokens",
        "trajectories": count,
    }


def run_eval(cfg: NatRayConfig, engine=None) -> dict:
    """Run the evaluation ``cfg`` describes; write the Parquet files, ``summary.json`` and ``results.md``.

    Args:
        engine: an in-process engine to reuse (tests share one); ignored with ``eval.endpoint``.

    Returns:
        The summary (also in ``summary.json``) with ``output_dir`` and ``seconds``.
    """
    start = time.time()
    out = Path(cfg.eval.output_dir)
    (out / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    model = model_label(cfg)
    items = plan_items(cfg, model)  # bad tasks or missing data fail here, before any engine starts
    chash = records.config_hash(
        {
            "engine": {"model": cfg.engine.model, "backend": cfg.engine.backend},
            "lora": cfg.serve.lora,
            "agent": dataclasses.asdict(cfg.agent),
            "eval": dataclasses.asdict(cfg.eval),
        }
    )
    log.info(
        "evaluating %d episodes (%d tasks x %d seeds)", len(items), len(cfg.eval.tasks), len(cfg.eval.seeds)
    )
    if cfg.eval.endpoint:
        rows = run_endpoint(cfg, items, chash)
        model = rows[0][nd.MODEL] if rows else model
    else:
        rows = run_in_process(cfg, items, chash, engine)
    for task in cfg.eval.tasks:
        task_rows = [r for r in rows if r[nd.TASK] == get_task(task).name]
        records.write_rows(task_rows, out / PARTS_DIR / f"{get_task(task).name}.parquet")
    summary = {
        "settings": eval_header(cfg, model, len(rows)),
        **summarize(rows),
        "output_dir": str(out),
        "seconds": round(time.time() - start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(format_results(summary, summary["settings"]))
    return summary


# --------------------------------------------------------------------------------------------
# Command line


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``eval`` on the CLI's subparsers; the parser's ``func`` is :func:`run`."""
    from nat_ray.cli import _add_config_args

    p = subparsers.add_parser(
        "eval",
        help="evaluate the agent the paper's way (in-process vLLM or a running server)",
        description=(
            "Run the paper's evaluation (inference prompt, T=0.2 / top-p 0.9, or --greedy) over tasks and\n"
            "seeds, in-process on vLLM (one batched ReAct loop) or against a running `nat-ray serve`\n"
            "(--endpoint, concurrent /v1/agent requests). Writes trajectory Parquet, summary.json and\n"
            "results.md (the paper's table layout, paper and robust scoring, mean ± std over seeds)."
        ),
        epilog=(
            "examples:\n"
            "  nat-ray eval --config configs/eval.yaml\n"
            "  nat-ray eval --model runs/train/nat/export/model --tasks gsm8k,svamp --seeds 0,1,2 --limit 50\n"
            "  nat-ray eval --endpoint http://127.0.0.1:8000 --tasks gsm8k,hotpotqa --greedy"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="HF checkpoint path or hub id (default: the embedded model)")
    p.add_argument("--lora", help="peft adapter directory to evaluate on top of --model")
    p.add_argument(
        "--tasks", type=lambda s: s.split(","), help="comma-separated tasks, e.g. gsm8k,svamp,hotpotqa"
    )
    p.add_argument(
        "--seeds", type=lambda s: [int(x) for x in s.split(",")], help="comma-separated seeds, e.g. 0,1,2"
    )
    p.add_argument("--limit", type=int, help="questions per task (default 20)")
    p.add_argument("--split", help="dataset split (default test)")
    p.add_argument("--endpoint", help="evaluate a running server (http://host:port) instead of in-process")
    p.add_argument(
        "--greedy", action="store_true", default=None, help="greedy decoding instead of T=0.2/top-p 0.9"
    )
    p.add_argument("--output-dir", help="where results go (default runs/eval)")
    _add_config_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """``nat-ray eval``: load the config with the flags as overrides, run, print the tables."""
    from nat_ray.cli import _overrides

    flags = {
        "model": "engine.model",
        "lora": "serve.lora",
        "tasks": "eval.tasks",
        "seeds": "eval.seeds",
        "limit": "eval.limit",
        "split": "eval.split",
        "endpoint": "eval.endpoint",
        "greedy": "eval.greedy",
        "output_dir": "eval.output_dir",
    }
    summary = run_eval(load_config(NatRayConfig, args.config, _overrides(args, flags)))
    print((Path(summary["output_dir"]) / "results.md").read_text())
    print(
        f"{summary['settings']['trajectories']} trajectories in {summary['output_dir']} in {summary['seconds']}s"
    )
    return 0
