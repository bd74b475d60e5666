"""Training data, driver side: trajectory Parquet -> NAT examples -> token ids -> rows -> per-rank streams.

trajectory Parquet -> NAT examples (variant, seeded selection; :mod:`nat_ray.core.nat_data`) ->
token ids and loss masks (Ray Data ``map_batches`` for many examples; :mod:`nat_ray.core.masks`) ->
optional packing (:mod:`nat_ray.train.packing`) -> a fixed, seeded :class:`Schedule`: which rows each
worker trains on at each step. Every rank gets its own table of rows in step order, so the rows a
rank sees at step k are the same in every attempt and a resumed run continues with exactly the
data it had not seen yet. :func:`step_batches` turns a rank's rows back into micro-batches.

``nat-ray train`` streams these steps on Ray Data (:mod:`nat_ray.train.prepare`), which calls the
per-example functions here (:func:`tokenize_example`, :func:`apply_overlong`); the in-memory
versions (:func:`read_trajectories` ... :func:`prepare_rows`, :func:`rank_table`) hold everything
in one list and serve small data, benchmarks and the tests that check the streamed path against them.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from nat_ray.config import TrainConfig
from nat_ray.core import nat_data, records
from nat_ray.core.masks import FROM_IDS, FROM_TEXT, FROM_TEXT_FALLBACK, TokenizedExample, tokenize_chat
from nat_ray.errors import DataError
from nat_ray.train.packing import PackedSequence, collate, pack_examples, packing_efficiency, single_rows
from nat_ray.train.step import gradient_accumulation_steps, warmup_steps

log = logging.getLogger(__name__)

RAY_DATA_MIN_EXAMPLES = 256  # fewer examples are tokenized in the driver
REQUIRED_COLUMNS = (
    nat_data.TRAJECTORY_ID,
    nat_data.FAMILY,
    nat_data.QUESTION_ID,
    nat_data.QUESTION,
    nat_data.TRAJECTORY,
    nat_data.CORRECT_PAPER,
    nat_data.CORRECT_ROBUST,
)


# --------------------------------------------------------------------------------------------
# Trajectories -> examples


def trajectory_files(paths: Sequence[str]) -> list[str]:
    """The trajectory Parquet files of ``train.data`` (files or folders of ``*.parquet``), checked.

    Reads only the files' footers: their schemas and row counts.

    Raises:
        DataError: a path is missing, holds no Parquet, lacks trajectory columns, or all are empty.
    """
    import pyarrow.parquet as pq

    out: list[str] = []
    num_rows = 0
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise DataError(
                f"train.data: {raw} does not exist; collect trajectories with `nat-ray rollout` or "
                "convert NAT's with `nat-ray import-nat`"
            )
        files = records.part_files(path) if path.is_dir() else [path]
        if not files:
            raise DataError(f"train.data: folder {raw} holds no .parquet files")
        for file in files:
            try:
                meta = pq.read_metadata(file)
            except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
                raise DataError(f"train.data: {file} is not a readable Parquet file: {err}") from None
            missing = [c for c in REQUIRED_COLUMNS if c not in meta.schema.to_arrow_schema().names]
            if missing:
                raise DataError(
                    f"train.data: {file} is not a trajectory file: it lacks columns {missing} "
                    "(expected the schema of nat_ray.core.records)"
                )
            num_rows += meta.num_rows
            out.append(str(file))
    if not num_rows:
        raise DataError(f"train.data: {list(paths)} hold no trajectories")
    return out


def read_trajectories(paths: Sequence[str]) -> list[dict]:
    """All trajectory rows of ``train.data`` in one list: for small data and tests.

    Training streams them instead (:func:`nat_ray.train.prepare.prepare_data`).

    Raises:
        DataError: as :func:`trajectory_files`.
    """
    trajectory_files(paths)
    return [row for raw in paths for row in records.read_rows(Path(raw).expanduser())]


def select_examples(
    cfg: TrainConfig, trajectories: Sequence[dict]
) -> tuple[list[nat_data.ChatExample], nat_data.Selection]:
    """The variant's chat examples (seeded selection of positives and negatives).

    Raises:
        DataError / ConfigError: an unknown variant, one that needs negatives the data lacks, ...
    """
    return nat_data.build_examples(
        trajectories,
        cfg.variant,
        cfg.num_positives,
        cfg.num_negatives,
        cfg.sample_seed,
        cfg.label_mode,
        cfg.drop_unfinished_negatives,
        cfg.drop_zero_f1_negatives,
    )


# --------------------------------------------------------------------------------------------
# Examples -> token ids


@lru_cache(maxsize=2)
def load_tokenizer(model_path: str):
    """The model's tokenizer, loaded once per process and path."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def pad_token_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its end-of-sequence token.

    Padding never carries loss or attention, so any id works; models without a pad token
    (Llama-style tokenizers) conventionally pad with EOS.
    """
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def tokenize_example(tokenizer, ex: nat_data.ChatExample, max_length: int | None) -> TokenizedExample:
    """One example's token ids and labels: from the engine's stored ids when it has them, else its text."""
    return tokenize_chat(
        tokenizer, ex.messages, max_length, ex.prompt_messages, ex.turn_prompt_ids, ex.turn_completion_ids
    )


def tokenize_batch(batch, model_path: str, max_length: int):
    """Ray Data ``map_batches`` function: chat examples -> token ids and labels (truncated to max_length).

    Args:
        batch: pyarrow table with ``index``, ``messages`` (JSON), ``prompt_messages`` and
            ``token_ids`` (JSON ``[turn prompt ids, turn completion ids]``, or null without ids).

    Returns:
        pyarrow table with ``index``, ``input_ids``, ``labels``, ``truncated``, ``source``.
    """
    import pyarrow as pa

    tokenizer = load_tokenizer(model_path)  # once per worker process
    out: dict[str, list] = {"index": [], "input_ids": [], "labels": [], "truncated": [], "source": []}
    for item in batch.to_pylist():
        turn_ids = json.loads(item["token_ids"]) if item.get("token_ids") else (None, None)
        ex = tokenize_chat(
            tokenizer, json.loads(item["messages"]), max_length, item["prompt_messages"], *turn_ids
        )
        out["index"].append(item["index"])
        out["input_ids"].append(ex.input_ids)
        out["labels"].append(ex.labels)
        out["truncated"].append(ex.truncated)
        out["source"].append(ex.source)
    return pa.table(out)


def tokenize_examples(
    examples: Sequence[nat_data.ChatExample], model_path: str, max_length: int | None
) -> list[TokenizedExample]:
    """Token ids and labels of every example, in order: on Ray Data, or here for a few examples.

    Below :data:`RAY_DATA_MIN_EXAMPLES` examples, starting Ray Data tasks (a process that imports
    transformers and loads the tokenizer) costs more than tokenizing here (well under a second).

    Examples with the engine's stored ids are built from them (token-exact, no re-tokenisation of
    the model's text); those whose ids fail a check are tokenised from the text and counted in one
    warning (see :func:`token_sources`).
    """
    if len(examples) < RAY_DATA_MIN_EXAMPLES:
        tokenizer = load_tokenizer(model_path)
        out = [tokenize_example(tokenizer, ex, max_length) for ex in examples]
        _warn_fallbacks(out)
        return out
    import ray

    items = [
        {
            "index": i,
            "messages": json.dumps(ex.messages),
            "prompt_messages": ex.prompt_messages,
            "token_ids": None
            if ex.turn_completion_ids is None
            else json.dumps([ex.turn_prompt_ids, ex.turn_completion_ids]),
        }
        for i, ex in enumerate(examples)
    ]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(16, len(items) // 64)))
    ds = ds.map_batches(
        tokenize_batch,
        fn_kwargs={"model_path": model_path, "max_length": max_length},
        batch_format="pyarrow",
        batch_size=64,
    )
    out: list[TokenizedExample | None] = [None] * len(items)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in batch.to_pylist():
            out[row["index"]] = TokenizedExample(
                row["input_ids"], row["labels"], row["truncated"], row["source"]
            )
    _warn_fallbacks(out)
    return out


def token_sources(tokenized: Sequence[TokenizedExample]) -> dict[str, int]:
    """How many examples were built from stored ids, from text, and from text after an id check failed."""
    counts = {FROM_IDS: 0, FROM_TEXT: 0, FROM_TEXT_FALLBACK: 0}
    for ex in tokenized:
        counts[ex.source] = counts.get(ex.source, 0) + 1
    return counts


def _warn_fallbacks(tokenized: Sequence[TokenizedExample | None]) -> None:
    counts = token_sources([ex for ex in tokenized if ex is not None])
    warn_fallbacks(counts)
    log.info("tokenised examples by source: %s", counts)


def warn_fallbacks(counts: dict[str, int]) -> None:
    """Warn when examples with stored token ids had to be tokenised from their text instead."""
    if counts[FROM_TEXT_FALLBACK]:
        log.warning(
            "%d of %d examples with stored token ids did not match their text or the chat template "
            "(another tokenizer, or a template that renders turns differently); tokenised from text",
            counts[FROM_TEXT_FALLBACK],
            counts[FROM_TEXT_FALLBACK] + counts[FROM_IDS],
        )


def apply_overlong(
    tokenized: Sequence[TokenizedExample], names: Sequence[str], overlong: str
) -> tuple[list[int], dict]:
    """Positions of the examples kept under ``train.overlong`` (and with a loss token), and counts.

    Args:
        names: each example's trajectory id, for the debug log.
    """
    kept, stats = [], {"truncated": 0, "dropped_overlong": 0, "dropped_no_loss": 0}
    for i, (ex, name) in enumerate(zip(tokenized, names)):
        if ex.truncated:
            if overlong == "drop":
                stats["dropped_overlong"] += 1
                log.debug("dropping over-long example %s", name)
                continue
            stats["truncated"] += 1
        if ex.num_loss_tokens == 0:  # e.g. truncation cut off every agent turn
            stats["dropped_no_loss"] += 1
            continue
        kept.append(i)
    return kept, stats


def finalize_examples(
    tokenized: Sequence[TokenizedExample], examples: Sequence[nat_data.ChatExample], overlong: str
) -> tuple[list[TokenizedExample], dict]:
    """Apply ``train.overlong`` and count what it did; drop examples with no loss token.

    Raises:
        DataError: nothing is left to train on.
    """
    kept, stats = apply_overlong(tokenized, [ex.trajectory_id for ex in examples], overlong)
    if not kept:
        raise DataError(f"no example is left to train on after the max_length check: {stats}")
    return [tokenized[i] for i in kept], stats


def prepare_rows(
    cfg: TrainConfig,
    examples: Sequence[nat_data.ChatExample],
    selection: nat_data.Selection,
    model_path: str,
    tokenize=tokenize_examples,
) -> tuple[list[PackedSequence], dict]:
    """Examples -> training rows, with counts of everything that was selected, cut or dropped.

    Args:
        tokenize: ``(examples, model_path, max_length) -> [TokenizedExample]`` (Ray Data by default).

    Raises:
        DataError: nothing left after the max_length check.
    """
    tokenized = tokenize(examples, model_path, cfg.max_length)
    kept, cut = finalize_examples(tokenized, examples, cfg.overlong)
    rows = pack_examples(kept, cfg.max_length) if cfg.packing else single_rows(kept)
    stats = {
        "positives": len(selection.positives),
        "negatives": len(selection.negatives),
        "selection_dropped": {k: v for k, v in selection.dropped.items() if v},
        **cut,
        "examples": len(kept),
        "token_sources": token_sources(tokenized),
        "rows": len(rows),
        "tokens": sum(len(r) for r in rows),
        "loss_tokens": sum(r.num_loss_tokens for r in rows),
        "packing_efficiency": round(packing_efficiency(rows, cfg.max_length), 4) if cfg.packing else None,
    }
    return rows, stats


# --------------------------------------------------------------------------------------------
# Rows -> the schedule and each rank's stream


@dataclass(frozen=True)
class Schedule:
    """Which row each worker trains on at each optimizer step (seeded, the same in every attempt).

    Attributes:
        rows: training rows (packed sequences, or one example each).
        global_batch: rows per optimizer step over all workers.
        micro_batch: rows per worker per forward pass.
        workers: Ray Train workers.
        accum: micro-batches per worker per step.
        steps_per_epoch: full global batches per epoch (the remainder of each shuffled epoch is dropped).
        total_steps: optimizer steps of the run (epochs, capped by max_steps).
        warmup_steps: linear warmup steps of the cosine schedule.
    """

    rows: int
    global_batch: int
    micro_batch: int
    workers: int
    accum: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    def rank_stream(self, rank: int, seed: int) -> list[tuple[int, int, int]]:
        """``(step, micro, row index)`` for every row ``rank`` trains on, in order."""
        out = []
        perm: list[int] = []
        for step in range(self.total_steps):
            epoch, k = divmod(step, self.steps_per_epoch)
            if k == 0:
                perm = list(range(self.rows))
                random.Random(seed * 1_000_003 + epoch).shuffle(perm)
            batch = perm[k * self.global_batch : (k + 1) * self.global_batch]
            for micro in range(self.accum):
                first = (micro * self.workers + rank) * self.micro_batch
                out.extend((step, micro, i) for i in batch[first : first + self.micro_batch])
        return out


def make_schedule(num_rows: int, cfg: TrainConfig) -> Schedule:
    """Steps per epoch and in all from the row count and the batch settings.

    Raises:
        DataError: fewer rows than one global batch.
    """
    what = "packed sequences" if cfg.packing else "examples"
    if num_rows < cfg.global_batch_size:
        raise DataError(
            f"the data makes {num_rows} {what}, fewer than train.global_batch_size={cfg.global_batch_size}; "
            "add data or lower global_batch_size (and micro_batch_size)"
        )
    per_epoch = num_rows // cfg.global_batch_size
    total = per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        if cfg.max_steps > total:
            log.warning(
                "train.max_steps=%d is more than epochs x steps per epoch = %d; stopping after %d",
                cfg.max_steps,
                total,
                total,
            )
        total = min(total, cfg.max_steps)
    return Schedule(
        num_rows,
        cfg.global_batch_size,
        cfg.micro_batch_size,
        cfg.num_workers,
        gradient_accumulation_steps(cfg),
        per_epoch,
        total,
        warmup_steps(total, cfg.warmup_ratio),
    )


def rank_table(rows: Sequence[PackedSequence], stream: Sequence[tuple[int, int, int]]):
    """One rank's rows in order, as a pyarrow table (the rank's Ray dataset)."""
    import pyarrow as pa

    out: dict[str, list] = {
        k: [] for k in ("step", "micro", "input_ids", "labels", "position_ids", "example_ids", "lengths")
    }
    for step, micro, i in stream:
        row = rows[i]
        out["step"].append(step)
        out["micro"].append(micro)
        out["input_ids"].append(row.input_ids)
        out["labels"].append(row.labels)
        out["position_ids"].append(row.position_ids)
        out["example_ids"].append(list(row.example_ids))
        out["lengths"].append(list(row.lengths))
    return pa.table(out)


def _row_to_sequence(row: dict) -> PackedSequence:
    return PackedSequence(
        list(row["input_ids"]),
        list(row["labels"]),
        list(row["position_ids"]),
        tuple(row["example_ids"]),
        tuple(row["lengths"]),
    )


def step_batches(
    rows: Iterator[dict], start_step: int, pad_id: int, packed: bool, keep_rows: bool = False
) -> Iterator[tuple]:
    """Group a rank's row stream into ``(step, [micro-batch])``, skipping steps before ``start_step``.

    Args:
        keep_rows: each micro-batch also holds its :class:`PackedSequence` rows under ``"rows"``
            (the preference objectives read the examples' ids and build KTO's mismatched pairs).
    """
    live = (r for r in rows if r["step"] >= start_step)
    for step, step_rows in itertools.groupby(live, key=lambda r: r["step"]):
        micro = []
        for _, group in itertools.groupby(step_rows, key=lambda r: r["micro"]):
            sequences = [_row_to_sequence(r) for r in group]
            batch = collate(sequences, pad_id, packed)
            if keep_rows:
                batch["rows"] = sequences
            micro.append(batch)
        yield step, micro
