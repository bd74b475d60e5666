"""DPO's and KTO's losses against their formulas written out by hand, and the pairing/weights that feed them."""

from __future__ import annotations

import math

import pytest
import torch

from nat_ray.core.preference import draw_pairs, kto_weights
from nat_ray.train.objectives import dpo_loss, kto_loss, mismatched_order, sequence_logps


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_dpo_matches_the_formula():
    pc, pr, rc, rr = [-10.0, -4.0], [-12.0, -3.5], [-11.0, -4.2], [-11.5, -4.0]
    beta = 0.1
    expected = [-math.log(sigmoid(beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])))) for i in range(2)]
    loss, metrics = dpo_loss(*(torch.tensor(v, dtype=torch.float64) for v in (pc, pr, rc, rr)), beta=beta)
    assert loss.item() == pytest.approx(sum(expected) / 2, abs=1e-5)
    assert metrics["rewards/chosen"] == pytest.approx(
        beta * ((pc[0] - rc[0]) + (pc[1] - rc[1])) / 2, abs=1e-5
    )
    assert metrics["rewards/accuracy"] == 0.5  # the second pair prefers the rejected answer


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
    loss, metrics = kto_loss(t(policy), t(ref), torch.tensor(desirable), t(pm), t(rm), beta, lam_d, lam_u)
    assert loss.item() == pytest.approx(sum(terms) / 3, abs=1e-5)
    assert metrics["kl"] == pytest.approx(z0, abs=1e-5)


def test_kto_reference_point_is_clamped_at_zero_and_not_differentiated():
    policy = torch.tensor([-1.0, -2.0], requires_grad=True)
    mismatched = torch.tensor([-5.0, -5.0], requires_grad=True)
    loss, metrics = kto_loss(
        policy, torch.tensor([-1.5, -1.0]), torch.tensor([True, False]), mismatched, torch.tensor([-4.0, -4.0]),
        beta=0.1, desirable_weight=1.0, undesirable_weight=1.0,
    )  # fmt: skip
    loss.backward()
    assert metrics["kl"] == 0.0 and mismatched.grad is None and policy.grad is not None


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
