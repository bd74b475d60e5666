"""Task files: one YAML file defines one task; the six built-in tasks are task files too.

A user's task file (relative paths are relative to the file)::

    name: unit_convert                       # how rows, tables and the CLI call it
    title: Unit conversion                   # optional: what tables print (default: the name)
    data:                                    # split -> one file: JSONL, JSON, CSV, Parquet (.gz too),
      train: data/train.jsonl                #   or hf://datasets/<owner>/<name>[@revision]/<file>
      test: data/test.csv
    fields: {question: prompt, answer: target, id: qid}   # optional column names
    scorer: ./check.py:same_number           # math | exact_match | f1 | yes_no | FILE.py:fn | module:fn
    tools: [calculate, ./units.py:convert]   # optional: built-in names, FILE.py:fn, module:fn, entry points
    instruction: |                           # the instruction turn, verbatim
      Convert units. Use convert[VALUE UNIT to UNIT], then finish[NUMBER].
    demonstrations: demos.txt                # optional: the one-shot worked example (format below)
    markers:                                 # optional: NAT's question turns (default: the paper's QA ones)
      correct: Convert it **correctly**.
      incorrect: But **incorrectly** convert it.
    capture: false                           # optional: keep its served episodes off disk (serve.capture)
    judge: {endpoint: "http://host:8000/v1", model: base, rubric: ...}  # optional: grades served answers

Required: ``name``, ``data``, ``scorer``, ``instruction``. :func:`load_task_file` checks everything
at once -- unknown and missing keys, wrong types, data files that do not exist or lack the question
and answer columns, a scorer or tool that cannot be imported or has the wrong signature, a malformed
demonstration -- and raises one :class:`~nat_ray.errors.ConfigError` naming the file and every problem.

**Scorer.** ``math`` (numbers, the paper's and the robust rule), ``exact_match`` (SQuAD-normalised
strings), ``f1`` (HotpotQA: exact match plus token F1), ``yes_no`` (StrategyQA), or a plug-in called
``fn(prediction, gold)``: ``prediction`` is the ``finish[...]`` argument (``None`` when the episode
never finished), ``gold`` the record's answer as text. It returns a bool (correct or not) or a float
in [0, 1], an F1-like partial credit: correct means >= 1.0, and the float is the row's ``f1`` (so the
NAT-k variants, which grade by F1, need a float scorer). A plug-in that raises or returns anything
else scores 0 (wrong, F1 0.0) and the reason is logged once per distinct message. Served episodes
without gold are graded by ``judge`` (:mod:`nat_ray.tasks.served`) when a loop learns from traffic.

**Prompt.** The instruction turn is ``instruction`` verbatim: nothing is added, so it should name every
action the model may take, ``finish[answer]`` included. Then the acknowledgement, the demonstration
(with ``agent.shots: 1``; a task without one needs ``agent.shots: 0``) and the question turn. A marker
is a question turn with ``{question}``, or text without it that is appended to
``"Question: {question}. "`` (see :mod:`nat_ray.core.prompts`).

**Demonstrations file.** Plain text, one worked example, in the transcript's own words::

    Question: How many metres are 2.5 km?
    Thought: I convert kilometres to metres.
    Action: convert[2.5 km to m]
    Observation: 2500 m
    Thought: 2.5 km are 2500 metres.
    Action: finish[2500]

A ``Question:`` block comes first; then each model turn is a ``Thought:`` (optional) and one
``Action: name[argument]`` line, followed by the tool's ``Observation:``, except after the last action,
which must be ``finish[...]``. A line that starts with none of these keywords continues the block
above it; blank lines and lines starting with ``#`` are ignored. Actions must use the task's tools.

**Built-in task files** (``nat_ray/tasks/builtin``) may also set ``family`` (``math``, ``hotpotqa``,
``strategyqa``: the paper's instruction, templates and demonstration), ``shared_data`` (split -> the
candidate files looked up in the data folders, best first; ``"a+b"`` reads both) and ``filters``
(split -> a named record filter of :data:`FILTERS`); they have no ``data`` or ``instruction``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import logging
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from nat_ray import paths
from nat_ray.core import prompts
from nat_ray.core.scoring import Score, exact_match, gold_text, score_answer
from nat_ray.errors import ConfigError, DataError
from nat_ray.tasks.demonstrations import parse_demonstration
from nat_ray.tasks.loaders import (
    FIELD_KEYS,
    HF_PREFIX,
    Question,
    RecordFilter,
    download_hf,
    load_questions,
    read_records,
    record_to_question,
    rename_fields,
)
from nat_ray.tasks.served import JudgeSpec, served_settings

log = logging.getLogger(__name__)
_WARNED_NO_DEMO: set[str] = set()  # tasks already warned about asking for a shot they cannot give

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
TASK_SUFFIXES = (".yaml", ".yml")
DATA_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".csv", ".csv.gz", ".parquet")

_DATA_HINT = (
    "set NAT_RAY_DATA_DIR to a folder holding the full data (the layout of shared/data, see its "
    "README.md), or pass path= to a local file or hf://datasets/<owner>/<name>/<file>"
)

# Built-in scorer name -> the scoring family it runs, which also normalises the golds.
BUILTIN_SCORERS: dict[str, str] = {
    "math": "math",
    "f1": "hotpotqa",
    "yes_no": "strategyqa",
    "exact_match": "hotpotqa",
}

USER_KEYS = frozenset(
    (
        "name",
        "title",
        "data",
        "fields",
        "scorer",
        "tools",
        "mcp_servers",
        "instruction",
        "demonstrations",
        "markers",
        "capture",
        "judge",
    )
)
REQUIRED_USER_KEYS = ("name", "data", "scorer", "instruction")
BUILTIN_KEYS = frozenset(("name", "title", "family", "shared_data", "filters", "scorer", "tools"))
REQUIRED_BUILTIN_KEYS = ("name", "title", "family", "shared_data", "scorer", "tools")

_NAME_RE = re.compile(r"[a-z][a-z0-9_-]*")


# --------------------------------------------------------------------------------------------
# Named record filters of the built-in tasks


def _in_nat_subset(record: dict[str, Any]) -> bool:
    # NAT's own files lack the flag: they are the subset already.
    return bool(record.get("in_nat_subset", True))


def _has_answer(record: dict[str, Any]) -> bool:
    return record.get("answer") is not None


def _not_in_nat_train(record: dict[str, Any]) -> bool:
    return record["nat_id"] is None


def _in_nat_test_not_in_nat_train(record: dict[str, Any]) -> bool:
    return record["nat_test_index"] is not None and record["nat_id"] is None


FILTERS: dict[str, RecordFilter] = {
    "in_nat_subset": _in_nat_subset,
    "has_answer": _has_answer,
    "not_in_nat_train": _not_in_nat_train,
    "in_nat_test_not_in_nat_train": _in_nat_test_not_in_nat_train,
}


# --------------------------------------------------------------------------------------------
# The task


@dataclass(frozen=True)
class Task:
    """One task: how to load its questions, prompt the agent and score answers.

    Attributes:
        name: registry key, lower case (``"gsm8k"`` ... or a task file's ``name``).
        title: the name tables print (the paper's spelling, e.g. ``GSM8K``).
        family: ``"math"``, ``"hotpotqa"`` or ``"strategyqa"`` (built-in: the paper's prompts), or
            ``"custom"`` (a user's task: its own instruction, demonstration and markers).
        tools: the tool names the agent may call in ``Action:`` (``finish`` is implicit).
        splits: split -> candidate data files, best first. Relative ones are looked up in the data
            folders (``"a+b"``: both, in order); absolute ones and ``hf://`` URLs are read as they are.
        filters: split -> record filter applied to whatever file the split reads.
        scorer: a :data:`BUILTIN_SCORERS` name or the plug-in's spec (``/abs/check.py:fn``).
        fields: canonical record field -> the data's column (only the renamed ones).
        tool_specs: the task's normalised tool specs (for ``ToolsConfig.plugins``).
        source: the task file's absolute path.
        source_hash: sha256 of the task file's bytes, first 16 hex digits (lineage).
        instruction: custom tasks: the instruction turn.
        demo: custom tasks: the one-shot demonstration, if any.
        markers: custom tasks: the NAT question turns.
        score_fn: a plug-in scorer (``None`` for the built-in ones).
        capture: whether ``serve.capture`` writes its served episodes (``capture: false``: never).
        judge: who grades its served episodes that carry no gold (``None``: nobody).
    """

    name: str
    title: str
    family: str
    tools: tuple[str, ...]
    splits: dict[str, tuple[str, ...]]
    filters: dict[str, RecordFilter] = field(default_factory=dict)
    scorer: str = "exact_match"
    fields: dict[str, str] = field(default_factory=dict)
    tool_specs: tuple[str, ...] = ()
    source: str | None = None
    source_hash: str = ""
    instruction: str | None = None
    demo: prompts.Demo | None = None
    markers: prompts.Markers | None = None
    score_fn: Callable[[str | None, Any], Any] | None = field(default=None, compare=False, repr=False)
    capture: bool = True
    judge: JudgeSpec | None = None

    @property
    def gold_family(self) -> str:
        """How golds are normalised: ``math`` (number string), ``strategyqa`` (bool), else a string."""
        return BUILTIN_SCORERS.get(self.scorer, "hotpotqa")

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
            if candidate.startswith(HF_PREFIX):
                return (download_hf(candidate),)
            if Path(candidate).is_absolute():
                if Path(candidate).is_file():
                    return (Path(candidate),)
                continue
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
        if all(Path(c).is_absolute() for c in candidates):
            raise DataError(
                f"no data for task {self.name!r} split {split!r}: {', '.join(candidates)} does not exist "
                f"(named in {self.source})"
            )
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
            files,
            task=self.name,
            family=self.gold_family,
            keep=self.filters.get(split),
            limit=limit,
            fields=self.fields or None,
        )

    def scoring_gold(self, question: Question) -> str:
        """The gold answer this task's scorer is given for ``question``, as text.

        For the math scorer, the answer as written in the file (``meta["raw_gold"]``) when it is a
        string, so paper mode sees exactly what NAT saw; else the normalised gold (a StrategyQA bool
        as ``yes``/``no``). Rollout and evaluation both plan with it (:mod:`nat_ray.tasks.episodes`).
        """
        raw = question.meta.get("raw_gold")
        return gold_text(raw if isinstance(raw, str) and self.scorer == "math" else question.gold)

    def score(self, pred: str | None, gold: Question | str | bool) -> Score:
        """Score a final answer (the raw ``finish[...]`` argument; None if the episode never finished).

        ``gold`` may be the :class:`Question` itself: then :meth:`scoring_gold` picks what is scored.
        A plug-in scorer that fails scores 0 (see the module docstring); it never raises.
        """
        if isinstance(gold, Question):
            gold = self.scoring_gold(gold)
        if self.score_fn is not None:
            return _plugin_score(self.scorer, self.score_fn, pred, gold)
        if self.scorer == "exact_match":
            em = pred is not None and exact_match(pred, str(gold))
            return Score(correct_paper=em, correct_robust=em, em=em)
        return score_answer(BUILTIN_SCORERS[self.scorer], pred, gold)

    def build_messages(
        self,
        question: str,
        template: str = prompts.INFERENCE_DEFAULT,
        klass: str | None = None,
        shots: int = 0,
    ) -> list[prompts.Message]:
        """The prompt turns of one episode of this task (see :func:`nat_ray.core.prompts.build_messages`).

        A task without a demonstration is asked with 0 shots when 1 is asked for (the default
        ``agent.shots``), with one warning per task.

        Raises:
            ConfigError: unknown template or class.
        """
        if self.family != prompts.CUSTOM:
            return prompts.build_messages(self.family, question, template, klass, shots)
        if shots and self.demo is None:
            if self.name not in _WARNED_NO_DEMO:
                _WARNED_NO_DEMO.add(self.name)
                log.warning(
                    "task %s has no demonstration: asked with 0 shots (agent.shots=1 needs a "
                    "`demonstrations` file in %s)",
                    self.name,
                    self.source,
                )
            shots = 0
        return prompts.build_messages(
            prompts.CUSTOM,
            question,
            template,
            klass,
            shots,
            instruction=self.instruction,
            demo=self.demo,
            markers=self.markers,
        )

    def lineage(self, tool_versions: Mapping[str, str]) -> dict[str, Any]:
        """The lineage fields of this task's trajectory rows (``records.episode_row(ep, **...)``).

        Args:
            tool_versions: tool name -> version of this process's tools (``nat_ray.tools.TOOL_VERSIONS``);
                only this task's tools are kept, a missing one as ``"unknown"``.
        """
        return {
            "task_source": self.source,
            "task_hash": self.source_hash,
            "tool_versions": {name: str(tool_versions.get(name, "unknown")) for name in self.tools},
        }


_reported_failures: set[str] = set()


def _plugin_score(spec: str, fn: Callable, pred: str | None, gold: Any) -> Score:
    """Call a plug-in scorer; any failure scores 0 and is logged once per distinct message."""
    try:
        value = fn(pred, gold)
    except Exception as err:  # noqa: BLE001 - a plug-in's bug must not end a run: it scores 0
        reason = f"raised {type(err).__name__}: {err}"
    else:
        if isinstance(value, bool):
            return Score(correct_paper=value, correct_robust=value)
        if isinstance(value, int | float) and 0.0 <= float(value) <= 1.0:  # also rejects NaN
            correct = float(value) >= 1.0
            return Score(correct_paper=correct, correct_robust=correct, f1=float(value))
        shown = repr(value)
        reason = (
            f"returned {shown[:80]}{'...' if len(shown) > 80 else ''}; expected a bool or a float in [0, 1]"
        )
    message = f"scorer {spec} {reason}; the answer scores 0"
    if message not in _reported_failures:
        if len(_reported_failures) < 1000:  # bounded: a scorer failing with ever new messages
            _reported_failures.add(message)
        log.warning("%s (logged once)", message)
    return Score(correct_paper=False, correct_robust=False, f1=0.0)


# --------------------------------------------------------------------------------------------
# Loading


def is_task_path(text: str) -> bool:
    """Whether a task reference names a task file: it ends with ``.yaml``/``.yml`` or is an existing file."""
    return str(text).lower().endswith(TASK_SUFFIXES) or Path(str(text)).expanduser().is_file()


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes, first 16 hex digits."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def load_task_file(path: str | Path) -> Task:
    """Read, check and build one task file.

    Args:
        path: the YAML file; relative paths inside it are relative to its folder.

    Returns:
        The task (not registered: see :func:`nat_ray.tasks.get_task`).

    Raises:
        ConfigError: ``"<path>: problem 1; problem 2; ..."`` with every problem found.
    """
    path = Path(path).expanduser().resolve()
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the task file: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a task file holds a mapping of keys (name, data, ...), got {type(data).__name__}"
        )
    builtin = path.parent == BUILTIN_DIR
    problems: list[str] = []
    task = _build_task(data, path, builtin, problems)
    if problems:
        # One problem a line: a task file can have several, all reported at once.
        raise ConfigError(
            f"{path}: " + problems[0] if len(problems) == 1 else f"{path}:\n  " + "\n  ".join(problems)
        )
    return _with_source(task, str(path), hashlib.sha256(raw).hexdigest()[:16])


def _with_source(task: Task, source: str, digest: str) -> Task:
    return replace(task, source=source, source_hash=digest)


def _build_task(data: dict, path: Path, builtin: bool, problems: list[str]) -> Task | None:
    base = path.parent
    allowed, required = (BUILTIN_KEYS, REQUIRED_BUILTIN_KEYS) if builtin else (USER_KEYS, REQUIRED_USER_KEYS)
    for key in data:
        if key not in allowed:
            hint = " (only built-in task files set it)" if key in BUILTIN_KEYS else ""
            problems.append(f"unknown key {key!r}{hint}; known keys: {sorted(allowed)}")
    for key in required:
        if key not in data:
            problems.append(f"missing key {key!r}")

    name = data.get("name")
    if "name" in data and not (isinstance(name, str) and _NAME_RE.fullmatch(name)):
        problems.append(
            f"name must be lower-case letters, digits, '_' or '-', starting with a letter, got {name!r}"
        )
    capture, judge = served_settings(data, problems)
    title = data.get("title", name)
    if "title" in data and not (isinstance(title, str) and title.strip()):
        problems.append(f"title must be a non-empty string, got {title!r}")

    fields = _check_fields(data.get("fields", {}), problems)
    scorer, score_fn = _check_scorer(data.get("scorer"), base, problems) if "scorer" in data else ("", None)
    servers = _check_mcp_servers(data.get("mcp_servers", {}), problems)
    tool_specs, tool_names = _check_tools(data.get("tools", []), base, builtin, problems, servers)

    if builtin:
        family = data.get("family")
        if family not in prompts.FAMILIES:
            problems.append(f"family must be one of {list(prompts.FAMILIES)}, got {family!r}")
        splits = _check_shared_data(data.get("shared_data"), problems)
        filters = _check_filters(data.get("filters", {}), splits, problems)
        instruction, demo, markers = None, None, None
    else:
        family = prompts.CUSTOM
        gold_family = BUILTIN_SCORERS.get(scorer, "hotpotqa")
        splits = (
            _check_data(data.get("data"), base, fields, gold_family, name, problems) if "data" in data else {}
        )
        filters = {}
        instruction = data.get("instruction")
        if "instruction" in data and not (isinstance(instruction, str) and instruction.strip()):
            problems.append(f"instruction must be a non-empty string, got {instruction!r}")
        demo = (
            _check_demonstrations(data["demonstrations"], base, tool_names, problems)
            if "demonstrations" in data
            else None
        )
        markers = _check_markers(data["markers"], problems) if "markers" in data else None
    if problems:
        return None
    return Task(
        name=name,
        title=title,
        family=family,
        tools=tool_names,
        splits=splits,
        filters=filters,
        scorer=scorer,
        fields=fields,
        tool_specs=tool_specs,
        instruction=instruction,
        demo=demo,
        markers=markers,
        score_fn=score_fn,
        capture=capture,
        judge=judge,
    )


def _check_fields(fields: Any, problems: list[str]) -> dict[str, str]:
    if not isinstance(fields, dict):
        problems.append(f"fields must map {list(FIELD_KEYS)} to column names, got {fields!r}")
        return {}
    out = {}
    for key, column in fields.items():
        if key not in FIELD_KEYS:
            problems.append(f"fields: unknown field {key!r}; known fields: {list(FIELD_KEYS)}")
        elif not isinstance(column, str) or not column:
            problems.append(f"fields.{key} must be a column name, got {column!r}")
        elif column != key:
            out[key] = column
    return out


def _resolve_file(spec_path: str, base: Path) -> Path:
    path = Path(spec_path).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _check_data(
    data: Any, base: Path, fields: dict[str, str], gold_family: str, name: Any, problems: list[str]
) -> dict[str, tuple[str, ...]]:
    if not isinstance(data, dict) or not data:
        problems.append(
            f"data must map split names to files (e.g. {{train: data/train.jsonl}}), got {data!r}"
        )
        return {}
    splits: dict[str, tuple[str, ...]] = {}
    for split, file in data.items():
        if not isinstance(split, str) or not isinstance(file, str) or not file:
            problems.append(f"data: split {split!r} must name one file, got {file!r}")
            continue
        if file.startswith(HF_PREFIX):
            splits[split] = (file,)  # fetched when the split is loaded; not checked offline
            continue
        path = _resolve_file(file, base)
        splits[split] = (str(path),)
        if not path.name.lower().endswith(DATA_SUFFIXES):
            problems.append(f"data.{split}: {file} is not a supported format ({', '.join(DATA_SUFFIXES)})")
        elif not path.is_file():
            problems.append(f"data.{split}: {path} does not exist")
        else:
            _check_first_record(split, path, fields, gold_family, name, problems)
    return splits


def _check_first_record(
    split: str, path: Path, fields: dict[str, str], gold_family: str, name: Any, problems: list[str]
) -> None:
    # Reading one record catches a wrong column name or format now, not hours into a run.

    try:
        for position, (where, record) in enumerate(read_records(path)):
            record = rename_fields(record, fields, where) if fields else record
            record_to_question(record, task=str(name), family=gold_family, where=where, position=position)
            return
        problems.append(f"data.{split}: {path} holds no records")
    except DataError as err:
        problems.append(f"data.{split}: {err}")


def _check_shared_data(shared: Any, problems: list[str]) -> dict[str, tuple[str, ...]]:
    if not isinstance(shared, dict) or not shared:
        problems.append(f"shared_data must map split names to lists of candidate files, got {shared!r}")
        return {}
    splits = {}
    for split, candidates in shared.items():
        if (
            not isinstance(candidates, list)
            or not candidates
            or not all(isinstance(c, str) for c in candidates)
        ):
            problems.append(f"shared_data.{split} must be a non-empty list of file names, got {candidates!r}")
            continue
        splits[split] = tuple(candidates)
    return splits


def _check_filters(filters: Any, splits: dict, problems: list[str]) -> dict[str, RecordFilter]:
    if not isinstance(filters, dict):
        problems.append(f"filters must map split names to filter names, got {filters!r}")
        return {}
    out = {}
    for split, name in filters.items():
        if split not in splits:
            problems.append(f"filters.{split}: no such split in shared_data")
        elif name not in FILTERS:
            problems.append(f"filters.{split}: unknown filter {name!r}; known filters: {sorted(FILTERS)}")
        else:
            out[split] = FILTERS[name]
    return out


def import_callable(spec: str, base: Path | None) -> Callable:
    """Import ``FILE.py:name`` (relative to ``base``) or ``module:name``.

    Raises:
        ConfigError: a bad spec, a missing file, an import error or a missing attribute.
    """
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr.isidentifier():
        raise ConfigError(f"{spec!r} is not FILE.py:function or module:function")
    if target.endswith(".py"):
        path = _resolve_file(target, base or Path.cwd())
        if not path.is_file():
            raise ConfigError(f"{spec}: {path} does not exist")
        module = _import_file(path)
    else:
        try:
            module = importlib.import_module(target)
        except Exception as err:  # noqa: BLE001 - any import-time failure of the user's module
            raise ConfigError(f"{spec}: cannot import {target}: {type(err).__name__}: {err}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{spec}: {target} has no attribute {attr!r}") from None


def _import_file(path: Path):
    """Import a Python file once per process and content (a module named after the file and a hash)."""
    # Named by path and content: an edited file (a notebook re-registering its task) is imported anew.
    stem = re.sub(r"\W", "_", path.stem)
    key = hashlib.sha256(str(path).encode() + b"\0" + path.read_bytes()).hexdigest()[:12]
    name = f"nat_ray_plugin_{stem}_{key}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path}: cannot import (not a Python file?)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - any import-time failure of the user's file
        del sys.modules[name]
        raise ConfigError(f"cannot import {path}: {type(err).__name__}: {err}") from None
    return module


def _check_scorer(scorer: Any, base: Path, problems: list[str]) -> tuple[str, Callable | None]:
    if not isinstance(scorer, str) or not scorer:
        problems.append(
            f"scorer must be one of {sorted(BUILTIN_SCORERS)} or FILE.py:function, got {scorer!r}"
        )
        return "", None
    if scorer in BUILTIN_SCORERS:
        return scorer, None
    if ":" not in scorer:
        problems.append(
            f"scorer {scorer!r} is not a built-in scorer ({', '.join(sorted(BUILTIN_SCORERS))}) "
            "nor FILE.py:function or module:function"
        )
        return "", None
    try:
        fn = import_callable(scorer, base)
    except ConfigError as err:
        problems.append(f"scorer {err}")
        return "", None
    if inspect.isclass(fn) or not callable(fn):
        problems.append(f"scorer {scorer}: must be a function (prediction, gold) -> bool | float")
        return "", None
    try:
        inspect.signature(fn).bind("prediction", "gold")
    except TypeError:
        problems.append(
            f"scorer {scorer}: must take (prediction, gold), but its signature is {inspect.signature(fn)}"
        )
        return "", None
    except ValueError:  # a builtin without a signature: let it be
        pass
    target, _, attr = scorer.rpartition(":")
    normalised = f"{_resolve_file(target, base)}:{attr}" if target.endswith(".py") else scorer
    return normalised, fn


def _check_mcp_servers(servers: Any, problems: list[str]) -> dict[str, dict]:
    """A task file's ``mcp_servers`` (name -> ``{command: [...], env?}`` or ``{url}``), checked in form."""
    from nat_ray.tools.mcp import server_problem

    if not isinstance(servers, dict):
        problems.append(
            f"mcp_servers must map server names to {{command: [...]}} or {{url: ...}}, got {servers!r}"
        )
        return {}
    found = {}
    for name, definition in servers.items():
        problem = (
            None if isinstance(name, str) and _NAME_RE.fullmatch(name) else f"mcp_servers: bad name {name!r}"
        )
        problem = problem or server_problem(name, definition)
        if problem:
            problems.append(problem)
        else:
            found[name] = definition
    return found


def _check_tools(
    tools: Any, base: Path, builtin: bool, problems: list[str], servers: dict[str, dict] | None = None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(normalised specs, tool names)``; a user's plug-ins are imported and checked.

    ``mcp:SERVER/TOOL`` entries take their server's definition from ``servers`` (the task file's
    ``mcp_servers``); the servers themselves are started by the stages' checks, not here.
    """
    if not isinstance(tools, list) or not all(isinstance(t, str) and t for t in tools):
        problems.append(f"tools must be a list of tool names or FILE.py:function specs, got {tools!r}")
        return (), ()
    if builtin:
        # The built-in tasks use built-in tools only; importing the tools here would load them all.
        return tuple(tools), tuple(tools)
    # Lazily: the tools' own module (imports nothing heavy, but only user task files need it).
    import nat_ray.tools.mcp as mcp
    from nat_ray.tools.plugins import check_tool_specs, resolve_tool_spec, tool_name

    specs: list[str] = []
    for raw in tools:
        try:
            resolved = mcp.resolve_spec(raw, servers or {}, base) if mcp.is_mcp(raw) else raw
            specs.append(resolve_tool_spec(resolved, base))
        except ConfigError as err:
            problems.append(f"tools: {err}")
    if len(specs) == len(tools):
        problems.extend(f"tools: {p}" for p in check_tool_specs(specs))
    return tuple(specs), tuple(tool_name(s) for s in specs)


def _check_markers(markers: Any, problems: list[str]) -> prompts.Markers | None:
    if not isinstance(markers, dict) or set(markers) != {"correct", "incorrect"}:
        problems.append(f"markers must have exactly the keys correct and incorrect, got {markers!r}")
        return None
    if not all(isinstance(v, str) and v.strip() for v in markers.values()):
        problems.append(f"markers.correct and markers.incorrect must be non-empty strings, got {markers!r}")
        return None
    if markers["correct"] == markers["incorrect"]:
        problems.append(
            "markers.correct and markers.incorrect must differ (NAT tells the classes apart by them)"
        )
        return None
    return prompts.Markers(
        prompts.marker_prompt(markers["correct"]), prompts.marker_prompt(markers["incorrect"])
    )


def _check_demonstrations(
    file: Any, base: Path, tools: tuple[str, ...], problems: list[str]
) -> prompts.Demo | None:
    if not isinstance(file, str) or not file:
        problems.append(f"demonstrations must name a text file, got {file!r}")
        return None
    path = _resolve_file(file, base)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as err:
        problems.append(f"demonstrations: cannot read {path}: {err.strerror or err}")
        return None
    except UnicodeDecodeError:
        problems.append(f"demonstrations: {path} is not UTF-8 text")
        return None
    try:
        return parse_demonstration(text, tools)
    except ValueError as err:
        problems.append(f"demonstrations: {path}: {err}")
        return None
