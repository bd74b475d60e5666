"""Batched ReAct evaluation, the paper's way (spec §6): in-process on vLLM, or against a running server.

Every (task, question, seed) becomes one episode with the inference ("correct") prompt of
``agent.template`` and the paper's decoding (T=0.2, top-p 0.9; or greedy with ``eval.greedy``).
In-process, all episodes of all tasks and seeds share one batched :class:`nat_ray.core.react.Stepper`
(``engine.max_num_seqs`` open at once, refilled as they end); with ``eval.endpoint`` they are sent
as concurrent ``POST /v1/agent`` requests, which the server batches the same way.

Outputs in ``eval.output_dir``: one trajectory Parquet file per task (:mod:`nat_ray.core.records` schema,
every seed), ``summary.json`` and ``results.md``, whose tables have the paper's layout (spec §7:
math accuracy per dataset plus the unweighted average of the math datasets, HotpotQA EM/F1,
StrategyQA accuracy), with paper and robust scoring side by side and mean ± std over seeds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nat_ray import safe_files
from nat_ray.config import NatRayConfig
from nat_ray.core import nat_data as columns
from nat_ray.core import records
from nat_ray.core.react import GENERATION_ERROR, Episode, Sampling, Step
from nat_ray.engines import build_engine
from nat_ray.errors import ConfigError, ModelError
from nat_ray.evaluation.results_table import format_eval_results, is_smoke_test, summarize
from nat_ray.http import retrying_session
from nat_ray.models import check_lora, resolve_export
from nat_ray.paths import PARTS_DIR
from nat_ray.tasks import get_task
from nat_ray.tasks.episodes import PlannedEpisode, plan_episodes, scored_row

log = logging.getLogger(__name__)

ENDPOINT_RETRIES = 3  # connection errors and 502/503/504, with exponential backoff


# --------------------------------------------------------------------------------------------
# Plan (pure)


def decoding(cfg: NatRayConfig) -> tuple[float, float]:
    """``(temperature, top_p)`` of the evaluation: greedy, or the paper's sampling."""
    return (0.0, 1.0) if cfg.eval.greedy else (cfg.eval.temperature, cfg.eval.top_p)


def model_label(cfg: NatRayConfig) -> str:
    """The model as rows name it: ``engine.model``, plus ``+lora:<path>`` with an adapter."""
    return cfg.engine.model + (f"+lora:{cfg.serve.lora}" if cfg.serve.lora else "")


def plan_items(cfg: NatRayConfig, model: str) -> list[PlannedEpisode]:
    """Every (seed, task, question) of the evaluation, each with its trajectory id.

    Raises:
        ConfigError / DataError: unknown task or split, missing data.
    """
    from nat_ray.agent import prepare_tasks

    temperature, _ = decoding(cfg)
    tasks = prepare_tasks(cfg.eval.tasks, cfg)[0]
    return plan_episodes(
        tasks, cfg.eval.split, cfg.eval.limit, model, temperatures=[temperature], seeds=cfg.eval.seeds
    )


# --------------------------------------------------------------------------------------------
# Running


def _row(
    plan: PlannedEpisode,
    ep: Episode,
    model: str,
    engine: str,
    config_hash: str,
    started: str,
    tool_versions: dict[str, str] | None = None,
    tokenizer=None,
) -> dict:
    return scored_row(
        plan,
        get_task(plan.task),
        ep,
        model=model,
        engine=engine,
        config_hash=config_hash,
        started_at=started,
        tool_versions=tool_versions or {},
        tokenizer=tokenizer,
    )


def _episode(cfg: NatRayConfig, plan: PlannedEpisode) -> Episode:
    from nat_ray.agent import new_episode

    temperature, top_p = decoding(cfg)
    sampling = Sampling(temperature, top_p, cfg.agent.max_new_tokens, plan.seed)
    return new_episode(get_task(plan.task), plan.question, cfg.agent, plan.trajectory_id, sampling)


def run_in_process(
    cfg: NatRayConfig, items: Sequence[PlannedEpisode], config_hash: str, engine=None
) -> list[dict]:
    """Run every item in one batched stepper on an in-process engine; return the trajectory rows.

    Args:
        engine: a ready :class:`nat_ray.core.react.ChatEngine` to use (not closed here); ``None`` builds
            ``engine`` from the config (with ``serve.lora`` as a LoRA adapter) and closes it after.
    """
    from tqdm import tqdm

    from nat_ray.core.react import LocalTools, Stepper
    from nat_ray.tools import TOOL_VERSIONS, configure_tools

    own = engine is None
    if own:
        # A training export folder stands for its model/ (and, as --lora, its adapter/).
        engine_cfg = dataclasses.replace(cfg.engine, model=resolve_export(cfg.engine.model, "model"))
        lora = check_lora(cfg.serve.lora) if cfg.serve.lora else None
        if lora is not None:
            log.info("evaluating the adapter %s: vLLM starts with LoRA enabled", lora)
        engine = build_engine(engine_cfg, lora_path=lora)
    configure_tools(cfg.tools)
    versions = dict(TOOL_VERSIONS)
    model, started = model_label(cfg), records.now_iso()
    by_id = {item.trajectory_id: item for item in items}
    tokenizer = getattr(engine, "tokenizer", None)  # counts each episode's token drift
    rows: list[dict] = []
    bar = tqdm(total=len(items), desc="episodes", unit="ep", file=sys.stderr)

    def finish(ep: Episode) -> None:
        rows.append(
            _row(by_id[ep.id], ep, model, cfg.engine.backend, config_hash, started, versions, tokenizer)
        )
        bar.update(1)

    stepper = Stepper(engine, LocalTools(), stop_on_tool_error=cfg.agent.stop_on_tool_error, on_done=finish)
    try:
        for _ in stepper.run_refilling((_episode(cfg, item) for item in items), cfg.engine.max_num_seqs):
            pass
    finally:
        bar.close()
        if own:
            engine.close()
    return rows


def _remote_episode(item: PlannedEpisode, body: dict) -> Episode:
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


def endpoint_headers(api_key_env: str | None) -> dict[str, str]:
    """The ``Authorization`` header for a server started with a key (``serve.api_key_env`` set here too)."""
    key = os.environ.get(api_key_env) if api_key_env else None
    return {"Authorization": f"Bearer {key}"} if key else {}


def check_endpoint(url: str, timeout_s: float = 30.0, headers: dict[str, str] | None = None) -> str:
    """The agent model id a running server reports on ``/healthz``.

    Raises:
        ModelError: the server cannot be reached or is not healthy (a 401: the key is missing or wrong).
    """
    import requests

    try:
        response = requests.get(f"{url}/healthz", timeout=timeout_s, headers=headers or {})
    except requests.RequestException as err:
        raise ModelError(
            f"cannot reach the server at {url} ({type(err).__name__}); is `nat-ray serve` running, "
            "and is eval.endpoint right (http://host:port)?"
        ) from None
    if response.status_code == 401:
        raise ModelError(
            f"GET {url}/healthz answered HTTP 401: the server wants a key; set the variable "
            "serve.api_key_env names (NAT_RAY_API_KEY by default) to the server's key"
        )
    if response.status_code != 200:
        raise ModelError(f"GET {url}/healthz answered HTTP {response.status_code}: {response.text[:300]}")
    return response.json()["model"]


def run_endpoint(cfg: NatRayConfig, items: Sequence[PlannedEpisode], config_hash: str) -> list[dict]:
    """Send every item to ``eval.endpoint``'s ``/v1/agent``, ``serve.max_concurrent_episodes`` at a time.

    Raises:
        ConfigError: the server refuses a request (4xx): the eval's settings break its limits.
        ModelError: the server cannot be reached.
    """
    from tqdm import tqdm

    from nat_ray.tools import configured_versions

    url = cfg.eval.endpoint.rstrip("/")
    headers = endpoint_headers(cfg.serve.api_key_env)
    model = check_endpoint(url, headers=headers)
    versions = configured_versions(cfg.tools)  # the server's tools, as configured here
    temperature, top_p = decoding(cfg)
    concurrency = cfg.serve.max_concurrent_episodes
    session = retrying_session(
        ENDPOINT_RETRIES, backoff_factor=0.5, statuses=(429, 502, 503, 504), pool_size=concurrency
    )
    session.headers.update(headers)
    started = records.now_iso()
    failed = 0

    def one(item: PlannedEpisode) -> dict:
        nonlocal failed
        body = {
            "id": item.trajectory_id,
            "task": item.task,
            "question": item.question,
            "max_turns": cfg.agent.max_turns,
            "max_tokens": cfg.agent.max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": item.seed,
        }
        response = session.post(f"{url}/v1/agent", json=body, timeout=cfg.serve.request_timeout_s + 30)
        if 400 <= response.status_code < 500 and response.status_code != 429:
            raise ConfigError(
                f"{url}/v1/agent refused a request (HTTP {response.status_code}): {response.text[:500]}"
            )
        if response.status_code != 200:
            failed += 1
            log.warning("%s/v1/agent answered HTTP %d: %s", url, response.status_code, response.text[:200])
            ep = Episode(item.trajectory_id, [], get_task(item.task).tools, failure_reason=GENERATION_ERROR)
        else:
            ep = _remote_episode(item, response.json())
        return _row(item, ep, model, "endpoint", config_hash, started, versions)

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


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """What an evaluation measured (:func:`run_eval`); :meth:`to_dict` is ``summary.json`` plus ``smoke_test``.

    Attributes:
        settings: the header of ``results.md`` (model, split, seeds, decoding, prompt, trajectories).
        tasks: per task, mean and spread over seeds of each metric, ``n``, Wilson intervals,
            failure reasons (:func:`~nat_ray.evaluation.results_table.summarize`).
        math_average: the math tasks' average (spec section 6), or None without math tasks.
        output_dir: the stage's folder (``trajectories/``, ``summary.json``, ``results.md``).
        seconds: wall time.
        smoke_test: whether the tables say they test the machinery, not the method.
    """

    settings: dict
    tasks: dict
    math_average: dict | None
    output_dir: str
    seconds: float
    smoke_test: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def scores(self) -> dict:
        """``{"tasks", "math_average"}``: what a pipeline's or loop's results table reads."""
        return {"tasks": self.tasks, "math_average": self.math_average}


def run_eval(cfg: NatRayConfig, engine=None, smoke_test: bool | None = None) -> EvalResult:
    """Run the evaluation ``cfg`` describes; write the Parquet files, ``summary.json`` and ``results.md``.

    Args:
        engine: an in-process engine to reuse (tests share one); ignored with ``eval.endpoint``.
        smoke_test: whether the tables say they test the machinery, not the method (None: when
            ``engine.model`` is the tiny embedded default; a pipeline passes its base model's answer).

    Returns:
        an :class:`EvalResult` (also in ``summary.json``, less ``smoke_test``).
    """
    start = time.time()
    out = Path(cfg.eval.output_dir)
    from nat_ray.agent import with_tasks_resolved

    tasks, cfg = with_tasks_resolved(cfg, "eval")  # bad task files fail here, before any engine starts
    for task in tasks:  # a prompt the agent settings cannot build (an unknown template)
        task.build_messages("?", cfg.agent.template, None, cfg.agent.shots)
    model = model_label(cfg)
    items = plan_items(cfg, model)  # missing data fails here, before the output folder is made
    (out / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    config_hash = records.config_hash(
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
        rows = run_endpoint(cfg, items, config_hash)
        model = rows[0][columns.MODEL] if rows else model
    else:
        rows = run_in_process(cfg, items, config_hash, engine)
    for task in cfg.eval.tasks:
        task_rows = [r for r in rows if r[columns.TASK] == get_task(task).name]
        records.write_rows(task_rows, out / PARTS_DIR / f"{get_task(task).name}.parquet")
    if smoke_test is None:
        smoke_test = is_smoke_test(cfg.engine.model, cfg.engine.device)
    table = summarize(rows)
    result = EvalResult(
        settings=eval_header(cfg, model, len(rows)),
        tasks=table["tasks"],
        math_average=table["math_average"],
        output_dir=str(out),
        seconds=round(time.time() - start, 1),
        smoke_test=smoke_test,
    )
    saved = {k: v for k, v in result.to_dict().items() if k != "smoke_test"}
    (out / "summary.json").write_text(json.dumps(saved, indent=2))
    (out / "results.md").write_text(
        format_eval_results(result.scores, result.settings, smoke_test=smoke_test)
    )
    return result


def main_eval(cfg: NatRayConfig, json_path: str | None = None) -> int:
    """``nat-ray eval``: run the evaluation and print its tables."""
    result = run_eval(cfg)
    out = safe_files.tables_stream(json_path)
    print((Path(result.output_dir) / "results.md").read_text(), file=out)
    print(
        f"{result.settings['trajectories']} trajectories in {result.output_dir} in {result.seconds}s",
        file=out,
    )
    if json_path:
        safe_files.write_result(json_path, result.to_dict())
    return 0
