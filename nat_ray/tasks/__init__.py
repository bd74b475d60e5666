"""The task registry: every task, its tools, its data files and its scorer, named once.

``get_task("gsm8k").load("test")`` returns :class:`Question` records; ``task.score(pred, question)``
scores a final answer in both the paper's and the robust mode. Every task is a task file
(:mod:`nat_ray.tasks.task_file`): the six built-in ones ship in ``nat_ray/tasks/builtin`` and are
registered at import, in the paper's column order (Table 2: GSM8K, ASDiv, SVAMP, MultiArith; then
HotpotQA, StrategyQA), which tables follow. A user's task file is registered by its ``name`` when
:func:`get_task` is given its path, or with every file of a folder by :func:`register_tasks_dir`
(``tasks_dir`` in the config).

Data files are looked up by relative path in :func:`nat_ray.paths.data_dirs`: the full shared data
(``$NAT_RAY_DATA_DIR`` or a ``shared/data`` folder) first, then the small samples shipped in
``nat_ray/data``. Each split lists candidate files best first: the full file, then, where one may be
shipped, the sample; falling back to a sample is logged at INFO. A candidate ``"a+b"`` means the files
``a`` and ``b`` read one after the other (both must exist).

Splits (sizes with the full data; the shipped fallback in brackets):

``gsm8k``
    ``test``: ``gsm8k/test.jsonl``, 1,319 [``gsm8k/test_sample.jsonl``, first 100].
    ``train``: ``gsm8k/train.jsonl.gz``, 7,473 [``gsm8k/train_sample.jsonl``, first 300].
    ``nat_test``: NAT's verbatim ``nat/data/dataset/gsm8k/test.json`` (same 1,319, ids = index,
    gold = full rationale).
``svamp``
    ``test``: ``svamp/test.jsonl``, 1,000 [``svamp/test_sample.jsonl``, first 100].
    ``nat_test``: NAT's ``nat/data/dataset/SVAMP/test.jsonl`` (ids = index, gold ``#### N``).
``asdiv``
    ``test``: the 2,023 problems of ``asdiv/test.jsonl.gz`` that NAT evaluates (``in_nat_subset``).
    ``all``: the 2,084 problems with a single numeric answer. ``nat_test``: NAT's
    ``nat/data/dataset/ASDiv/test_one_answer.jsonl``. ASDiv is CC BY-NC 4.0, so nothing is shipped.
``multiarith``
    ``test``: the 596 problems of ``multiarith/test.jsonl`` NAT evaluates (``in_nat_subset``);
    ``all``: all 600. ``nat_test``: NAT's ``nat/data/dataset/MultiArith/test.jsonl``. Not shipped
    (no stated license).
``hotpotqa``
    ``nat_dev500``: NAT's 500 evaluation questions, the paper's eval set (``hotpotqa/nat_dev500.jsonl``,
    else NAT's ``dev_random_500.json``); only 63 have paragraphs in the offline search corpus.
    ``test``: alias of ``nat_dev500`` [``hotpotqa/dev_sample.jsonl``: 60 dev questions whose
    paragraphs are in the shipped corpus sample]. ``dev``: 1,100 dev-distractor questions with their
    contexts (``hotpotqa/dev_distractor_1100.jsonl.gz``) [``hotpotqa/dev_sample.jsonl``].
    ``train``: NAT's 8,000 training questions (``hotpotqa/nat_train8000.jsonl.gz``, else NAT's
    ``train_random_8000.json.gz``); no fallback (the selection is NAT's, which has no license).
``strategyqa``
    ``train``: ``strategyqa/train.jsonl.gz``, 2,061 (90% of the official train set)
    [``strategyqa/train_sample.jsonl``, first 300]. ``dev``: ``strategyqa/dev.jsonl``, 229 (shipped in
    full). ``nat_train``: NAT's 1,290 training questions (``nat/data/dataset/strategyqa/train.jsonl``).
    ``nat_test``: NAT's 500 test questions (``.../test_random_500.jsonl``; 291 of them are also in
    ``nat_train``). ``test``: ``nat_test`` when present, else ``dev`` (133 of dev are in NAT's train).
    ``clean_test``: the 999 labelled questions (train + dev) not in NAT's training questions
    (``nat_id`` null). ``nat_test_clean``: the 209 of NAT's test questions that are not in NAT's
    training questions, for a leakage-free comparison with the paper.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from nat_ray.errors import ConfigError
from nat_ray.tasks.loaders import Question
from nat_ray.tasks.task_file import (
    BUILTIN_DIR,
    TASK_SUFFIXES,
    Task,
    file_hash,
    is_task_path,
    load_task_file,
)

log = logging.getLogger(__name__)

# In the paper's column order (Table 2: GSM8K, ASDiv, SVAMP, MultiArith; then HotpotQA, StrategyQA):
# tables list tasks in this order.
BUILTIN_NAMES: tuple[str, ...] = ("gsm8k", "asdiv", "svamp", "multiarith", "hotpotqa", "strategyqa")

TASKS: dict[str, Task] = {
    t.name: t for t in (load_task_file(BUILTIN_DIR / f"{n}.yaml") for n in BUILTIN_NAMES)
}


def register_task(task: Task) -> Task:
    """Add a loaded task to :data:`TASKS` under its name (the same file loaded again replaces it).

    Raises:
        ConfigError: another task file already registered that name.
    """
    existing = TASKS.get(task.name)
    if existing is not None and existing.source != task.source:
        raise ConfigError(
            f"{task.source}: the task name {task.name!r} is already taken by {existing.source}; "
            "give this task another name"
        )
    TASKS[task.name] = task
    return task


def register_task_file(path: str | Path) -> Task:
    """Load a task file and register it; a file already registered and unchanged is not read again.

    Raises:
        ConfigError: a bad task file (every problem at once) or a name already taken.
    """
    resolved = Path(path).expanduser().resolve()
    for task in TASKS.values():
        if task.source == str(resolved) and resolved.is_file() and task.source_hash == file_hash(resolved):
            return task
    return register_task(load_task_file(resolved))


def get_task(name_or_path: str | Path) -> Task:
    """The task called ``name_or_path`` (case-insensitively), or the task file at that path.

    A reference ending in ``.yaml``/``.yml`` is a path; otherwise a registered name wins over a file
    of the same name. A path is loaded, checked and registered under the file's ``name``.

    Raises:
        ConfigError: unknown name (the message lists the known ones), or a bad task file.
    """
    text = str(name_or_path)
    if not text.lower().endswith(TASK_SUFFIXES):
        task = TASKS.get(text.lower())
        if task is not None:
            return task
    if is_task_path(text):
        return register_task_file(text)
    raise ConfigError(
        f"unknown task {text!r}; known tasks: {sorted(TASKS)}, or give the path of a task file (.yaml)"
    )


def registered_task(name: str) -> Task:
    """The registered task called ``name`` (case-insensitively), never reading a file.

    For names that come from outside (a request to the server): a path is just an unknown name.

    Raises:
        ConfigError: no task of that name is registered.
    """
    task = TASKS.get(str(name).lower())
    if task is None:
        raise ConfigError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return task


def register_tasks_dir(folder: str | Path) -> list[Task]:
    """Register every task file (``*.yaml``, ``*.yml``) of a folder, in name order.

    Raises:
        ConfigError: no such folder, no task files in it, or bad task files (all of their problems,
            one file per line).
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(f"tasks_dir: {folder} is not a folder")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in TASK_SUFFIXES and p.is_file())
    if not files:
        raise ConfigError(f"tasks_dir: {folder} holds no task files (*.yaml)")
    tasks, errors = [], []
    for file in files:
        try:
            tasks.append(register_task_file(file))
        except ConfigError as err:
            errors.append(str(err))
    if errors:
        raise ConfigError(
            "bad task files in tasks_dir:\n  " + "\n  ".join(e.replace("\n", "\n  ") for e in errors)
        )
    return tasks


def register_tasks(refs: Iterable[str], tasks_dir: str | None = None) -> list[Task]:
    """Register ``tasks_dir`` (when set), then resolve each name or task-file path in ``refs``.

    What a stage calls first, before Ray or an engine starts (and each worker process again, with the
    same arguments, so the names its work items carry are known there).

    Raises:
        ConfigError: every bad task file and unknown name, in one error.
    """
    problems = []
    if tasks_dir is not None:
        try:
            register_tasks_dir(tasks_dir)
        except ConfigError as err:
            problems.append(str(err))
    tasks = []
    for ref in refs:
        try:
            tasks.append(get_task(ref))
        except ConfigError as err:
            problems.append(str(err))
    if problems:
        raise ConfigError("\n".join(dict.fromkeys(problems)))
    return tasks


__all__ = [
    "BUILTIN_NAMES",
    "TASKS",
    "Question",
    "Task",
    "get_task",
    "is_task_path",
    "load_task_file",
    "register_task",
    "register_task_file",
    "register_tasks",
    "register_tasks_dir",
    "registered_task",
]
