"""Sequence packing: several tokenized examples per training row, with no attention across them.

NAT examples vary a lot in length (StrategyQA: about 270 to 1,100 tokens with the embedded
tokenizer). Padding a micro-batch to its longest example wastes the compute spent on padding;
packing fills each row up to ``max_length`` with whole examples instead.

How examples stay apart: every packed row carries ``position_ids`` that restart at 0 where each
example starts, and the forward gets ``attention_mask=None``. Two attention paths read them:

- transformers' own (``sdpa``, ``eager``; 5.x, Llama): it detects the restarts
  (``masking_utils.find_packed_sequence_indices``) and builds a block-diagonal causal mask, but
  only when ``use_cache=False``; with the config default ``use_cache=True`` it silently does
  not, so the training step always passes ``use_cache=False``. On CPU a masked SDPA runs the
  math kernel, which materializes every (T x T) score matrix: slow and memory-hungry.
- :data:`VARLEN_ATTENTION` (registered by :func:`register_varlen_attention`): causal SDPA per
  example (the flash kernel, no mask, no cross-example scores), like flash-attention's varlen
  path on GPU. Training uses it for packed rows unless flash-attention 2 is installed.

``tests/test_packing.py`` proves the isolation on the real model for both: per-example losses
of a packed row equal the unpacked ones, and a neighbour's tokens cannot move an example's logits.

The first label of every example is set to ``IGNORE_INDEX``: after the usual one-token shift it
would be predicted from the previous example's last token. (Unpacked, the shift drops it anyway,
so packed and padded losses are the same sum over the same tokens.)

Pure Python; torch is imported only by the collate functions.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from nat_ray.core.masks import IGNORE_INDEX, TokenizedExample


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
# Attention over packed rows (torch, transformers)

VARLEN_ATTENTION = "nat_varlen_sdpa"


def example_starts(position_ids):
    """``(B, T)`` bool: true where an example begins (column 0, and wherever position ids do not count
    up by one: a packed row's restart, or its padding)."""
    import torch

    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = torch.diff(position_ids, dim=-1) != 1
    return starts


def segments(position_ids) -> list[list[tuple[int, int]]] | None:
    """``[(start, end), ...]`` per row, split where position ids do not count up by one.

    Returns:
        ``None`` when every row is a single sequence (nothing packed).
    """
    starts = example_starts(position_ids)
    if not bool(starts[:, 1:].any()):
        return None
    width = position_ids.shape[1]
    out = []
    for row in starts.tolist():
        cuts = [t for t, s in enumerate(row) if s] + [width]
        out.append(list(zip(cuts[:-1], cuts[1:])))
    return out


def varlen_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function: causal SDPA within each packed example, none across.

    Shapes: query (B, H, T, D), key/value (B, H_kv, T, D) -> output (B, T, H, D). Rows without
    position restarts (and any call without ``position_ids``) go to transformers' ``sdpa``
    unchanged, with whatever mask it built.
    """
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    spans = segments(position_ids) if position_ids is not None and query.shape[2] > 1 else None
    if spans is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    rows = []
    for b, row_spans in enumerate(spans):
        parts = [
            F.scaled_dot_product_attention(
                query[b : b + 1, :, s:e],
                key[b : b + 1, :, s:e],
                value[b : b + 1, :, s:e],
                dropout_p=dropout,
                scale=scaling,
                is_causal=e - s > 1,
            )
            for s, e in row_spans
        ]
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def register_varlen_attention() -> str:
    """Register :func:`varlen_sdpa_attention` with transformers (idempotent); returns its name.

    Its mask function is SDPA's, so padded batches with a 2D attention mask still get their mask.
    """
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(VARLEN_ATTENTION, varlen_sdpa_attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, sdpa_mask)
    return VARLEN_ATTENTION


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
