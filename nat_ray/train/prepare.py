"""Training data, streamed: trajectory Parquet -> selection -> token ids -> packed rows, on Ray Data.

Nothing here holds the trajectories in one Python list. Two passes over ``train.data``:

1. **Selection** (light): ``read_parquet`` -> per row a few features (:func:`trajectory_features`:
   verdict, empty, unfinished, F1 = 0, a hash of the agent's turns) -> ``groupby(question_id)``
   -> :func:`select_in_question` marks each trajectory positive, negative or why it is dropped
   (empty, duplicate, unfinished, F1 = 0), exactly as :func:`nat_ray.core.nat_data.select_trajectories`
   does. The driver gathers only ``(question_id, trajectory_id, status)`` and draws the seeded
   sample (:func:`sample_selection`). The draw is the one of ``select_trajectories`` (one
   ``random.Random(sample_seed)``, positives then negatives, over the rows sorted by question and
   trajectory id), because ``num_positives`` / ``num_negatives`` are totals over all questions:
   a per-question draw could not honour them. The draw needs only indices, so it stays cheap.
2. **Examples** (heavy): ``read_parquet`` again -> keep the selected rows and give each its index
   in the selection (positives first, as NAT) and a chunk (``index // CHUNK_EXAMPLES``) ->
   ``groupby(chunk)`` -> :func:`prepare_chunk` builds, tokenises, applies ``train.overlong`` and
   packs each chunk's examples (in index order) -> a materialized dataset of packed rows.

Row ``i`` of the run is the i-th row in (chunk, position) order, fixed by the data and the config
whatever Ray's block layout, so every attempt (and a resume) sees the same rows at step k. Each
rank's dataset (:func:`rank_dataset`) is gathered from those blocks by Ray tasks in the order of
its :meth:`~nat_ray.train.data.Schedule.rank_stream`. The driver keeps per-row lengths only.

The pure functions (features, per-question selection, the draw, a chunk's rows) need no Ray. Small
data (up to :data:`DRIVER_MAX_ROWS` trajectories) runs them in the driver instead, grouping in plain
Python: the same rows in the same order, without the seconds a Ray Data shuffle costs to start.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from nat_ray.config import TrainConfig
from nat_ray.core import nat_data
from nat_ray.core.masks import FROM_IDS, FROM_TEXT, FROM_TEXT_FALLBACK, IGNORE_INDEX
from nat_ray.core.nat_data import (  # the per-question rules, shared with the in-memory selection
    DROP_REASONS,
    NEGATIVE,
    POSITIVE,
    select_in_question,
    trajectory_features,
)
from nat_ray.core.preference import PLAIN_VARIANT, PairReport, check_objective, draw_pairs, kto_weights
from nat_ray.core.prompts import CUSTOM
from nat_ray.errors import DataError
from nat_ray.tasks import TASKS, register_task_file
from nat_ray.train.data import (
    apply_overlong,
    load_tokenizer,
    tokenize_example,
    trajectory_files,
    warn_fallbacks,
)
from nat_ray.train.packing import PackedSequence, make_row, pack_examples, single_rows

log = logging.getLogger(__name__)

ROWS_PER_PARTITION = 5000  # trajectories per hash-shuffle partition (groupby)
DRIVER_MAX_ROWS = 5000  # up to this many trajectories are prepared in the driver, not on Ray Data
MAX_PARTITIONS = 32
# Examples packed together; more packs tighter, fewer keeps each task small. Even, so a DPO pair
# (selection indices 2k and 2k + 1) never spans two chunks.
CHUNK_EXAMPLES = 512
STATUS = "status"
SELECTION_COLUMNS = (
    nat_data.TRAJECTORY_ID,
    nat_data.QUESTION_ID,
    nat_data.TRAJECTORY,
    nat_data.CORRECT_PAPER,
    nat_data.CORRECT_ROBUST,
    nat_data.FINISHED,
    nat_data.F1,
)
EXAMPLE_COLUMNS = (
    nat_data.TRAJECTORY_ID,
    nat_data.TASK,
    nat_data.FAMILY,
    nat_data.QUESTION_ID,
    nat_data.QUESTION,
    nat_data.TRAJECTORY,
    nat_data.FINISHED,
    nat_data.CORRECT_PAPER,
    nat_data.CORRECT_ROBUST,
    nat_data.F1,
    nat_data.FAILURE_REASON,
    nat_data.TASK_SOURCE,
    nat_data.TASK_HASH,
    nat_data.TURN_PROMPT_IDS,
    nat_data.TURN_COMPLETION_IDS,
)
COUNTS = (
    "truncated",
    "dropped_overlong",
    "dropped_no_loss",
    "dropped_pair_partner",  # DPO: the pair's other trajectory was dropped (over-long or no loss)
    FROM_IDS,
    FROM_TEXT,
    FROM_TEXT_FALLBACK,
)
ROW_COLUMNS = ("input_ids", "labels", "position_ids", "example_ids", "lengths")


# --------------------------------------------------------------------------------------------
# Pass 1: selection (pure functions, then their Ray Data wrappers)


def features_batch(batch, label_mode: str):
    """``map_batches``: trajectory rows -> :func:`trajectory_features` (drops the text)."""
    import pyarrow as pa

    return pa.Table.from_pylist([trajectory_features(r, label_mode) for r in batch.to_pylist()])


def select_group(group, drop_unfinished_negatives: bool, drop_zero_f1_negatives: bool):
    """``map_groups`` over one question: ``(question_id, trajectory_id, status)``.

    A trajectory id seen twice (the same trajectory in two files) counts once.
    """
    import pyarrow as pa

    features = list({f[nat_data.TRAJECTORY_ID]: f for f in group.to_pylist()}.values())
    status = select_in_question(features, drop_unfinished_negatives, drop_zero_f1_negatives)
    return pa.table(
        {
            nat_data.QUESTION_ID: pa.array([f[nat_data.QUESTION_ID] for f in features], pa.string()),
            nat_data.TRAJECTORY_ID: pa.array([f[nat_data.TRAJECTORY_ID] for f in features], pa.string()),
            STATUS: pa.array(status, pa.string()),
        }
    )


@dataclass(frozen=True)
class Selected:
    """The draw: trajectory ids in example order, and what was dropped.

    The order is positives first (as NAT), so an example index below ``positives`` is a positive
    (KTO's desirable examples); for DPO it is pair after pair, the positive first: indices ``2k``
    and ``2k + 1`` are one question's pair, and ``pairs`` says how they were drawn.
    """

    trajectory_ids: list[str]
    positives: int
    negatives: int
    dropped: dict[str, int]
    pairs: PairReport | None = None


def sample_selection(
    statuses,
    variant: nat_data.Variant,
    num_positives: int | None,
    num_negatives: int | None,
    seed: int,
    objective: str = "sft",
    pair_seed: int = 42,
) -> Selected:
    """The seeded draw of :func:`nat_ray.core.nat_data.build_examples` over per-question statuses.

    With ``objective="dpo"`` the drawn positives and negatives are then paired within each question
    (:func:`nat_ray.core.preference.draw_pairs` with ``pair_seed``); rows without a partner are left out.

    Args:
        statuses: pyarrow table ``(question_id, trajectory_id, status)`` of every trajectory.

    Raises:
        DataError: more positives or negatives asked for than exist; no positive; a variant that
            needs negatives finds none; DPO with no question that has both.
        ConfigError: a preference objective with a variant without negatives.
    """
    check_objective(objective, variant)
    import pyarrow.compute as pc

    ordered = statuses.sort_by([(nat_data.QUESTION_ID, "ascending"), (nat_data.TRAJECTORY_ID, "ascending")])
    status = ordered[STATUS]
    counts = {r: pc.sum(pc.equal(status, r)).as_py() or 0 for r in DROP_REASONS}
    ids = {
        kind: ordered.filter(pc.equal(status, kind))[nat_data.TRAJECTORY_ID].to_pylist()
        for kind in (POSITIVE, NEGATIVE)
    }
    rng = random.Random(seed)
    # Indices, not rows: random.sample picks the same positions from any sequence of a length.
    pos = nat_data.sample_rows(range(len(ids[POSITIVE])), num_positives, rng, "positives")
    neg = nat_data.sample_rows(
        range(len(ids[NEGATIVE])), num_negatives if variant.negatives else 0, rng, "negatives"
    )
    if not pos:
        raise DataError(f"variant {variant.name!r} found no positive trajectories to train on")
    if variant.negatives and not neg:
        raise DataError(f"variant {variant.name!r} needs negative trajectories, but the data has none")
    chosen = [ids[POSITIVE][i] for i in pos] + [ids[NEGATIVE][i] for i in neg]
    if objective == "dpo":
        return _pair_selection(ordered, chosen, len(pos), counts, pair_seed)
    log.info(
        "%s: %d positives + %d negatives (dropped %s)",
        variant.name,
        len(pos),
        len(neg),
        {k: v for k, v in counts.items() if v},
    )
    return Selected(chosen, len(pos), len(neg), counts)


def _pair_selection(ordered, chosen: list[str], positives: int, counts: dict, seed: int) -> Selected:
    """DPO's draw: the chosen rows paired within their questions, laid out pair after pair."""
    question_of = dict(
        zip(ordered[nat_data.TRAJECTORY_ID].to_pylist(), ordered[nat_data.QUESTION_ID].to_pylist())
    )
    labelled = [(t, k < positives) for k, t in enumerate(chosen)]
    pairs, report = draw_pairs(labelled, lambda r: question_of[r[0]], lambda r: r[1], seed)
    if not pairs:
        raise DataError(
            f"train.objective=dpo pairs a positive and a negative trajectory of one question, but none of "
            f"the {report.questions} questions has both; collect more samples per question "
            "(rollout.samples, at a temperature above 0) or use train.objective=kto, which needs no pairs"
        )
    log.info(
        "dpo: %d pairs from %d of %d questions (%d positives and %d negatives without a partner; seed %d)",
        report.pairs,
        report.paired_questions,
        report.questions,
        report.unused_positives,
        report.unused_negatives,
        seed,
    )
    return Selected([t for pair in pairs for t, _ in pair], report.pairs, report.pairs, counts, report)


# --------------------------------------------------------------------------------------------
# Pass 2: examples -> packed rows (pure functions, then their Ray Data wrappers)


def chunk_rows(
    rows: Sequence[dict],
    indices: Sequence[int],
    variant: str,
    label_mode: str,
    tokenizer,
    max_length: int | None,
    overlong: str,
    packing: bool,
    objective: str = "sft",
) -> tuple[list, dict]:
    """One chunk's trajectory rows -> packed rows, and counts of what ``train.overlong`` did.

    KTO and DPO build every example with the plain prompt (no marker) and never pack across
    examples: KTO's row is one example, DPO's row is one pair (positive, then negative; no attention
    between them), and a pair whose other half was dropped is dropped too.

    Args:
        rows: trajectory rows of the chunk, in selection order.
        indices: their indices in the selection (the rows' ``example_ids``).

    Returns:
        ``([PackedSequence], {"truncated", "dropped_overlong", "dropped_no_loss", <token sources>})``.
    """
    prompt_variant = variant if objective == "sft" else PLAIN_VARIANT
    tokenized = [
        tokenize_example(tokenizer, nat_data.build_example(r, prompt_variant, label_mode), max_length)
        for r in rows
    ]
    kept, counts = apply_overlong(tokenized, [r[nat_data.TRAJECTORY_ID] for r in rows], overlong)
    for ex in tokenized:
        counts[ex.source] = counts.get(ex.source, 0) + 1
    if objective == "dpo":
        return _pair_rows(tokenized, kept, indices, counts)
    examples = [tokenized[k] for k in kept]
    packed = pack_examples(examples, max_length) if packing and objective == "sft" else single_rows(examples)
    # example_ids: the examples' indices in the whole selection, not in this chunk.
    return [
        PackedSequence(
            r.input_ids, r.labels, r.position_ids, tuple(indices[kept[i]] for i in r.example_ids), r.lengths
        )
        for r in packed
    ], counts


def _pair_rows(tokenized, kept: list[int], indices: Sequence[int], counts: dict) -> tuple[list, dict]:
    """DPO's rows: selection indices ``2k`` and ``2k + 1`` (positive, negative) as one row each pair."""
    by_index = {indices[k]: k for k in kept}
    rows = []
    for k in kept:
        index = indices[k]
        if index % 2:
            continue
        partner = by_index.get(index + 1)
        if partner is None:
            counts["dropped_pair_partner"] = counts.get("dropped_pair_partner", 0) + 1
            continue
        row = make_row(tokenized, [k, partner])
        rows.append(
            PackedSequence(row.input_ids, row.labels, row.position_ids, (index, index + 1), row.lengths)
        )
    # A negative whose positive was dropped loses its partner too.
    lone = sum(1 for k in kept if indices[k] % 2 and indices[k] - 1 not in by_index)
    counts["dropped_pair_partner"] = counts.get("dropped_pair_partner", 0) + lone
    return rows, counts


def index_batch(batch, selected, chunk_examples: int):
    """``map_batches``: keep the selected rows, with their selection ``index`` and ``chunk``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    position = pc.index_in(batch[nat_data.TRAJECTORY_ID], value_set=selected)
    keep = pc.is_valid(position)
    batch = batch.filter(keep)
    index = position.filter(keep).cast(pa.int64())
    return batch.append_column("index", index).append_column(
        "chunk", pc.divide(index, pa.scalar(chunk_examples, pa.int64()))
    )


def custom_task_files(files: Sequence[str]) -> list[str]:
    """The task files that the custom-task rows of ``files`` are rebuilt from, found in the driver.

    A row names the task file it was made with, as a path on the machine that made it (a teacher set
    shipped with a task names the author's checkout). Per task name: the task this process has
    registered (the stage's configured tasks), else the first row's file that exists here. Workers
    register these before building examples, so :func:`nat_ray.core.nat_data.row_task` finds them.
    """
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    dataset = ds.dataset(list(files), format="parquet")
    if nat_data.TASK_SOURCE not in dataset.schema.names:
        return []
    table = dataset.to_table(
        columns=[nat_data.TASK, nat_data.TASK_SOURCE], filter=pc.field(nat_data.FAMILY) == CUSTOM
    )
    found: dict[str, str] = {}
    for name, source in sorted(set(zip(*(table.column(c).to_pylist() for c in table.column_names)))):
        registered = TASKS.get(str(name).lower())
        if registered is not None and registered.source:
            found[name] = registered.source
        elif name not in found and source and Path(source).is_file():
            found[name] = source
    return sorted(set(found.values()))


def register_task_files(task_files: Sequence[str]) -> None:

    for path in task_files:
        register_task_file(path)


def pack_group(
    group,
    model_path: str,
    variant: str,
    label_mode: str,
    max_length: int | None,
    overlong: str,
    packing: bool,
    task_files: Sequence[str] = (),
    objective: str = "sft",
):
    """``map_groups`` over one chunk: packed rows with ``chunk``, ``pos``, their token counts,
    and the chunk's counts on its first record (a chunk with no row left gives one non-row record)."""
    import pyarrow as pa

    register_task_files(task_files)

    rows, indices, seen = [], [], set()
    for r in sorted(group.to_pylist(), key=lambda r: (r["index"], r.get("path") or "")):
        if r["index"] not in seen:  # the same trajectory in two files: the first file's copy
            seen.add(r["index"])
            rows.append(r)
            indices.append(r["index"])
    chunk = rows[0]["chunk"]
    packed, counts = chunk_rows(
        rows,
        indices,
        variant,
        label_mode,
        load_tokenizer(model_path),
        max_length,
        overlong,
        packing,
        objective,
    )
    n = max(1, len(packed))
    ints = pa.list_(pa.int32())
    out = {
        "chunk": pa.array([chunk] * n, pa.int64()),
        "pos": pa.array(range(n), pa.int64()),
        "is_row": pa.array([True] * len(packed) or [False]),
        "input_ids": pa.array([r.input_ids for r in packed] or [[]], ints),
        "labels": pa.array([r.labels for r in packed] or [[]], ints),
        "position_ids": pa.array([r.position_ids for r in packed] or [[]], ints),
        "example_ids": pa.array([list(r.example_ids) for r in packed] or [[]], pa.list_(pa.int64())),
        "lengths": pa.array([list(r.lengths) for r in packed] or [[]], ints),
        "tokens": pa.array([len(r) for r in packed] or [0], pa.int64()),
        "loss_tokens": pa.array(
            [sum(1 for x in r.labels if x != IGNORE_INDEX) for r in packed] or [0], pa.int64()
        ),
    }
    for key in COUNTS:
        out[key] = pa.array([counts.get(key, 0)] + [0] * (n - 1), pa.int64())
    return pa.table(out)


# --------------------------------------------------------------------------------------------
# The driver


@dataclass(frozen=True)
class PreparedRows:
    """The run's training rows, in the object store, and where each one is.

    Attributes:
        blocks: ObjectRefs of the packed-row Arrow blocks.
        block_of: (rows,) int64, the block of row i.
        offset_of: (rows,) int64, its offset in that block.
        stats: the counts of :func:`nat_ray.train.data.prepare_rows`.
    """

    blocks: list
    block_of: object
    offset_of: object
    stats: dict

    @property
    def num_rows(self) -> int:
        return len(self.block_of)


def _summary(block):
    """A block's light columns (no token ids)."""
    return block.drop_columns(list(ROW_COLUMNS))


def _read_local(files: Sequence[str], columns: Sequence[str], common: set[str], paths: bool):
    """The files' ``columns`` as one table, with a ``path`` column as Ray Data's ``include_paths`` gives."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    keep = [c for c in columns if c in common]
    tables = []
    for f in files:
        table = pq.read_table(f, columns=keep)
        if paths:
            table = table.append_column("path", pa.array([os.path.abspath(f)] * table.num_rows, pa.string()))
        tables.append(table)
    return pa.concat_tables(tables, promote_options="default")


def _groups(table, key: str):
    """The table split by ``key``'s values (first-seen order), as tables."""
    positions: dict = {}
    for i, value in enumerate(table[key].to_pylist()):
        positions.setdefault(value, []).append(i)
    return [table.take(idx) for idx in positions.values()]


def prepare_data(
    cfg: TrainConfig,
    model_path: str,
    files: Sequence[str] | None = None,
    driver_max_rows: int = DRIVER_MAX_ROWS,
) -> PreparedRows:
    """Turn ``cfg.data`` into packed training rows in Ray's object store (Ray must be up).

    Up to ``driver_max_rows`` trajectories are prepared in this process with the same functions, in
    the same order (a Ray Data shuffle costs tens of seconds of start-up, more than small data takes);
    more are streamed on Ray Data.

    Args:
        files: :func:`~nat_ray.train.data.trajectory_files` of ``cfg.data`` when already checked.

    Raises:
        DataError: bad or empty files, a selection the data cannot give, nothing left to train on.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import ray

    variant = nat_data.get_variant(cfg.variant)
    files = list(files) if files is not None else trajectory_files(cfg.data)
    common = set.intersection(*(set(pq.read_schema(f).names) for f in files))
    total = sum(pq.read_metadata(f).num_rows for f in files)
    in_driver = total <= driver_max_rows
    # Hash-shuffle partitions: each is an actor, costly for small data; 2 keep both CPUs busy.
    partitions = max(2, min(MAX_PARTITIONS, total // ROWS_PER_PARTITION))
    selection_kwargs = {
        "drop_unfinished_negatives": cfg.drop_unfinished_negatives,
        "drop_zero_f1_negatives": cfg.drop_zero_f1_negatives,
    }
    pack_kwargs = {
        "model_path": model_path,
        "variant": variant.name,
        "label_mode": cfg.label_mode,
        "max_length": cfg.max_length,
        "overlong": cfg.overlong,
        "packing": cfg.packing,
        "task_files": custom_task_files(files),
        "objective": cfg.objective,
    }

    def read(columns, paths: bool):
        # select_columns after the read, not read_parquet(columns=...) (deprecated in Ray 2.60):
        # Ray Data pushes the projection down into the Parquet read either way.
        keep = [c for c in columns if c in common] + (["path"] if paths else [])
        return ray.data.read_parquet(files, include_paths=paths).select_columns(keep)

    if in_driver:
        features = features_batch(_read_local(files, SELECTION_COLUMNS, common, False), cfg.label_mode)
        groups = _groups(features, nat_data.QUESTION_ID) if features.num_rows else []
        # No trajectories: the empty features stand for the empty statuses (refused just below).
        statuses = (
            pa.concat_tables([select_group(g, **selection_kwargs) for g in groups]) if groups else features
        )
    else:
        selection = (
            read(SELECTION_COLUMNS, paths=False)
            .map_batches(features_batch, fn_kwargs={"label_mode": cfg.label_mode}, batch_format="pyarrow")
            .groupby(nat_data.QUESTION_ID, num_partitions=partitions)
            .map_groups(select_group, fn_kwargs=selection_kwargs, batch_format="pyarrow")
        )
        statuses = pa.concat_tables(ray.get(selection.to_arrow_refs()))
    if statuses.num_rows == 0:
        raise DataError(f"train.data: {list(cfg.data)} hold no trajectories")
    chosen = sample_selection(
        statuses,
        variant,
        cfg.num_positives,
        cfg.num_negatives,
        cfg.sample_seed,
        cfg.objective,
        cfg.pair_seed,
    )
    selected = pa.array(chosen.trajectory_ids, pa.string())
    if in_driver:
        indexed = index_batch(_read_local(files, EXAMPLE_COLUMNS, common, True), selected, CHUNK_EXAMPLES)
        tables = [pack_group(g, **pack_kwargs) for g in _groups(indexed, "chunk")]
        blocks = [ray.put(t) for t in tables]
        parts = [_summary(t) for t in tables]
    else:
        rows = (
            read(EXAMPLE_COLUMNS, paths=True)
            .map_batches(
                index_batch,
                fn_kwargs={"selected": selected, "chunk_examples": CHUNK_EXAMPLES},
                batch_format="pyarrow",
            )
            .groupby("chunk", num_partitions=partitions)
            .map_groups(pack_group, fn_kwargs=pack_kwargs, batch_format="pyarrow")
            .materialize()
        )
        blocks = rows.to_arrow_refs()
        summarize = ray.remote(_summary)
        parts = ray.get([summarize.remote(b) for b in blocks])
    light = pa.concat_tables(
        [
            p.append_column("block", pa.array([k] * p.num_rows, pa.int64())).append_column(
                "offset", pa.array(range(p.num_rows), pa.int64())
            )
            for k, p in enumerate(parts)
        ]
    )
    counts = {key: pc.sum(light[key]).as_py() or 0 for key in COUNTS}
    order = light.filter(light["is_row"]).sort_by([("chunk", "ascending"), ("pos", "ascending")])
    tokens = order["tokens"].to_numpy()
    examples = (
        chosen.positives
        + chosen.negatives
        - counts["dropped_overlong"]
        - counts["dropped_no_loss"]
        - counts["dropped_pair_partner"]
    )
    cut = {k: counts[k] for k in ("truncated", "dropped_overlong", "dropped_no_loss")}
    if cfg.objective == "dpo":
        cut["dropped_pair_partner"] = counts["dropped_pair_partner"]
    if examples == 0:
        raise DataError(f"no example is left to train on after the max_length check: {cut}")
    sources = {k: counts[k] for k in (FROM_IDS, FROM_TEXT, FROM_TEXT_FALLBACK)}
    warn_fallbacks(sources)
    stats = {
        "positives": chosen.positives,
        "negatives": chosen.negatives,
        "selection_dropped": {k: v for k, v in chosen.dropped.items() if v},
        **cut,
        "examples": examples,
        "token_sources": sources,
        "rows": order.num_rows,
        "tokens": int(tokens.sum()),
        "loss_tokens": pc.sum(order["loss_tokens"]).as_py() or 0,
        "packing_efficiency": round(int(tokens.sum()) / (order.num_rows * cfg.max_length), 4)
        if cfg.packing and cfg.objective == "sft" and order.num_rows
        else None,
        **preference_stats(cfg, chosen),
    }
    return PreparedRows(blocks, order["block"].to_numpy(), order["offset"].to_numpy(), stats)


def preference_stats(cfg: TrainConfig, chosen: Selected) -> dict:
    """What the run's JSON says of a preference objective's data: DPO's pair draw, KTO's class weights.

    KTO's weights (lambda_D, lambda_U) come from the selected positives and negatives, before the
    ``train.overlong`` check, so they do not depend on how the examples were cut into chunks.
    """
    if cfg.objective == "dpo" and chosen.pairs is not None:
        return {"pairs": asdict(chosen.pairs)}
    if cfg.objective == "kto":
        desirable, undesirable = kto_weights(chosen.positives, chosen.negatives)
        return {"kto_weights": {"desirable": desirable, "undesirable": undesirable}}
    return {}


def loss_sample(prepared: PreparedRows, tokenizer, limit: int = 6) -> list[dict]:
    """The first ``limit`` examples of the run's rows as token strings with their loss flags.

    What ``nat-ray view`` shows of a training run (``loss_sample.json``): the tokens each example put
    its loss on, from the rows training reads (after the marker, the masks, truncation and packing).
    """
    import ray

    out: list[dict] = []
    for block in prepared.blocks:
        table = ray.get(block)
        rows = table.filter(table["is_row"]).select(["input_ids", "labels", "example_ids", "lengths"])
        for row in rows.to_pylist():
            start = 0
            for example_id, length in zip(row["example_ids"], row["lengths"]):
                ids = row["input_ids"][start : start + length]
                labels = row["labels"][start : start + length]
                start += length
                out.append(
                    {
                        "example_id": example_id,
                        "tokens": [tokenizer.decode([i]) for i in ids],
                        "loss": [int(label != IGNORE_INDEX) for label in labels],
                    }
                )
                if len(out) >= limit:
                    return out
    return out


def gather_rows(steps, micros, block_ids, offsets, *blocks):
    """Ray task: one piece of a rank's stream as a table, rows taken from the packed blocks.

    Args:
        steps, micros: (n,) the stream's step and micro-batch of each entry.
        block_ids: (n,) index into ``blocks`` of each entry's row; offsets: (n,) its offset there.
        blocks: the packed-row blocks the piece needs.
    """
    import numpy as np
    import pyarrow as pa

    columns = list(ROW_COLUMNS)
    starts = np.cumsum([0] + [b.num_rows for b in blocks])
    table = pa.concat_tables([b.select(columns) for b in blocks]).take(pa.array(starts[block_ids] + offsets))
    return table.add_column(0, "micro", pa.array(micros, pa.int64())).add_column(
        0, "step", pa.array(steps, pa.int64())
    )


GATHER_ROWS = 2048  # stream entries per gather task


def rank_dataset(prepared: PreparedRows, stream: Sequence[tuple[int, int, int]]):
    """One rank's Ray dataset: its rows in stream order (``step``, ``micro``, then the row columns)."""
    import numpy as np
    import ray

    gather = ray.remote(gather_rows)
    entries = np.asarray(stream, dtype=np.int64).reshape(-1, 3)
    refs = []
    for start in range(0, len(entries), GATHER_ROWS):
        part = entries[start : start + GATHER_ROWS]
        rows = part[:, 2]
        needed, local = np.unique(prepared.block_of[rows], return_inverse=True)
        refs.append(
            gather.remote(
                part[:, 0],
                part[:, 1],
                local,
                prepared.offset_of[rows],
                *[prepared.blocks[k] for k in needed],
            )
        )
    return ray.data.from_arrow_refs(refs)
