"""``nat-ray tasks``: every task this machine knows, its splits, where each split's data was found and
how many questions it holds, so a newcomer sees what runs before running anything."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from nat_ray import paths, safe_files
from nat_ray.errors import NatRayError
from nat_ray.tasks import TASKS, register_tasks
from nat_ray.tasks.loaders import HF_PREFIX
from nat_ray.tasks.task_file import Task


def _where(files: tuple[Path, ...]) -> str:
    if all(f.is_relative_to(paths.PACKAGE_DATA_DIR) for f in files):
        return "shipped sample"
    shared = paths.shared_data_dir()
    if shared is not None and all(f.is_relative_to(shared) for f in files):
        return "shared data"
    return "file"


def describe_split(task: Task, split: str) -> dict:
    """A split's files, where they were found and its question count; ``error`` when it has no data
    here. A split on the Hugging Face hub is named, not downloaded."""
    candidates = task.splits[split]
    if any(c.startswith(HF_PREFIX) for c in candidates):
        return {"files": list(candidates), "where": "hub (downloaded on first use)", "questions": None}
    try:
        files = task.files(split)
        count = len(task.load(split))
    except NatRayError as err:
        return {"files": [], "where": None, "questions": None, "error": str(err)}
    return {"files": [str(f) for f in files], "where": _where(files), "questions": count}


def describe_task(task: Task) -> dict:
    return {
        "name": task.name,
        "title": task.title,
        "source": task.source,
        "family": task.family,
        "tools": list(task.tools),
        "scorer": task.scorer,
        "splits": {split: describe_split(task, split) for split in task.splits},
    }


def format_tasks(described: list[dict], data_dir_note: str | None) -> str:
    lines = []
    if data_dir_note:
        lines += [data_dir_note, ""]
    for t in described:
        lines.append(f"{t['name']}  ({t['title']}; tools: {', '.join(t['tools'])}; scorer: {t['scorer']})")
        lines.append(f"  file: {t['source']}")
        for split, s in t["splits"].items():
            if s.get("error"):
                lines.append(f"  {split:<16} no data here: {s['error'].split(';')[0]}")
            else:
                count = "?" if s["questions"] is None else f"{s['questions']:,}"
                lines.append(f"  {split:<16} {count:>7} questions  {s['where']}: {', '.join(s['files'])}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def data_dir_note() -> str:
    """Where data is looked for, and a missing ``$NAT_RAY_DATA_DIR`` named."""
    env = os.environ.get("NAT_RAY_DATA_DIR")
    shared = paths.shared_data_dir()
    if env and shared is None:
        return f"NAT_RAY_DATA_DIR={env} is not a folder: only the samples shipped with nat_ray are used"
    if shared is None:
        return "full data: none found (set NAT_RAY_DATA_DIR); the samples shipped with nat_ray are used"
    return f"full data: {shared}"


def print_tasks(
    refs: list[str] | None = None, tasks_dir: str | None = None, json_path: str | None = None
) -> int:
    """``nat-ray tasks``: the built-in tasks and any task files or ``--tasks-dir`` given."""
    logging.getLogger("nat_ray.tasks").setLevel(logging.WARNING)  # no "using the shipped data" per split
    register_tasks(refs or [], tasks_dir)
    described, note = [describe_task(task) for task in TASKS.values()], data_dir_note()
    print(format_tasks(described, note), end="", file=safe_files.tables_stream(json_path))
    if json_path:
        safe_files.write_result(json_path, {"data": note, "tasks": described})
    return 0
