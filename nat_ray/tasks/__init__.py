"""The task registry: every benchmark, its tools, its data files and its scorer, named once.

``get_task("gsm8k").load("test")`` returns :class:`Question` records; ``task.score(pred, question)``
scores a final answer in both the paper's and the robust mode.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nat_ray import paths
from nat_ray.errors import ConfigError, DataError
from nat_ray.scoring import Score, score_answer
from nat_ray.tasks.loaders import HF_PREFIX, Question, RecordFilter, download_hf, load_questions

log = logging.getLogger(__name__)

_DATA_HINT = (
    "set NAT_RAY_DATA_DIR to a folder holding the full data (the layout of shared/data, see its "
    "README.md), or pass path= to a local file or hf://datasets/<owner>/<name>/<file>"
)


def _in_nat_subset(record: dict[str, Any]) -> bool:
    # NAT's own files lack the flag: they are the subset already.
    return bool(record.get("in_nat_subset", True))


def _has_answer(record: dict[str, Any]) -> bool:
    return record.get("answer") is not None


def _not_in_nat_train(record: dict[str, Any]) -> bool:
    return record["nat_id"] is None


def _in_nat_test_not_in_nat_train(record: dict[str, Any]) -> bool:
    return record["nat_test_index"] is not None and record["nat_id"] is None


@dataclass(frozen=True)
class Task:
    """One benchmark: how to load its questions and how to score answers.

    Attributes:
        name: registry key, lower case (``"gsm8k"``, ``"asdiv"``, ``"svamp"``, ``"multiarith"``,
            ``"hotpotqa"``, ``"strategyqa"``).
        family: ``"math"``, ``"hotpotqa"`` or ``"strategyqa"``; selects the prompts and the scorer.
        tools: names in :data:`nat_ray.tools.REGISTRY` the agent may call (``finish`` is implicit).
        title: the name tables print (the paper's spelling, e.g. ``GSM8K``).
        splits: split → candidate data files relative to a data dir, best first (``"a+b"``: both, in
            order).
        filters: split → record filter applied to whatever file the split reads.
    """

    name: str
    title: str
    family: str
    tools: tuple[str, ...]
    splits: dict[str, tuple[str, ...]]
    filters: dict[str, RecordFilter] = field(default_factory=dict)

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ConfigError(
                f"task {self.name!r} has no split {split!r}; known splits: {sorted(self.splits)}"
            )

    def files(self, split: str = "test") -> tuple[Path, ...]:
        """The data files ``split`` reads on this machine, in order.

        Raises:
            ConfigError: unknown split.
            DataError: none of the candidates exists; the message names the candidates, the folders
                searched and how to get the data.
        """
        self._check_split(split)
        candidates = self.splits[split]
        for i, candidate in enumerate(candidates):
            found = [paths.find_data_file(part) for part in candidate.split("+")]
            if all(p is not None for p in found):
                resolved = tuple(p for p in found if p is not None)
                shipped = [p for p in resolved if p.is_relative_to(paths.PACKAGE_DATA_DIR)]
                if shipped:
                    log.info(
                        "%s/%s: using the data shipped with nat_ray (%s)%s",
                        self.name,
                        split,
                        ", ".join(str(p) for p in shipped),
                        f"; {candidates[0].replace('+', ' and ')} not found" if i > 0 else "",
                    )
                return resolved
        dirs = ", ".join(str(d) for d in paths.data_dirs())
        raise DataError(
            f"no data for task {self.name!r} split {split!r}: tried {', '.join(candidates)} "
            f"under {dirs}; {_DATA_HINT}"
        )

    def load(
        self, split: str = "test", path: str | Path | None = None, limit: int | None = None
    ) -> list[Question]:
        """Load a split's questions.

        Args:
            split: a key of :attr:`splits`. With ``path``, it still selects the split's record filter
                (e.g. ASDiv ``test`` keeps NAT's subset when the file has ``in_nat_subset``).
            path: read this file instead of the split's: a local path (a relative one that does not
                exist is also looked up in the data dirs) or ``hf://datasets/<owner>/<name>/<file>``.
            limit: keep the first ``limit`` questions in file order (None: all).

        Raises:
            ConfigError: unknown split or negative limit.
            DataError: missing or malformed file (message ``path:line: ...``).
        """
        self._check_split(split)
        if path is None:
            files = self.files(split)
        elif str(path).startswith(HF_PREFIX):
            files = (download_hf(str(path)),)
        else:
            local = Path(path).expanduser()
            if not local.is_file() and not local.is_absolute():
                local = paths.find_data_file(str(path)) or local
            if not local.is_file():
                raise DataError(f"{path}: no such file; {_DATA_HINT}")
            files = (local,)
        log.debug("%s/%s: reading %s", self.name, split, ", ".join(str(f) for f in files))
        return load_questions(
            files, task=self.name, family=self.family, keep=self.filters.get(split), limit=limit
        )

    def score(self, pred: str | None, gold: Question | str | bool) -> Score:
        """Score a final answer (the raw ``finish[...]`` argument; None if the episode never finished).

        ``gold`` may be the :class:`Question` itself: then its ``meta["raw_gold"]`` (the answer as
        written in the file) is scored when it is a string, so paper mode sees exactly what NAT saw.
        """
        if isinstance(gold, Question):
            raw = gold.meta.get("raw_gold")
            gold = raw if isinstance(raw, str) and self.family == "math" else gold.gold
        return score_answer(self.family, pred, gold)


_MATH_TOOLS = ("calculate",)
_QA_TOOLS = ("search",)
_NAT = "nat/data/dataset"
_SQA_ALL = "strategyqa/train.jsonl.gz+strategyqa/dev.jsonl"
_SQA_ALL_SHIPPED = "strategyqa/train_sample.jsonl+strategyqa/dev.jsonl"

# In the paper's column order (Table 2: GSM8K, ASDiv, SVAMP, MultiArith; then HotpotQA, StrategyQA):
# tables list tasks in this order.
TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            name="gsm8k",
            title="GSM8K",
            family="math",
            tools=_MATH_TOOLS,
            splits={
                "test": ("gsm8k/test.jsonl", "gsm8k/test_sample.jsonl"),
                "train": ("gsm8k/train.jsonl.gz", "gsm8k/train_sample.jsonl"),
                "nat_test": (f"{_NAT}/gsm8k/test.json",),
            },
        ),
        Task(
            name="asdiv",
            title="ASDiv",
            family="math",
            tools=_MATH_TOOLS,
            splits={
                "test": ("asdiv/test.jsonl.gz",),
                "all": ("asdiv/test.jsonl.gz",),
                "nat_test": (f"{_NAT}/ASDiv/test_one_answer.jsonl",),
            },
            filters={"test": _in_nat_subset, "all": _has_answer},
        ),
        Task(
            name="svamp",
            title="SVAMP",
            family="math",
            tools=_MATH_TOOLS,
            splits={
                "test": ("svamp/test.jsonl", "svamp/test_sample.jsonl"),
                "nat_test": (f"{_NAT}/SVAMP/test.jsonl",),
            },
        ),
        Task(
            name="multiarith",
            title="MultiArith",
            family="math",
            tools=_MATH_TOOLS,
            splits={
                "test": ("multiarith/test.jsonl",),
                "all": ("multiarith/test.jsonl",),
                "nat_test": (f"{_NAT}/MultiArith/test.jsonl",),
            },
            filters={"test": _in_nat_subset},
        ),
        Task(
            name="hotpotqa",
            title="HotpotQA",
            family="hotpotqa",
            tools=_QA_TOOLS,
            splits={
                "test": ("hotpotqa/nat_dev500.jsonl", "hotpotqa/dev_sample.jsonl"),
                "nat_dev500": ("hotpotqa/nat_dev500.jsonl", f"{_NAT}/hotpotqa/dev_random_500.json"),
                "dev": ("hotpotqa/dev_distractor_1100.jsonl.gz", "hotpotqa/dev_sample.jsonl"),
                "train": ("hotpotqa/nat_train8000.jsonl.gz", f"{_NAT}/hotpotqa/train_random_8000.json.gz"),
            },
        ),
        Task(
            name="strategyqa",
            title="StrategyQA",
            family="strategyqa",
            tools=_QA_TOOLS,
            splits={
                "test": (f"{_NAT}/strategyqa/test_random_500.jsonl", "strategyqa/dev.jsonl"),
                "train": ("strategyqa/train.jsonl.gz", "strategyqa/train_sample.jsonl"),
                "dev": ("strategyqa/dev.jsonl",),
                "nat_train": (f"{_NAT}/strategyqa/train.jsonl",),
                "nat_test": (f"{_NAT}/strategyqa/test_random_500.jsonl",),
                "clean_test": (_SQA_ALL, _SQA_ALL_SHIPPED),
                "nat_test_clean": (_SQA_ALL, _SQA_ALL_SHIPPED),
            },
            filters={"clean_test": _not_in_nat_train, "nat_test_clean": _in_nat_test_not_in_nat_train},
        ),
    )
}


def get_task(name: str) -> Task:
    """The registered task called ``name``, case-insensitively (``"GSM8K"``, ``"StrategyQA"``).

    Raises:
        ConfigError: unknown name; the message lists the known ones.
    """
    task = TASKS.get(name.lower())
    if task is None:
        raise ConfigError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return task


__all__ = ["TASKS", "Question", "Task", "get_task"]
