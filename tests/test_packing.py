"""Packing: every example once, rows within max_length, and no attention across examples (real model)."""

from __future__ import annotations

import random

import pytest
import torch

from nat_ray.core.masks import IGNORE_INDEX, TokenizedExample
from nat_ray.train.packing import (
    collate,
    collate_packed,
    collate_padded,
    pack_examples,
    packing_efficiency,
    plan_bins,
    single_rows,
)

PAD = 2


def _example(rng: random.Random, length: int) -> TokenizedExample:
    """Random ids; loss on a middle span (like an agent turn between prompt and observation)."""
    ids = [rng.randrange(3, 1000) for _ in range(length)]
    labels = [IGNORE_INDEX] * length
    lo, hi = length // 3, max(length // 3 + 1, 2 * length // 3)
    labels[lo:hi] = ids[lo:hi]
    return TokenizedExample(ids, labels)


def _examples(lengths, seed=0):
    rng = random.Random(seed)
    return [_example(rng, n) for n in lengths]


def test_plan_bins_hand_worked():
    # Best-fit decreasing: 6 opens bin 0, 5 opens bin 1, 4 fits bin 0 (room 4), 3 fits bin 1, 2 fits bin 1.
    assert plan_bins([3, 6, 2, 5, 4], 10) == [[1, 4], [3, 0, 2]]


@pytest.mark.parametrize("seed", range(5))
def test_every_example_lands_once_and_rows_fit(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 300) for _ in range(200)]
    examples = _examples(lengths, seed)
    rows = pack_examples(examples, 512)
    placed = sorted(i for row in rows for i in row.example_ids)
    assert placed == list(range(len(examples)))
    assert all(len(row) <= 512 for row in rows)
    assert sum(len(r) for r in rows) == sum(lengths)
    # Best-fit decreasing stays close to the lower bound on rows.
    assert len(rows) <= -(-sum(lengths) // 512) * 11 // 9 + 1
    assert packing_efficiency(rows, 512) > 0.8


def test_row_contents_positions_and_boundary_labels():
    examples = _examples([5, 3])
    (row,) = pack_examples(examples, 8)
    first, second = (examples[i] for i in row.example_ids)
    assert row.input_ids == first.input_ids + second.input_ids
    assert row.position_ids == list(range(len(first.input_ids))) + list(range(len(second.input_ids)))
    # The first label of each example is never a target (it would be predicted across the boundary).
    assert row.labels == [IGNORE_INDEX, *first.labels[1:], IGNORE_INDEX, *second.labels[1:]]


def test_overlong_or_empty_example_is_rejected():
    with pytest.raises(ValueError, match="max_length=4"):
        pack_examples(_examples([5]), 4)
    with pytest.raises(ValueError, match="0 tokens"):
        plan_bins([0], 4)


def test_collate_packed_pads_as_its_own_segment():
    examples = _examples([4, 3, 2])
    rows = pack_examples(examples, 7)  # [4+3], [2]
    batch = collate_packed(rows, PAD)
    assert batch["attention_mask"] is None
    assert batch["input_ids"].shape == (2, 7)
    assert batch["position_ids"][1].tolist() == [0, 1, 0, 1, 2, 3, 4]
    assert batch["input_ids"][1, 2:].eq(PAD).all() and batch["labels"][1, 2:].eq(IGNORE_INDEX).all()
    assert batch["num_tokens"] == 9


def test_collate_padded_masks_padding():
    rows = single_rows(_examples([4, 2]))
    batch = collate_padded(rows, PAD)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"][1, 2:].eq(IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="one example per row"):
        collate_padded(pack_examples(_examples([2, 2]), 4), PAD)


def test_segments_split_where_positions_restart():
    from nat_ray.train.packing import segments

    assert segments(torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])) is None  # nothing packed
    assert segments(torch.tensor([[0, 1, 0, 1], [0, 1, 2, 0]])) == [[(0, 2), (2, 4)], [(0, 3), (3, 4)]]


# --------------------------------------------------------------------------------------------
# The real embedded model: packed == unpacked


@pytest.fixture(scope="module")
def loaded(embedded_path):
    from nat_ray.train.step import load_model

    return load_model(embedded_path, "fp32").eval()


@pytest.fixture(params=["sdpa", "varlen"])
def model(request, loaded):
    """The embedded model with transformers' SDPA (packed mask from position ids) or our varlen SDPA."""
    from nat_ray.train.packing import register_varlen_attention

    loaded.set_attn_implementation(register_varlen_attention() if request.param == "varlen" else "sdpa")
    return loaded


@pytest.fixture(scope="module")
def nat_examples(tokenizer):
    """Three real NAT-style chats, tokenized with loss masks from the core."""
    from nat_ray.core.masks import tokenize_example

    chats = []
    for k, question in enumerate(["Is a cat a mammal?", "Was Rome built in a day?", "Can fish fly?"]):
        turns = [
            {"role": "user", "content": "Answer with search[...] and finish[...]."},
            {"role": "assistant", "content": "I've understood your instruction, start please."},
            {"role": "user", "content": f"Question: {question}"},
            {"role": "assistant", "content": f"Thought: look it up.\nAction: search[{question}]"},
            {"role": "user", "content": "Observation: " + "some text " * (3 + 4 * k)},
            {"role": "assistant", "content": "Thought: done.\nAction: finish[yes]"},
        ]
        chats.append(tokenize_example(tokenizer, turns, None, prompt_messages=3))
    return chats


def _per_example_losses(model, batch, rows):
    """Summed loss of each example of each row, from one forward of the batch."""
    import torch.nn.functional as F

    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=batch["attention_mask"],
            use_cache=False,
        ).logits.float()
    ce = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )  # (B, T-1): loss of predicting token t+1
    out = {}
    for b, row in enumerate(rows):
        start = 0
        for ex_id, n in zip(row.example_ids, row.lengths):
            out[ex_id] = float(ce[b, start : start + n - 1].sum())  # targets start+1 .. start+n-1
            start += n
    return out


def test_packed_batch_gives_the_same_per_example_loss(model, nat_examples):
    unpacked_rows = single_rows(nat_examples)
    alone = {}
    for row in unpacked_rows:  # each example alone: no padding, no neighbours
        alone.update(_per_example_losses(model, collate([row], PAD, packed=False), [row]))
    packed_rows = pack_examples(nat_examples, 4096)
    assert len(packed_rows) == 1 and len(packed_rows[0].example_ids) == 3
    packed = _per_example_losses(model, collate(packed_rows, PAD, packed=True), packed_rows)
    padded = _per_example_losses(model, collate(unpacked_rows, PAD, packed=False), unpacked_rows)
    for i in alone:
        assert packed[i] == pytest.approx(alone[i], rel=1e-5, abs=1e-4)
        assert padded[i] == pytest.approx(alone[i], rel=1e-5, abs=1e-4)


def test_training_loss_is_the_same_packed_and_padded(model, nat_examples):
    from nat_ray.train.step import loss_sum

    with torch.no_grad():
        s_packed, n_packed = loss_sum(model, collate(pack_examples(nat_examples, 4096), PAD, True))
        s_padded, n_padded = loss_sum(model, collate(single_rows(nat_examples), PAD, False))
    assert n_packed == n_padded == sum(ex.num_loss_tokens for ex in nat_examples)
    assert float(s_packed) / n_packed == pytest.approx(float(s_padded) / n_padded, rel=1e-5)


def test_a_neighbour_cannot_change_an_examples_logits(model, nat_examples):
    """Swap the first example of a packed row for random tokens: the second's logits do not move."""
    a, b = nat_examples[0], nat_examples[1]
    noise = TokenizedExample([random.Random(1).randrange(3, 1000) for _ in a.input_ids], a.labels)
    logits = []
    for first in (a, noise):
        rows = pack_examples([first, b], 4096)
        batch = collate(rows, PAD, packed=True)
        order = rows[0].example_ids
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        start = 0 if order[0] == 1 else len(first.input_ids)
        logits.append(out.logits[0, start : start + len(b.input_ids)])
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


def test_masked_tokens_never_affect_the_loss(model, nat_examples):
    """Masked tokens after the last target (the final observation) can be anything: same loss."""
    from nat_ray.train.step import loss_sum

    ex = nat_examples[2]
    last = max(i for i, label in enumerate(ex.labels) if label != IGNORE_INDEX)
    assert last < len(ex.input_ids) - 1  # the chat ends with masked template tokens
    rng = random.Random(3)
    changed = TokenizedExample(
        ex.input_ids[: last + 1] + [rng.randrange(3, 1000) for _ in ex.input_ids[last + 1 :]], ex.labels
    )
    with torch.no_grad():
        base, n1 = loss_sum(model, collate(single_rows([ex]), PAD, False))
        other, n2 = loss_sum(model, collate(single_rows([changed]), PAD, False))
    assert n1 == n2 == ex.num_loss_tokens - (ex.labels[0] != IGNORE_INDEX)
    assert float(other) == pytest.approx(float(base), rel=1e-6)


def test_loss_counts_exactly_the_labelled_targets(model, nat_examples):
    """loss_sum == sum of -log p(label) over labelled positions, from the full logits by hand."""
    from nat_ray.train.step import loss_sum

    ex = nat_examples[1]
    batch = collate(single_rows([ex]), PAD, False)
    with torch.no_grad():
        got, n = loss_sum(model, batch)
        logp = model(input_ids=batch["input_ids"], use_cache=False).logits.float().log_softmax(-1)[0]
    want = -sum(
        float(logp[t - 1, ex.labels[t]]) for t in range(1, len(ex.labels)) if ex.labels[t] != IGNORE_INDEX
    )
    assert n == sum(1 for label in ex.labels[1:] if label != IGNORE_INDEX)
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_padding_content_never_affects_the_loss(model, nat_examples):
    from nat_ray.train.step import loss_sum

    rows = single_rows(nat_examples)
    batch = collate(rows, PAD, packed=False)
    noisy = dict(batch)
    noisy["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 999)
    with torch.no_grad():
        a, _ = loss_sum(model, batch)
        b, _ = loss_sum(model, noisy)
    assert float(a) == pytest.approx(float(b), rel=1e-6)
