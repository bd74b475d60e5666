"""``nat-ray import-nat``: the NAT repository's GPT-3.5 StrategyQA trajectories as trajectory rows.

The NAT repo ships the trajectories its teacher (``gpt-3.5-turbo-1106``) collected for StrategyQA:
``strategyqa_gpt-3.5_positive.json`` and ``..._negative.json`` (also gzipped), each one JSON array of
``{conversations: [{role, content, loss}], info: {reward, acc, gt, pred}, id, source}``
(``shared/data/README.md``, "Trajectory files"). This module turns them into rows of the project's
trajectory schema (:mod:`nat_ray.core.records`), so training can use them without running a teacher.

The files store only the agent's turns; the question is looked up by ``id`` in NAT's
``strategyqa/train.jsonl`` (the task's ``nat_train`` split), and each row's prompt is the zero-shot
inference prompt (training rebuilds the prompt per variant anyway). Every trajectory is re-scored
with both the paper and the robust rule instead of trusting ``info.reward``; disagreements are
counted in :class:`ImportStats`.

A bad file (unreadable, not JSON, not an array) raises :class:`~nat_ray.errors.DataError`. A bad
record (no ``conversations`` or ``id``, unknown question, ...) is skipped, counted and logged with
its file and index. Empty trajectories are kept (``nat_data`` drops them when selecting) and counted.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nat_ray import paths
from nat_ray.core import records
from nat_ray.core.prompts import build_messages
from nat_ray.core.react import MAX_TURNS, PARSE_ERROR, TURN_CAP, parse_action
from nat_ray.core.scoring import score_answer
from nat_ray.errors import ActionParseError, DataError
from nat_ray.tasks import Question, get_task
from nat_ray.tools import FINISH

log = logging.getLogger(__name__)

TEACHER_MODEL = "gpt-3.5-turbo-1106"  # the NAT repo's collection model for these files
ENGINE = "nat-import"
SEED = 0  # the files record no seed; one fixed value keeps trajectory ids stable
PROMPT_TEMPLATE = "zero-shot"
NAT_DIR = "nat/data/dataset/strategyqa"  # relative to a data dir (paths.data_dirs)
FILE_NAMES = ("strategyqa_gpt-3.5_positive.json", "strategyqa_gpt-3.5_negative.json")
FILE_SUFFIXES = ("", ".gz")  # plain file preferred when both exist
QUESTIONS_NAME = "train.jsonl"
# Folders under a PATH directory that may hold the files: itself, a NAT checkout, NAT's dataset folder.
_SUBDIRS = (".", "strategyqa", "dataset/strategyqa", "data/dataset/strategyqa", NAT_DIR)
_NAT_ACTION_SPLIT = "\nAction: "  # how NAT's data/generate.py cut the action out of a model turn
DEFAULT_OUT = Path("runs/imported/nat_strategyqa.parquet")


@dataclass
class ImportStats:
    r"""What an import read, wrote and skipped.

    Attributes:
        files: the trajectory files read, in order.
        questions_file: the questions file(s) the question texts came from.
        records: records seen in the files (rows + skipped).
        rows_per_file: file path → rows produced from it.
        trajectories: rows produced.
        reward_true / reward_false: rows by the file's label ``info.reward``.
        correct_paper / correct_robust: rows correct after re-scoring, by each rule.
        disagree_paper / disagree_robust: rows whose re-scored verdict differs from ``info.reward``.
        gt_mismatch: rows whose ``info.gt`` differs from the questions file's gold (the latter is used).
        finish_mismatch: rows where "has ``info.pred``" differs from "last action is ``finish``".
        nat_split_finish: finished rows whose ``finish`` only NAT's ``"\nAction: "`` split finds.
        empty: rows with no turns at all (kept; ``nat_data`` drops them at training time).
        unfinished: rows whose last assistant turn is not a ``finish`` action (empties included).
        turn_cap: unfinished rows that used all 7 model calls.
        skipped: reason → count of records not imported.
    """

    files: list[str] = field(default_factory=list)
    questions_file: str = ""
    records: int = 0
    rows_per_file: dict[str, int] = field(default_factory=dict)
    trajectories: int = 0
    reward_true: int = 0
    reward_false: int = 0
    correct_paper: int = 0
    correct_robust: int = 0
    disagree_paper: int = 0
    disagree_robust: int = 0
    gt_mismatch: int = 0
    finish_mismatch: int = 0
    nat_split_finish: int = 0
    empty: int = 0
    unfinished: int = 0
    turn_cap: int = 0
    skipped: Counter = field(default_factory=Counter)


class _BadRecord(Exception):
    """One record cannot be imported; ``reason`` is its stats key, the message says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def load_trajectory_file(path: Path) -> list[Any]:
    """The top-level JSON array of one NAT trajectory file (``.gz`` read transparently).

    Raises:
        DataError: naming the file, when it is missing, unreadable, not JSON or not an array.
    """
    try:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8-sig") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{e.lineno}: bad JSON ({e.msg}); expected one JSON array of trajectories"
        ) from e
    except (OSError, EOFError, UnicodeDecodeError) as e:  # missing, truncated or bad .gz, not UTF-8
        raise DataError(f"{path}: cannot read: {e}") from e
    if not isinstance(data, list):
        raise DataError(
            f"{path}: expected a JSON array of trajectories at the top level, got {type(data).__name__}"
        )
    return data


def _messages(conversations: Any) -> list[dict]:
    """The turns as ``{role, content}`` (``loss`` dropped), checked."""
    if not isinstance(conversations, list):
        raise _BadRecord(
            "bad_conversations", f"'conversations' is {type(conversations).__name__}, not a list"
        )
    turns = []
    for i, turn in enumerate(conversations):
        if not (
            isinstance(turn, dict)
            and turn.get("role") in ("assistant", "user")
            and isinstance(turn.get("content"), str)
        ):
            raise _BadRecord("bad_conversations", f"turn {i} is not {{role: assistant|user, content: str}}")
        turns.append({"role": turn["role"], "content": turn["content"]})
    return turns


def _last_action(turns: list[dict]) -> tuple[str | None, bool]:
    r"""The last assistant turn's action name (None: no turn, or unparseable), and whether NAT's split found it.

    :func:`~nat_ray.core.react.parse_action` reads the first ``Action:`` line. NAT split the output on
    ``"\nAction: "`` instead, so a turn like ``"Action: Based on ...\n\nAction: finish[Yes]"`` (one in
    the positive file) finished there. When our parser rejects a turn, the text after its last
    ``"\nAction: "`` is tried too, so such a row is not marked unfinished while it holds a scored answer.
    """
    last = next((t["content"] for t in reversed(turns) if t["role"] == "assistant"), None)
    if last is None:
        return None, False
    try:
        return parse_action(last).name, False
    except ActionParseError:
        _, sep, tail = last.rpartition(_NAT_ACTION_SPLIT)
        if not sep:
            return None, False
        try:
            return parse_action("Action: " + tail).name, True
        except ActionParseError:
            return None, False


def _parse_record(record: Any, questions: dict[str, Question]) -> tuple[Question, float, list[dict], dict]:
    """Validate one record: its question, temperature, turns and ``info``.

    Raises:
        _BadRecord: with the stats key and a readable reason.
    """
    if not isinstance(record, dict):
        raise _BadRecord("not_an_object", f"expected a JSON object, got {type(record).__name__}")
    if "conversations" not in record:
        raise _BadRecord("missing_conversations", f"no 'conversations' (keys: {sorted(record)})")
    qid = record.get("id")
    if isinstance(qid, bool) or not isinstance(qid, (str, int)):
        raise _BadRecord("missing_id", f"no usable 'id' (got {qid!r})")
    question = questions.get(str(qid))
    if question is None:
        raise _BadRecord("unknown_question", f"question id {qid!r} is not in the questions file")
    try:
        temperature = float(record.get("source"))
    except (TypeError, ValueError):
        raise _BadRecord("bad_source", f"'source' {record.get('source')!r} is not a temperature") from None
    info = record.get("info")
    if not isinstance(info, dict) or not isinstance(info.get("reward"), bool):
        raise _BadRecord("bad_info", f"'info' needs a boolean 'reward', got {info!r}")
    pred = info.get("pred")
    if pred is not None and not isinstance(pred, str):
        raise _BadRecord("bad_info", f"'info.pred' must be a string, got {pred!r}")
    return question, temperature, _messages(record["conversations"]), info


def _load_questions(task_name: str, questions: Path | None) -> tuple[dict[str, Question], list[Path]]:
    """Question id → question, and the files they came from (``questions``, else the ``nat_train`` split)."""
    task = get_task(task_name)
    loaded = task.load("nat_train", path=questions)
    sources = [questions] if questions is not None else list(task.files("nat_train"))
    return {q.id: q for q in loaded}, sources


def _input_hash(files: Sequence[Path]) -> str:
    """Provenance: the input files' names and sizes (cheap, and changes when a file is replaced)."""
    return records.config_hash({"importer": ENGINE, "files": [(p.name, p.stat().st_size) for p in files]})


def import_nat(
    paths: Sequence[Path], questions: Path | None = None, task: str = "strategyqa"
) -> tuple[list[dict], ImportStats]:
    """Convert NAT trajectory files to trajectory rows (pure apart from reading the files).

    Rows come in input order: each file in turn, records in file order. ``sample_index`` counts the
    earlier rows with the same (question, temperature) across all files, so passing the positive file
    before the negative one (as :func:`run_import` does) gives the positive index 0 and keeps ids unique.

    Args:
        paths: NAT trajectory files (JSON arrays, optionally ``.gz``), e.g. the positive then the
            negative file.
        questions: the questions file to look ids up in; None = the task's ``nat_train`` split
            (NAT's ``strategyqa/train.jsonl``).
        task: a registered task name; its family picks the scorer and the prompt.

    Returns:
        The rows (schema :func:`nat_ray.core.records.arrow_schema`) and what was read, kept and skipped.

    Raises:
        DataError: a missing or malformed trajectory or questions file (message names the file).
        ConfigError: unknown task.
    """
    family = get_task(task).family
    by_id, question_files = _load_questions(task, questions)
    stats = ImportStats(questions_file=", ".join(str(p) for p in question_files))
    files = [Path(p) for p in paths]
    for path in files:
        if not path.is_file():
            raise DataError(f"{path}: no such trajectory file")
    config_hash = _input_hash([*files, *question_files])
    imported_at = records.now_iso()
    samples: Counter = Counter()  # (question id, temperature) -> rows so far
    rows: list[dict] = []
    for path in files:
        data = load_trajectory_file(path)
        stats.files.append(str(path))
        stats.rows_per_file.setdefault(str(path), 0)
        for index, record in enumerate(data):
            stats.records += 1
            try:
                question, temperature, turns, info = _parse_record(record, by_id)
            except _BadRecord as bad:
                stats.skipped[bad.reason] += 1
                log.warning("%s[%d]: skipped: %s", path, index, bad)
                continue
            sample_index = samples[question.id, temperature]
            samples[question.id, temperature] += 1
            pred = info.get("pred")
            score = score_answer(family, pred, question.gold)
            n_turns = sum(t["role"] == "assistant" for t in turns)
            action, nat_split = _last_action(turns)
            finished = action == FINISH
            failure = None if finished else TURN_CAP if n_turns >= MAX_TURNS else PARSE_ERROR
            rows.append(
                records.trajectory_row(
                    trajectory_id=records.trajectory_id(
                        TEACHER_MODEL, task, question.id, temperature, sample_index, SEED
                    ),
                    prompt=build_messages(family, question.question, PROMPT_TEMPLATE, None, 0),
                    trajectory=turns,
                    turns=n_turns,
                    answer=pred,
                    finished=finished,
                    failure_reason=failure,
                    prompt_tokens=0,  # unknown: the files keep no usage
                    completion_tokens=0,
                    task=task,
                    family=family,
                    question_id=question.id,
                    question=question.question,
                    gold=question.gold,
                    score=score,
                    temperature=temperature,
                    sample_index=sample_index,
                    seed=SEED,
                    model=TEACHER_MODEL,
                    engine=ENGINE,
                    config_hash=config_hash,
                    started_at=imported_at,
                    ended_at=imported_at,
                )
            )
            reward = info["reward"]
            stats.rows_per_file[str(path)] += 1
            stats.trajectories += 1
            stats.reward_true += reward
            stats.reward_false += not reward
            stats.correct_paper += score.correct_paper
            stats.correct_robust += score.correct_robust
            stats.disagree_paper += score.correct_paper != reward
            stats.disagree_robust += score.correct_robust != reward
            if "gt" in info and info["gt"] != question.gold:
                stats.gt_mismatch += 1
            stats.finish_mismatch += finished != (pred is not None)
            stats.nat_split_finish += nat_split and finished
            stats.empty += not turns
            stats.unfinished += not finished
            stats.turn_cap += failure == TURN_CAP
    if stats.skipped:
        log.warning("skipped %d records: %s", sum(stats.skipped.values()), dict(stats.skipped))
    if stats.gt_mismatch:
        log.warning(
            "%d records' info.gt differs from the questions file's gold; used the latter", stats.gt_mismatch
        )
    return rows, stats


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _files_in(folder: Path) -> list[Path]:
    """The positive and negative files under ``folder`` (or a NAT checkout rooted there), in that order."""
    found = []
    for name in FILE_NAMES:
        for sub in _SUBDIRS:
            hit = next(
                (folder / sub / (name + s) for s in FILE_SUFFIXES if (folder / sub / (name + s)).is_file()),
                None,
            )
            if hit is not None:
                found.append(hit)
                break
    return found


def resolve_inputs(path_args: Sequence[str]) -> list[Path]:
    """Trajectory files from the command line's PATHs: files as given, folders searched, none = defaults.

    Raises:
        DataError: a PATH that does not exist, a folder without the files, or no default files.
    """
    if not path_args:
        found = [
            f
            for name in FILE_NAMES
            if (f := paths.find_data_file(*(f"{NAT_DIR}/{name}{s}" for s in FILE_SUFFIXES))) is not None
        ]
        if not found:
            dirs = ", ".join(str(d) for d in paths.data_dirs())
            raise DataError(
                f"no NAT trajectory files found: looked for {NAT_DIR}/{{{','.join(FILE_NAMES)}}}[.gz] under "
                f"{dirs}; pass PATH (the files or a NAT checkout) or set NAT_RAY_DATA_DIR"
            )
        return found
    files: list[Path] = []
    for arg in path_args:
        p = Path(arg).expanduser()
        if p.is_dir():
            found = _files_in(p)
            if not found:
                raise DataError(
                    f"{p}: no {' or '.join(FILE_NAMES)} (or .gz) in it or in {', '.join(_SUBDIRS[1:])} under it"
                )
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return files


def _out_file(out: str | None) -> Path:
    """``--out``: a ``.parquet`` path is the file; anything else is a folder for the default name."""
    if out is None:
        return DEFAULT_OUT
    p = Path(out).expanduser()
    return p if p.suffix == ".parquet" else p / DEFAULT_OUT.name


def _summary(stats: ImportStats, out: Path) -> str:
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(stats.skipped.items())) or "none"
    lines = [
        *(
            (("files read" if i == 0 else ""), f"{f} ({n} rows)")
            for i, (f, n) in enumerate(stats.rows_per_file.items())
        ),
        ("questions", stats.questions_file),
        ("trajectories", f"{stats.trajectories} of {stats.records} records"),
        ("info.reward", f"{stats.reward_true} positive / {stats.reward_false} negative"),
        (
            "re-scored paper",
            f"{stats.correct_paper} correct, {stats.disagree_paper} disagree with info.reward",
        ),
        (
            "re-scored robust",
            f"{stats.correct_robust} correct, {stats.disagree_robust} disagree with info.reward",
        ),
        ("unfinished", f"{stats.unfinished} ({stats.empty} empty, {stats.turn_cap} at the turn cap)"),
        (
            "consistency",
            f"info.gt vs gold {stats.gt_mismatch}, info.pred vs finish {stats.finish_mismatch}, "
            f"finish found by NAT's split only {stats.nat_split_finish}",
        ),
        ("skipped", skipped),
        ("output", str(out)),
    ]
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)


def run_import(paths: Sequence[str] = (), out: str | None = None, questions: str | None = None) -> int:
    """``nat-ray import-nat``: convert, write the Parquet file, print a summary. Returns the exit code.

    Args:
        paths: trajectory files or folders holding them (none: the data dirs' NAT files).
        out: a ``.parquet`` file, or a folder for the default file name (None: :data:`DEFAULT_OUT`).
        questions: the questions file to look ids up in (None: beside the files, else NAT's).

    Raises:
        DataError: bad input files, or no trajectory could be imported.
    """
    files = resolve_inputs(paths)
    questions_file = Path(questions).expanduser() if questions else None
    if questions_file is None:
        # A NAT checkout given as PATH brings its own train.jsonl: use the questions that match it.
        beside = files[0].parent / QUESTIONS_NAME
        if paths and beside.is_file():
            questions_file = beside
    rows, stats = import_nat(files, questions=questions_file)
    if not rows:
        raise DataError(
            f"no trajectories imported from {', '.join(stats.files)}; skipped: {dict(stats.skipped)}"
        )
    out_file = _out_file(out)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    records.write_rows(rows, out_file)
    print(_summary(stats, out_file))
    return 0
