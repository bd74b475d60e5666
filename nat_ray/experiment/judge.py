"""A judge for served episodes without a gold answer: an OpenAI-compatible model grades them by a rubric.

A task file's ``judge:`` names the endpoint (the served base model itself, or any teacher), the model,
the rubric and the score scale (:class:`nat_ray.tasks.task_file.JudgeSpec`). A traffic round asks it
about the captured episodes that neither feedback nor a gold answer labels: the calls run a few at a
time, each retried on connection errors and 429/5xx, and every verdict -- the prompt, the reply, the
score -- is written to ``<traffic_dir>/judged/<episode id>.json`` (an object per episode: the capture
location may be a bucket, which has no append; an older ``judged.jsonl`` is read too), which is read
first, so an episode is judged once however many rounds or re-runs see it. A reply without a readable score labels nothing; a call
that fails after its retries is not kept, so a later round asks again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nat_ray.core import nat_data as columns
from nat_ray.core.storage import Store
from nat_ray.errors import ConfigError
from nat_ray.http import retrying_session
from nat_ray.serve.capture import file_name
from nat_ray.tasks import registered_task
from nat_ray.tasks.task_file import load_task_file

log = logging.getLogger(__name__)

JUDGED_DIR = "judged"
JUDGED_FILE = "judged.jsonl"  # where an older loop appended its verdicts
CONCURRENT_CALLS = 8
RETRIES = 3
BACKOFF_S = 0.5
TIMEOUT_S = 120.0
_SCORE = re.compile(r"score\s*[:=]\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def judge_messages(spec, row: Mapping) -> list[dict]:
    """The judge's conversation for one captured episode: the rubric, then the question, the agent's
    turns and its final answer, and how to state the score."""
    turns = "\n".join(f"[{m['role']}] {m['content']}" for m in row[columns.TRAJECTORY])
    return [
        {
            "role": "system",
            "content": f"You grade an AI agent's answer to a question. {spec.rubric.strip()}\n"
            f"End your reply with one line 'Score: N', N an integer from 0 (wrong) to {spec.scale} (right).",
        },
        {
            "role": "user",
            "content": f"Question: {row[columns.QUESTION]}\n\nThe agent's work:\n{turns}\n\n"
            f"Its final answer: {row[columns.ANSWER]}",
        },
    ]


def parse_score(reply: str, scale: int) -> float | None:
    """The last ``Score: N`` of ``reply`` as a fraction of ``scale``, or None when there is none in range."""
    found = _SCORE.findall(reply or "")
    if not found:
        return None
    value = float(found[-1])
    return value / scale if 0 <= value <= scale else None


def task_judges(rows: Iterable[Mapping]) -> dict[str, object]:
    """``{task name: its JudgeSpec}`` for the tasks of ``rows`` that name a judge: the registered task,
    else the task file the row was served from (its lineage)."""
    judges: dict[str, object] = {}
    for name, source in {(r[columns.TASK], r.get(columns.TASK_SOURCE)) for r in rows}:
        try:
            task = registered_task(name)
        except ConfigError:  # not registered here: its file, when the row names one
            try:
                task = load_task_file(source) if source and Path(source).is_file() else None
            except ConfigError as err:  # a task file that no longer loads judges nothing
                log.warning("task %s (%s) does not load: %s; its episodes are not judged", name, source, err)
                task = None
        if task is not None and task.judge is not None:
            judges[name] = task.judge
    return judges


def read_judged(folder: str | Path) -> dict[str, dict]:
    """``{episode_id: verdict}`` kept under ``folder`` (the last verdict per id; torn lines skipped)."""
    store = Store(folder)
    names = ([JUDGED_FILE] if store.is_file(JUDGED_FILE) else []) + store.files(JUDGED_DIR, ".json")
    texts = store.read_texts(names)
    verdicts: dict[str, dict] = {}
    for text in texts:
        for line in text.splitlines():
            try:
                entry = json.loads(line)
                verdicts[str(entry["episode_id"])] = entry
            except (ValueError, KeyError, TypeError):
                continue
    return verdicts


def judge_episodes(
    rows: Iterable[Mapping], judges: Mapping[str, object], folder: str | Path
) -> dict[str, dict]:
    """Verdicts for ``rows`` whose task has a judge (``judges``: task name -> spec), from the cache in
    ``folder`` or asked now; returns ``{episode_id: {"score", ...}}`` for those with a readable score."""
    cached = read_judged(folder)
    todo = [r for r in rows if r[columns.TASK] in judges and r[columns.TRAJECTORY_ID] not in cached]
    if todo:
        log.info("judging %d captured episode(s) without gold or feedback", len(todo))
        lock = threading.Lock()
        session = retrying_session(RETRIES, BACKOFF_S, pool_size=CONCURRENT_CALLS)
        store = Store(folder)

        def one(row: Mapping) -> None:
            spec = judges[row[columns.TASK]]
            verdict = ask(session, spec, row)
            if "error" in verdict:  # not kept: a later round asks again
                return
            name = f"{JUDGED_DIR}/{file_name(verdict['episode_id'])}.json"
            store.write_text(name, json.dumps(verdict) + "\n")
            with lock:
                cached[verdict["episode_id"]] = verdict

        with ThreadPoolExecutor(CONCURRENT_CALLS) as pool:
            list(pool.map(one, todo))
    wanted = {r[columns.TRAJECTORY_ID] for r in rows}
    return {k: v for k, v in cached.items() if k in wanted and v.get("score") is not None}


def ask(session, spec, row: Mapping) -> dict:
    """One judge call; a failure (after the session's retries) is a verdict without a score, logged."""
    messages = judge_messages(spec, row)
    headers = {}
    if spec.api_key_env and os.environ.get(spec.api_key_env):
        headers["Authorization"] = f"Bearer {os.environ[spec.api_key_env]}"
    body = {"model": spec.model, "messages": messages, "temperature": 0.0, "max_tokens": spec.max_tokens}
    verdict = {"episode_id": row[columns.TRAJECTORY_ID], "judge": spec.model, "prompt": messages}
    try:
        response = session.post(
            spec.endpoint.rstrip("/") + "/chat/completions", json=body, headers=headers, timeout=TIMEOUT_S
        )
        response.raise_for_status()
        reply = response.json()["choices"][0]["message"]["content"] or ""
    except Exception as err:  # noqa: BLE001 - a judge that fails labels nothing; the round goes on
        log.warning("judge %s failed on %s: %s", spec.endpoint, row[columns.TRAJECTORY_ID], err)
        return {**verdict, "reply": None, "score": None, "error": f"{type(err).__name__}: {err}"}
    score = parse_score(reply, spec.scale)
    if score is None:
        log.warning(
            "judge reply for %s has no 'Score: N' within 0..%d", row[columns.TRAJECTORY_ID], spec.scale
        )
    return {**verdict, "reply": reply, "score": score}
