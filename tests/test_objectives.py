"""DPO's and KTO's losses against their formulas written out by hand, the pairing and weights that feed
them, and one training step of each (on a tiny random model in this process) against the same formulas."""

from __future__ import annotations

import math

import pytest
import torch

from nat_ray.core.masks import IGNORE_INDEX
from nat_ray.core.preference import draw_pairs, kto_weights
from nat_ray.train.objectives import (
    LocalEngine,
    Preference,
    dpo_loss,
    kto_loss,
    kto_reference_point,
    mismatched_order,
    mismatched_rows,
    preference_step,
    segment_sums,
    token_logps,
)
from nat_ray.train.packing import PackedSequence, collate_packed, register_varlen_attention


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The oracle: per unpacked sequence, the sum of ``log p(label)`` where ``mask`` is on, from full logits
    (position ``t`` predicts token ``t + 1``), written plainly to check the training code's packed path."""
    logps = torch.log_softmax(logits[:, :-1], dim=-1)
    token = torch.gather(logps, 2, labels[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token * mask[:, 1:].to(token.dtype)).sum(-1)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_dpo_matches_the_formula():
    pc, pr, rc, rr = [-10.0, -4.0], [-12.0, -3.5], [-11.0, -4.2], [-11.5, -4.0]
    beta = 0.1
    expected = [-math.log(sigmoid(beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])))) for i in range(2)]
    loss, chosen, rejected = dpo_loss(
        *(torch.tensor(v, dtype=torch.float64) for v in (pc, pr, rc, rr)), beta=beta
    )
    assert loss.item() == pytest.approx(sum(expected) / 2, abs=1e-5)
    assert chosen.tolist() == pytest.approx([beta * (pc[i] - rc[i]) for i in range(2)], abs=1e-9)
    assert (chosen > rejected).tolist() == [True, False]  # the second pair prefers the rejected answer


def test_kto_matches_the_formula():
    policy, ref = [-5.0, -7.0, -6.0], [-5.5, -6.0, -6.5]
    desirable = [True, False, True]
    pm, rm = [-9.0, -8.0, -7.5], [-9.4, -8.1, -7.0]
    beta, lam_d, lam_u = 0.2, 1.5, 1.0
    z0 = max(0.0, sum(p - r for p, r in zip(pm, rm)) / 3)
    terms = []
    for p, r, d in zip(policy, ref, desirable):
        reward = p - r
        if d:
            terms.append(lam_d - lam_d * sigmoid(beta * (reward - z0)))
        else:
            terms.append(lam_u - lam_u * sigmoid(beta * (z0 - reward)))
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    point = kto_reference_point((t(pm) - t(rm)).sum(), 3)
    loss, rewards = kto_loss(t(policy), t(ref), torch.tensor(desirable), point, beta, lam_d, lam_u)
    assert loss.item() == pytest.approx(sum(terms) / 3, abs=1e-5)
    assert point.item() == pytest.approx(z0, abs=1e-9)
    assert rewards.tolist() == pytest.approx([beta * (p - r) for p, r in zip(policy, ref)], abs=1e-9)


def test_kto_reference_point_is_clamped_at_zero_and_not_differentiated():
    policy = torch.tensor([-1.0, -2.0], requires_grad=True)
    mismatched = torch.tensor([-5.0, -5.0], requires_grad=True)
    point = kto_reference_point((mismatched - torch.tensor([-4.0, -4.0])).sum(), 2)
    loss, _ = kto_loss(
        policy, torch.tensor([-1.5, -1.0]), torch.tensor([True, False]), point,
        beta=0.1, desirable_weight=1.0, undesirable_weight=1.0,
    )  # fmt: skip
    loss.backward()
    assert point.item() == 0.0 and mismatched.grad is None and policy.grad is not None


def test_sequence_logps_sums_only_the_masked_next_token_logprobs():
    logits = torch.randn(1, 4, 5, dtype=torch.float64)
    labels = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1]])
    logp = torch.log_softmax(logits, -1)
    expected = logp[0, 1, 3] + logp[0, 2, 4]  # tokens 2 and 3 (positions 1, 2 predict them)
    assert sequence_logps(logits, labels, mask).item() == pytest.approx(expected.item(), abs=1e-9)


def test_mismatched_pairs_never_pair_an_example_with_itself():
    assert mismatched_order(3) == [1, 2, 0] and mismatched_order(1) == [0]


def test_pairs_are_of_one_question_seeded_and_counted():
    rows = [
        (q, ok, i) for i, (q, ok) in enumerate([("a", 1), ("a", 0), ("a", 0), ("b", 1), ("c", 0), ("c", 1)])
    ]
    pairs, report = draw_pairs(rows, question=lambda r: r[0], positive=lambda r: bool(r[1]), seed=3)
    assert all(p[0] == n[0] and p[1] and not n[1] for p, n in pairs)
    assert (report.questions, report.paired_questions, report.pairs) == (3, 2, 2)
    assert (report.unused_positives, report.unused_negatives) == (1, 1)  # b's positive, one of a's negatives
    assert draw_pairs(rows, lambda r: r[0], lambda r: bool(r[1]), seed=3)[0] == pairs


@pytest.mark.parametrize(
    "n_d, n_u, expected", [(10, 40, (4.0, 1.0)), (40, 10, (1 / 3, 1.0)), (12, 10, (1.0, 1.0))]
)
def test_kto_weights_keep_the_class_ratio_between_one_and_four_thirds(n_d, n_u, expected):
    lam_d, lam_u = kto_weights(n_d, n_u)
    assert (lam_d, lam_u) == pytest.approx(expected)
    assert 1.0 - 1e-9 <= lam_d * n_d / (lam_u * n_u) <= 4 / 3 + 1e-9


# --------------------------------------------------------------------------------------------
# The training step's pieces, on a tiny random model


def _example(prompt: list[int], answer: list[int]) -> tuple[list[int], list[int]]:
    """Token ids and labels of one example: loss on the answer's tokens only."""
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


def _row(*examples: tuple[list[int], list[int]], ids: tuple[int, ...] = (0,)) -> PackedSequence:
    input_ids, labels, positions = [], [], []
    for tokens, labs in examples:
        input_ids += tokens
        labels += [IGNORE_INDEX] + labs[1:]
        positions += list(range(len(tokens)))
    return PackedSequence(input_ids, labels, positions, ids, tuple(len(t) for t, _ in examples))


@pytest.fixture(scope="module")
def tiny_models():
    """Two tiny random causal LMs (policy and reference) with the per-example attention of packed rows."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=register_varlen_attention())
        out.append(model.double())
    return out


def _alone(model, tokens: list[int], labels: list[int]) -> torch.Tensor:
    """An example's sequence log-prob computed on its own (no packing): the formula's input."""
    logits = model(input_ids=torch.tensor([tokens])).logits
    mask = torch.tensor([[label != IGNORE_INDEX for label in labels]])
    return sequence_logps(logits, torch.tensor([tokens]), mask)[0]


A = _example([1, 2, 3], [4, 5, 6])
B = _example([7, 8], [9, 10, 11, 12])
C = _example([13, 14, 15, 16], [17, 18])
D = _example([19, 20], [21, 22, 23])


def test_packed_pairs_give_each_sequence_its_own_logprob(tiny_models):
    policy, _ = tiny_models
    rows = [_row(A, B, ids=(0, 1)), _row(C, ids=(2, 3))]  # the second row: one example, then padding
    batch = collate_packed(rows, pad_id=0)
    with torch.no_grad():
        sums = segment_sums(token_logps(policy, batch), batch["position_ids"], 2)
        expected = [float(_alone(policy, *e)) for e in (A, B, C)] + [0.0]
    assert sums.flatten().tolist() == pytest.approx(expected, abs=1e-9)


def test_mismatched_rows_ask_one_question_and_answer_another():
    rows = [_row(A, ids=(0,)), _row(B, ids=(1,))]
    first, second = mismatched_rows(rows)
    assert first.input_ids == [1, 2, 3, 9, 10, 11, 12] and second.input_ids == [7, 8, 4, 5, 6]
    assert first.labels == [IGNORE_INDEX] * 3 + [9, 10, 11, 12]
    assert first.example_ids == (0,) and first.position_ids == list(range(7))


class PlainEngine:
    """DeepSpeed's engine calls, in one process: the loss it is given is divided by the accumulation."""

    def __init__(self, model, accumulation: int) -> None:
        self.model, self.accumulation = model, accumulation

    def __call__(self, **kwargs):
        return self.model(**kwargs)

    def gradient_accumulation_steps(self) -> int:
        return self.accumulation

    def get_lr(self) -> list[float]:
        return [0.0]

    def backward(self, loss) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> None:
        pass


def _micro(rows: list[PackedSequence]) -> dict:
    return collate_packed(rows, pad_id=0) | {"rows": rows}


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_dpo_step_loss_and_gradient_are_the_formulas_over_the_global_batch(tiny_models):
    policy, ref_model = tiny_models
    pairs = [(A, B), (C, D), (B, C)]
    micro = [_micro([_row(w, lo, ids=(2 * i, 2 * i + 1))]) for i, (w, lo) in enumerate(pairs[:1])]
    micro.append(_micro([_row(w, lo, ids=(2 * i, 2 * i + 1)) for i, (w, lo) in enumerate(pairs[1:], 1)]))
    spec = Preference("dpo", beta=0.5)
    # The loss of a step comes before its update: LocalEngine with a learning rate of 0 leaves the model as is.
    sgd = torch.optim.SGD(policy.parameters(), lr=0.0)
    engine = LocalEngine(policy, sgd, torch.optim.lr_scheduler.LambdaLR(sgd, lambda _: 1.0), accumulation=2)
    stats = preference_step(engine, micro, torch.device("cpu"), spec, lambda b: token_logps(ref_model, b))
    assert engine.micro == 2 and all(p.grad is None for p in policy.parameters())  # stepped and cleared
    with torch.no_grad():
        ref = [(_alone(ref_model, *w), _alone(ref_model, *lo)) for w, lo in pairs]
    pol = [(_alone(policy, *w), _alone(policy, *lo)) for w, lo in pairs]
    terms = [
        -torch.nn.functional.logsigmoid(spec.beta * ((pw - rw) - (pl - rl)))
        for (pw, pl), (rw, rl) in zip(pol, ref)
    ]
    expected = sum(terms) / 3
    assert stats.loss == pytest.approx(expected.item(), abs=1e-5)
    margins = [spec.beta * ((pw - rw) - (pl - rl)).item() for (pw, pl), (rw, rl) in zip(pol, ref)]
    assert stats.metrics["rewards/margin"] == pytest.approx(sum(margins) / 3, abs=1e-5)
    assert stats.metrics["rewards/accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 3)
    step_grads = _grads_of_step(policy, ref_model, micro, spec)
    expected.backward()
    for got, want in zip(step_grads, _grads(policy)):
        assert torch.allclose(got, want, atol=1e-7)


def _grads_of_step(policy, ref_model, micro, spec) -> list[torch.Tensor]:
    policy.zero_grad()
    preference_step(
        PlainEngine(policy, len(micro)), micro, torch.device("cpu"), spec, lambda b: token_logps(ref_model, b)
    )
    grads = _grads(policy)
    policy.zero_grad()
    return grads


def test_kto_step_is_the_formula_with_the_reference_point_from_mismatched_pairs(tiny_models):
    policy, ref_model = tiny_models
    examples = [A, B, C]  # A and C desirable (index < 2 ... and 2 is not): ids 0, 1 desirable
    rows = [_row(e, ids=(i,)) for i, e in enumerate(examples)]
    spec = Preference("kto", beta=0.3, desirable_weight=1.2, undesirable_weight=1.0, positives=2)
    micro = [_micro(rows[:2]), _micro(rows[2:])]
    stats = preference_step(
        PlainEngine(policy, 2), micro, torch.device("cpu"), spec, lambda b: token_logps(ref_model, b)
    )
    with torch.no_grad():
        mism = mismatched_rows(rows)
        z_terms = [
            _alone(policy, r.input_ids, r.labels) - _alone(ref_model, r.input_ids, r.labels) for r in mism
        ]
        z0 = max(0.0, float(sum(z_terms) / 3))
        terms = []
        for i, e in enumerate(examples):
            reward = float(_alone(policy, *e) - _alone(ref_model, *e))
            if i < 2:
                terms.append(1.2 - 1.2 * torch.sigmoid(torch.tensor(0.3 * (reward - z0))).item())
            else:
                terms.append(1.0 - torch.sigmoid(torch.tensor(0.3 * (z0 - reward))).item())
    assert stats.loss == pytest.approx(sum(terms) / 3, abs=1e-5)
    assert stats.metrics["kl"] == pytest.approx(z0, abs=1e-6)
