"""The preference losses, written as their papers state them, on sequence log-probabilities.

A sequence's log-probability is the sum of its tokens' log-probabilities where the loss mask is on:
the agent's own turns, the same masks SFT trains on (observations and the prompt never count).

- DPO (Rafailov et al., 2023): ``-log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l)))`` per pair
  of a preferred (w) and a dispreferred (l) trajectory of one question.
- KTO (Ethayarajh et al., 2024): with the implied reward ``r = pi - ref`` and the reference point
  ``z0 = max(0, mean over the batch of (pi - ref) on mismatched pairs)`` (an estimate of
  ``KL(pi || ref)``, not differentiated), a desirable example scores
  ``v = lambda_D * sigmoid(beta * (r - z0))`` and an undesirable one
  ``v = lambda_U * sigmoid(beta * (z0 - r))``; the loss is the mean of ``lambda_y - v``.

``tests/test_objectives.py`` checks both against the formulas computed by hand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sequence, the sum of ``log p(label)`` over the masked positions.

    Args:
        logits: ``(batch, length, vocab)``; position ``t`` predicts token ``t + 1``.
        labels: ``(batch, length)`` token ids.
        mask: ``(batch, length)``, true where token ``t`` is the model's own (its loss counts).
    """
    logits = logits[:, :-1]
    logps = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    targets = labels[:, 1:]
    token = torch.gather(logps, 2, targets.unsqueeze(-1)).squeeze(-1)
    return (token * mask[:, 1:].to(token.dtype)).sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO's loss over a batch of pairs, and its metrics (rewards, margin, accuracy)."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen - rejected).mean()
    metrics = {
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/margin": (chosen - rejected).mean().item(),
        "rewards/accuracy": (chosen > rejected).float().mean().item(),
    }
    return loss, metrics


def kto_loss(
    policy: torch.Tensor,
    ref: torch.Tensor,
    desirable: torch.Tensor,
    policy_mismatched: torch.Tensor,
    ref_mismatched: torch.Tensor,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """KTO's loss over a batch of labelled examples, and its metrics (KL estimate, rewards).

    Args:
        policy / ref: each example's sequence log-probability under the policy and the reference.
        desirable: bool per example (a positive trajectory).
        policy_mismatched / ref_mismatched: the same of mismatched pairs (one question with another
            example's answer), for the reference point.
        desirable_weight / undesirable_weight: lambda_D and lambda_U
            (:func:`nat_ray.core.preference.kto_weights`).
    """
    z0 = (policy_mismatched - ref_mismatched).mean().clamp(min=0).detach()
    reward = policy - ref
    weight = torch.where(
        desirable, torch.full_like(reward, desirable_weight), torch.full_like(reward, undesirable_weight)
    )
    value = torch.where(desirable, torch.sigmoid(beta * (reward - z0)), torch.sigmoid(beta * (z0 - reward)))
    loss = (weight - weight * value).mean()
    metrics = {"kl": z0.item()}
    if desirable.any():
        metrics["rewards/desirable"] = reward[desirable].mean().item()
    if (~desirable).any():
        metrics["rewards/undesirable"] = reward[~desirable].mean().item()
    return loss, metrics


def mismatched_order(batch: int) -> list[int]:
    """For example ``i``, the index of the example whose answer it is paired with: ``i + 1`` cyclically.

    The KTO paper estimates the KL term on such pairs within a batch; a batch of one has none (its
    estimate is then the example with itself, which the clamp at zero keeps harmless).
    """
    return [(i + 1) % batch for i in range(batch)]
