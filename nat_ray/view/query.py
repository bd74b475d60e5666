"""Server-side paging and filtering over a run's trajectory Parquet parts (pyarrow datasets).

Nothing is loaded whole: a page scans the filtered rows of the light columns until it has the
page (the first page of a million rows reads one batch), a count reads only the filtered columns,
and a text search scans the question, answer and turn texts batch by batch. One trajectory, or one
question across sources, is a filtered read of all columns.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from nat_ray.core import nat_data as col
from nat_ray.core.records import arrow_schema
from nat_ray.view.runs import RunFolder, Source

LIST_COLUMNS = (
    col.TRAJECTORY_ID,
    col.TASK,
    col.QUESTION_ID,
    col.QUESTION,
    col.ANSWER,
    col.GOLD,
    col.CORRECT_ROBUST,
    col.FAILURE_REASON,
    col.TURNS,
    col.NAT_CLASS,
)
OUTCOMES = ("correct", "incorrect")
MAX_PAGE = 200


@dataclass(frozen=True)
class Filters:
    """What the trajectory list is narrowed to; ``None`` = any.

    Attributes:
        source: a source key (a round, a variant's evaluation, a rollout).
        task: task name.
        outcome: ``correct`` or ``incorrect`` (the robust verdict).
        reason: failure reason (``wrong_answer``, ``turn_cap``, ``unparseable``, ...).
        turns: agent turns.
        text: a case-insensitive substring of the question, the answer or any turn.
    """

    source: str | None = None
    task: str | None = None
    outcome: str | None = None
    reason: str | None = None
    turns: int | None = None
    text: str | None = None

    def expression(self):
        """The column filters as one pyarrow expression (the text search is applied per batch)."""
        parts = []
        if self.task:
            parts.append(pc.field(col.TASK) == self.task)
        if self.outcome in OUTCOMES:
            parts.append(pc.field(col.CORRECT_ROBUST) == (self.outcome == "correct"))
        if self.reason:
            parts.append(pc.field(col.FAILURE_REASON) == self.reason)
        if self.turns is not None:
            parts.append(pc.field(col.TURNS) == self.turns)
        expr = None
        for part in parts:
            expr = part if expr is None else expr & part
        return expr


@dataclass(frozen=True)
class Page:
    """One page of the list: rows (each with its ``source`` key and ``source_label``) and the count."""

    rows: list[dict]
    total: int
    offset: int
    limit: int


def dataset(source: Source) -> ds.Dataset:
    """The source's files as one dataset, in the trajectory schema (older files: missing columns null)."""
    return _dataset(source.files)


@lru_cache(maxsize=64)
def _dataset(files: tuple) -> ds.Dataset:
    return ds.dataset([str(f) for f in files], schema=arrow_schema(), format="parquet")


def _text_mask(batch: pa.RecordBatch, text: str) -> pa.Array:
    """Rows whose question, answer or any turn contains ``text`` (ignoring case)."""
    mask = pc.fill_null(pc.match_substring(batch.column(col.QUESTION), text, ignore_case=True), False)
    answer = pc.fill_null(pc.match_substring(batch.column(col.ANSWER), text, ignore_case=True), False)
    mask = pc.or_(mask, answer)
    turns = batch.column(col.TRAJECTORY)
    contents = pc.struct_field(pc.list_flatten(turns), "content")
    hits = pc.fill_null(pc.match_substring(contents, text, ignore_case=True), False)
    parents = pc.unique(pc.filter(pc.list_parent_indices(turns), hits))
    in_turns = pc.is_in(pa.array(range(batch.num_rows), pa.int64()), value_set=parents.cast(pa.int64()))
    return pc.or_(mask, in_turns)


def _batches(source: Source, filters: Filters, columns: list[str]) -> Iterator[pa.RecordBatch]:
    needed = (
        list(dict.fromkeys([*columns, col.QUESTION, col.ANSWER, col.TRAJECTORY])) if filters.text else columns
    )
    for batch in dataset(source).to_batches(columns=needed, filter=filters.expression()):
        if filters.text:
            batch = batch.filter(_text_mask(batch, filters.text)).select(columns)
        if batch.num_rows:
            yield batch


def page(run: RunFolder, filters: Filters, offset: int = 0, limit: int = 50) -> Page:
    """Rows ``offset .. offset + limit`` of the filtered trajectories of ``filters.source`` (or all sources).

    Without a text search the count comes from the filtered columns alone; with one, the same scan
    that finds the page counts the rest.
    """
    limit = max(1, min(limit, MAX_PAGE))
    offset = max(0, offset)
    sources = [run.source(filters.source)] if filters.source else run.sources
    sources = [s for s in sources if s is not None]
    rows: list[dict] = []
    total = 0
    for source in sources:
        if not filters.text:
            count = dataset(source).count_rows(filter=filters.expression())
            if total + count <= offset or len(rows) >= limit:
                total += count
                continue
        seen = total
        for batch in _batches(source, filters, list(LIST_COLUMNS)):
            start = max(0, offset - seen)
            if len(rows) < limit and start < batch.num_rows:
                take = batch.slice(start, limit - len(rows)).to_pylist()
                rows.extend({**r, "source": source.key, "source_label": source.label} for r in take)
            seen += batch.num_rows
            if not filters.text and len(rows) >= limit:
                break
        total = seen if filters.text else total + count
    return Page(rows, total, offset, limit)


@lru_cache(maxsize=256)
def facets(source: Source) -> dict[str, list]:
    """The tasks, failure reasons and turn counts present in a source (for the filter menus).

    Read once per source: a source's files are fixed when the run is opened.
    """
    table = dataset(source).to_table(columns=[col.TASK, col.FAILURE_REASON, col.TURNS])
    return {
        key: sorted(v for v in pc.unique(table.column(name)).to_pylist() if v is not None)
        for key, name in (("tasks", col.TASK), ("reasons", col.FAILURE_REASON), ("turns", col.TURNS))
    }


def trajectory(source: Source, trajectory_id: str) -> dict | None:
    """One trajectory, every column; ``None`` when the source has no such id."""
    table = dataset(source).to_table(filter=pc.field(col.TRAJECTORY_ID) == trajectory_id)
    return table.slice(0, 1).to_pylist()[0] if table.num_rows else None


def same_question(run: RunFolder, question_id: str, task: str | None = None, per_source: int = 2) -> list:
    """``[(source, [rows])]``: the question's trajectories in every source that has it (a few each)."""
    expr = pc.field(col.QUESTION_ID) == question_id
    if task:
        expr = expr & (pc.field(col.TASK) == task)
    out = []
    for source in run.sources:
        table = dataset(source).to_table(filter=expr)
        if table.num_rows:
            out.append((source, table.slice(0, per_source).to_pylist()))
    return out
