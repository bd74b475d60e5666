"""Read question files into :class:`Question` records.

Three kinds of file load the same way: the normalized files of the shared data folder
(``gsm8k/test.jsonl`` ...), the NAT repository's verbatim files (``nat/data/dataset/...``: golds like
``#### 39``, full GSM8K rationales, bare ASDiv digits, StrategyQA bools, integer ids) and a user's own
file. A file is JSON Lines or one JSON array of objects, optionally gzip-compressed (``.gz``), or a
CSV file with a header row (``.csv``, ``.csv.gz``; every value is text) or a Parquet file
(``.parquet``). Each record needs ``question`` and ``answer``, and may have ``id`` (also read:
``qid``, ``_id``; else the record's 0-based position); a task file may name other columns for the
three (``fields``). Every other field goes to ``Question.meta``, along with the original answer as
``meta["raw_gold"]``, so NAT's exact-string scoring can see it.

Golds are normalised by family: math → the canonical number string (``"#### 1,080"`` → ``"1080"``,
``"51.0"`` → ``"51"``); hotpotqa → the answer string; strategyqa → a bool (``true``/``"yes"``/...).
A path ``hf://datasets/<owner>/<name>[@revision]/<file>`` is fetched from the Hugging Face hub first.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from nat_ray.core.scoring import as_bool_gold, canonical_math_gold
from nat_ray.errors import ConfigError, DataError

log = logging.getLogger(__name__)

HF_PREFIX = "hf://datasets/"
_ID_KEYS = ("id", "qid", "_id")
_CORE_KEYS = frozenset((*_ID_KEYS, "question", "answer"))

# The record fields a task file may rename (``fields: {question: prompt, answer: target, id: qid}``).
FIELD_KEYS = ("question", "answer", "id")

# A split's record filter: takes the raw record, returns whether to keep it. It may raise KeyError
# when the record lacks a field the split needs; the loader reports that as a DataError.
RecordFilter = Callable[[dict[str, Any]], bool]


@dataclass(frozen=True)
class Question:
    """One question of a task.

    Attributes:
        id: the record's id as a string (NAT's integer ids become ``"17"``).
        task: the task name (``"gsm8k"`` ...).
        question: the question text, verbatim (NAT prompts keep trailing spaces).
        gold: normalised gold: a number string (math), the answer string (hotpotqa) or a bool
            (strategyqa).
        meta: the record's other fields, plus ``raw_gold``, the answer exactly as in the file.
            Not part of equality or hashing.
    """

    id: str
    task: str
    question: str
    gold: str | bool
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


def _open_text(path: Path) -> IO[str]:
    # utf-8-sig: tolerate a byte-order mark from Windows editors.
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return path.open("r", encoding="utf-8-sig")


def _first_char(path: Path) -> str:
    with _open_text(path) as f:
        while chunk := f.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return stripped[0]
    return ""


def _read_csv(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        for record in reader:
            # DictReader files surplus cells under None: a row longer than the header is malformed.
            if None in record:
                raise DataError(f"{path}:{reader.line_num}: more cells than the header has columns")
            yield f"{path}:{reader.line_num}", record


def _read_parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow as pa  # lazily: only Parquet question files need it
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read as Parquet: {e}") from e
    for i, record in enumerate(rows):
        yield f"{path}[{i}]", record


def read_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(where, record)`` for each record of a question file (see the module docstring).

    ``where`` locates the record for error messages: ``"path:line"`` for JSON Lines and CSV (1-based
    line), ``"path[i]"`` for a JSON array or Parquet file (0-based). Blank lines are skipped.

    Raises:
        DataError: bad JSON, a record that is not an object, or an unreadable file.
    """
    name = path.name.lower()
    if name.endswith(".parquet"):
        yield from _read_parquet(path)
        return
    try:
        if name.endswith((".csv", ".csv.gz")):
            yield from _read_csv(path)
            return
        if _first_char(path) == "[":
            with _open_text(path) as f:
                try:
                    items = json.load(f)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{e.lineno}: bad JSON: {e.msg}") from e
            for i, item in enumerate(items):
                where = f"{path}[{i}]"
                if not isinstance(item, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
                yield where, item
            return
        with _open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{where}: bad JSON ({e.msg}); expected JSON Lines or one JSON array"
                    ) from e
                if not isinstance(item, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
                yield where, item
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:  # missing, unreadable, bad .gz or CSV
        raise DataError(f"{path}: cannot read: {e}") from e


def normalize_gold(family: str, answer: Any, where: str) -> str | bool:
    """The normalised gold of one record (see module docstring).

    Raises:
        DataError: naming ``where``, when the answer does not fit the family.
    """
    if answer is None:
        raise DataError(f"{where}: 'answer' is null")
    if family == "math":
        if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
            raise DataError(f"{where}: math answer must be a string or number, got {answer!r}")
        gold = canonical_math_gold(answer)
        if gold is None:
            raise DataError(f"{where}: math answer {answer!r} is not a single number")
        return gold
    if family == "strategyqa":
        try:
            return as_bool_gold(answer)
        except ValueError as e:
            raise DataError(f"{where}: {e}") from e
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise DataError(f"{where}: answer must be a string, got {answer!r}")
    return str(answer)


def record_to_question(
    record: dict[str, Any], *, task: str, family: str, where: str, position: int
) -> Question:
    """Build a :class:`Question` from one raw record.

    Args:
        record: the parsed JSON object.
        task: task name stored on the question.
        family: ``"math"``, ``"hotpotqa"`` or ``"strategyqa"``; selects the gold normalisation.
        where: ``"path:line"`` for error messages.
        position: 0-based position of the record in its file, the id when the record has none.

    Raises:
        DataError: missing or empty question, missing answer, bad id or gold.
    """
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: missing or empty 'question' (record keys: {sorted(record)})")
    if "answer" not in record:
        raise DataError(f"{where}: missing 'answer' (record keys: {sorted(record)})")
    raw_id = next((record[k] for k in _ID_KEYS if record.get(k) is not None), position)
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise DataError(f"{where}: id must be a string or integer, got {raw_id!r}")
    gold = normalize_gold(family, record["answer"], where)
    meta = {k: v for k, v in record.items() if k not in _CORE_KEYS}
    meta["raw_gold"] = record["answer"]
    return Question(id=str(raw_id), task=task, question=question, gold=gold, meta=meta)


def rename_fields(record: dict[str, Any], fields: Mapping[str, str], where: str) -> dict[str, Any]:
    """The record with the task's columns under the names ``question``, ``answer`` and ``id``.

    Args:
        record: the raw record.
        fields: canonical name (:data:`FIELD_KEYS`) -> the file's column; names left out keep theirs.
        where: ``"path:line"`` for error messages.

    Raises:
        DataError: a renamed column is missing from the record.
    """
    renamed = {k: v for k, v in record.items() if k not in fields.values()}
    for canonical, column in fields.items():
        if column not in record:
            raise DataError(
                f"{where}: missing {column!r}, the task's {canonical} field (record keys: {sorted(record)})"
            )
        renamed[canonical] = record[column]
    return renamed


def load_questions(
    paths: Sequence[Path],
    *,
    task: str,
    family: str,
    keep: RecordFilter | None = None,
    limit: int | None = None,
    fields: Mapping[str, str] | None = None,
) -> list[Question]:
    """Read and concatenate question files, in order.

    Args:
        paths: files to read one after another.
        task: task name stored on each question.
        family: selects the gold normalisation (``"math"``: a number string, ``"strategyqa"``: a
            bool, anything else: the answer as a string).
        keep: optional record filter applied before conversion (e.g. NAT's subset of ASDiv).
        limit: keep only the first ``limit`` kept questions, in file order (None: all).
        fields: the file's column for each renamed canonical field (see :func:`rename_fields`);
            ``None``: the default names.

    Returns:
        The questions; ids are unique.

    Raises:
        DataError: a malformed record (message ``path:line: ...``), a duplicate id, or no records.
        ConfigError: a negative ``limit``.
    """
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0 or None, got {limit}")
    questions: list[Question] = []
    seen: dict[str, str] = {}
    if limit == 0:
        return questions
    for path in paths:
        for position, (where, record) in enumerate(read_records(path)):
            if keep is not None:
                try:
                    if not keep(record):
                        continue
                except KeyError as e:
                    raise DataError(f"{where}: this split needs the field {e} to select records") from e
            if fields:
                record = rename_fields(record, fields, where)
            q = record_to_question(record, task=task, family=family, where=where, position=position)
            if q.id in seen:
                raise DataError(f"{where}: duplicate id {q.id!r} (first at {seen[q.id]})")
            seen[q.id] = where
            questions.append(q)
            if limit is not None and len(questions) >= limit:
                return questions
    if not questions:
        names = ", ".join(str(p) for p in paths)
        raise DataError(f"{names}: no questions (file empty, or every record filtered out)")
    return questions


def download_hf(url: str) -> Path:
    """Fetch ``hf://datasets/<owner>/<name>[@revision]/<file>`` into the HF cache; return its path.

    Raises:
        DataError: a malformed URL, ``huggingface_hub`` missing, or the file unreachable (offline,
            unknown repo or file).
    """
    rest = url.removeprefix(HF_PREFIX)
    parts = rest.split("/", 2)
    if not url.startswith(HF_PREFIX) or len(parts) < 3 or not all(parts):
        raise DataError(f"{url}: expected hf://datasets/<owner>/<name>[@revision]/<file>")
    owner, name, filename = parts
    name, _, revision = name.partition("@")
    try:
        import huggingface_hub  # lazily: only hub paths need it
        from huggingface_hub.errors import EntryNotFoundError, HFValidationError
    except ImportError as e:
        raise DataError(
            f"{url}: reading from the Hugging Face hub needs `pip install huggingface_hub`"
        ) from e
    try:
        local = huggingface_hub.hf_hub_download(
            f"{owner}/{name}", filename, repo_type="dataset", revision=revision or None
        )
    except (OSError, EntryNotFoundError, HFValidationError) as e:
        raise DataError(
            f"{url}: cannot download from the Hugging Face hub ({type(e).__name__}: {e}); "
            "check the repo id and file name and that this machine is online, or pass a local path"
        ) from e
    log.info("downloaded %s to %s", url, local)
    return Path(local)
