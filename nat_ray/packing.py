"""Sequence packing: several tokenized examples per training row, with no attention across them.

NAT examples vary a lot in length (StrategyQA: about 270 to 1,100 tokens with the embedded
tokenizer). Padding a micro-batch to its longest example wastes the compute spent on padding;
packing fills each row up to ``max_length`` with whole examples instead.

How examples stay apart: every packed row carries ``position_ids`` that restart at 0 where each
example starts. transformers (5.x, Llama) reads those restarts when the forward is called with
``attention_mask=None`` and ``use_cache=False`` and builds a block-diagonal causal mask
(``masking_utils.find_packed_sequence_indices``); flash-attention uses the same position ids as
varlen boundaries. With ``use_cache=True`` (the config default) it silently does *not*, so the
training step always passes ``use_cache=False``. ``tests/test_packing.py`` proves the isolation
on the real model: per-example losses of a packed row equal the unpacked ones.

The first label of every example is set to ``IGNORE_INDEX``: after the usual one-token shift it
would be predicted from the previous example's last token. (Unpacked, the shift drops it anyway,
so packed and padded losses are the same sum over the same tokens.)

Pure Python; torch is imported only by the collate functions.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from nat_ray.masks import IGNORE_INDEX, TokenizedExample


@dataclass(frozen=True)
class PackedSequence:
    """One training row: whole examples back to back.

    Attributes:
        input_ids: token ids of all examples, concatenated.
        labels: their labels (``IGNORE_INDEX`` where no loss), first label of each example ignored.
        position_ids: 0, 1, ... restarting at every example.
        example_ids: indices (into the packed list) of the examples in this row, in order.
        lengths: token count of each of those examples.
    """

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    example_ids: tuple[int, ...]
    lengths: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def plan_bins(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group example indices into bins of total length <= ``max_length`` (best-fit decreasing).

    Longest first, each into the fullest bin that still has room (ties: the earlier bin), else a
    new bin. Deterministic, O(n log n), and within 11/9 of the optimal bin count.

    Raises:
        ValueError: an example is empty or longer than ``max_length`` (truncate or drop it first).
    """
    for i, n in enumerate(lengths):
        if n <= 0 or n > max_length:
            raise ValueError(f"example {i} has {n} tokens; packing needs 1..max_length={max_length}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # Sorted (room left, bin index); bisect finds the bin with the least room that still fits.
    rooms: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(rooms, (n, -1))
        if at < len(rooms):
            room, b = rooms.pop(at)
            bins[b].append(i)
            bisect.insort(rooms, (room - n, b))
        else:
            bins.append([i])
            bisect.insort(rooms, (max_length - n, len(bins) - 1))
    return bins


def make_row(examples: Sequence[TokenizedExample], example_ids: Sequence[int]) -> PackedSequence:
    """Concatenate examples into one row with restarting position ids."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for i in example_ids:
        ex = examples[i]
        ids.extend(ex.input_ids)
        labels.append(IGNORE_INDEX)  # never predicted across an example boundary
        labels.extend(ex.labels[1:])
        positions.extend(range(len(ex.input_ids)))
    return PackedSequence(
        ids, labels, positions, tuple(example_ids), tuple(len(examples[i].input_ids) for i in example_ids)
    )


def pack_examples(examples: Sequence[TokenizedExample], max_length: int) -> list[PackedSequence]:
    """Pack examples into rows of at most ``max_length`` tokens; every example lands in exactly one row.

    Raises:
        ValueError: an example is empty or longer than ``max_length``.
    """
    bins = plan_bins([len(ex.input_ids) for ex in examples], max_length)
    return [make_row(examples, b) for b in bins]


def single_rows(examples: Sequence[TokenizedExample]) -> list[PackedSequence]:
    """One example per row (no packing), in the same row format."""
    return [make_row(examples, [i]) for i in range(len(examples))]


def packing_efficiency(rows: Sequence[PackedSequence], max_length: int) -> float:
    """Share of ``rows x max_length`` slots that hold real tokens."""
    return sum(len(r) for r in rows) / (len(rows) * max_length) if rows else 0.0


# --------------------------------------------------------------------------------------------
# Collation (torch)


def collate_packed(rows: Sequence[PackedSequence], pad_id: int) -> dict:
    """A micro-batch of packed rows, right-padded to the longest row.

    Padding becomes one more "example" (positions 0, 1, ... and ignored labels), so it is
    isolated like every other one and no 2D attention mask is needed: ``attention_mask`` is
    ``None``, which is what lets transformers read the example boundaries from ``position_ids``.

    Returns:
        ``{"input_ids", "labels", "position_ids"}`` LongTensors of shape (B, T),
        ``"attention_mask": None`` and ``"num_tokens"``: real (non-pad) tokens.
    """
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row)
        ids[b, :n] = torch.tensor(row.input_ids)
        labels[b, :n] = torch.tensor(row.labels)
        positions[b, :n] = torch.tensor(row.position_ids)
        positions[b, n:] = torch.arange(width - n)
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": positions,
        "attention_mask": None,
        "num_tokens": sum(len(r) for r in rows),
    }


def collate_padded(rows: Sequence[PackedSequence], pad_id: int) -> dict:
    """A micro-batch of one-example rows, right-padded with a 2D attention mask (as NAT and HF do).

    Returns:
        ``{"input_ids", "labels", "position_ids", "attention_mask"}``, each (B, T), and
        ``"num_tokens"``: real (non-pad) tokens.

    Raises:
        ValueError: a row holds more than one example (use :func:`collate_packed`).
    """
    import torch

    if any(len(r.example_ids) != 1 for r in rows):
        raise ValueError("collate_padded takes one example per row; packed rows need collate_packed")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row)
        ids[b, :n] = torch.tensor(row.input_ids)
        labels[b, :n] = torch.tensor(row.labels)
        mask[b, :n] = 1
    positions = torch.arange(width).expand(len(rows), width).clone()
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": positions,
        "attention_mask": mask,
        "num_tokens": sum(len(r) for r in rows),
    }


def collate(rows: Sequence[PackedSequence], pad_id: int, packed: bool) -> dict:
    """:func:`collate_packed` when ``packed``, else :func:`collate_padded`."""
    return collate_packed(rows, pad_id) if packed else collate_padded(rows, pad_id)
