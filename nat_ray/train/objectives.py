"""The preference objectives (``train.objective``: kto, dpo): their losses as the papers state them, and
one optimizer step of each under DeepSpeed.

A sequence's log-probability is the sum of its tokens' log-probabilities where the loss mask is on:
the agent's own turns, the same masks SFT trains on (observations and the prompt never count).

- DPO (Rafailov et al., 2023): ``-log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l)))`` per pair
  of a preferred (w) and a dispreferred (l) trajectory of one question.
- KTO (Ethayarajh et al., 2024): with the implied reward ``r = pi - ref`` and the reference point
  ``z0 = max(0, mean over the batch of (pi - ref) on mismatched pairs)`` (an estimate of
  ``KL(pi || ref)``, not differentiated), a desirable example scores
  ``v = lambda_D * sigmoid(beta * (r - z0))`` and an undesirable one
  ``v = lambda_U * sigmoid(beta * (z0 - r))``; the loss is the mean of ``lambda_y - v``.

Rows (:mod:`nat_ray.train.prepare`): a DPO row is one pair packed as two examples (the positive
first; position ids restart, so no attention crosses them), a KTO row is one example. Both are
collated as packed rows, so every sequence's log-probability is a sum over its segment.

The reference model is the policy before training: with LoRA the same weights with the adapter
disabled (no second copy), with full fine-tuning a frozen copy in its own DeepSpeed engine (sharded
by ZeRO-3 like the policy); :mod:`nat_ray.train.worker` builds it. ``tests/test_objectives.py``
checks the losses against the formulas computed by hand.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nat_ray.core.masks import IGNORE_INDEX
from nat_ray.train.packing import PackedSequence, collate_packed, example_starts
from nat_ray.train.step import StepStats, loss_logits, num_loss_tokens, to_device

# --------------------------------------------------------------------------------------------
# The losses


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's loss, the mean over a batch of pairs.

    Returns:
        ``(loss, chosen rewards, rejected rewards)``; a reward is ``beta * (pi - ref)``, detached.
    """
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen - rejected).mean()
    return loss, chosen.detach(), rejected.detach()


def kto_reference_point(mismatched_reward_sum: torch.Tensor, count: int | float) -> torch.Tensor:
    """KTO's ``z0``: the mean of ``pi - ref`` over the batch's mismatched pairs, at least 0, detached.

    Taken as a sum and a count so that data-parallel ranks can add theirs up first.
    """
    return (mismatched_reward_sum / max(1.0, float(count))).clamp(min=0).detach()


def kto_loss(
    policy: torch.Tensor,
    ref: torch.Tensor,
    desirable: torch.Tensor,
    reference_point: torch.Tensor,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO's loss, the mean over a batch of labelled examples.

    Args:
        policy / ref: each example's sequence log-probability under the policy and the reference.
        desirable: bool per example (a positive trajectory).
        reference_point: ``z0`` (:func:`kto_reference_point`).
        desirable_weight / undesirable_weight: lambda_D and lambda_U
            (:func:`nat_ray.core.preference.kto_weights`).

    Returns:
        ``(loss, rewards)``; a reward is ``beta * (pi - ref)``, detached.
    """
    reward = policy - ref
    weight = torch.where(
        desirable, torch.full_like(reward, desirable_weight), torch.full_like(reward, undesirable_weight)
    )
    value = torch.where(
        desirable,
        torch.sigmoid(beta * (reward - reference_point)),
        torch.sigmoid(beta * (reference_point - reward)),
    )
    loss = (weight - weight * value).mean()
    return loss, (beta * reward).detach()


def mismatched_order(batch: int) -> list[int]:
    """For example ``i``, the index of the example whose answer it is paired with: ``i + 1`` cyclically.

    The KTO paper estimates the KL term on such pairs within a batch; a batch of one has none (its
    estimate is then the example with itself, which the clamp at zero keeps harmless).
    """
    return [(i + 1) % batch for i in range(batch)]


# --------------------------------------------------------------------------------------------
# Rows -> sequence log-probabilities


def first_loss_position(labels: Sequence[int]) -> int:
    """Where the model's first own token is: everything before it is the prompt."""
    for t, label in enumerate(labels):
        if label != IGNORE_INDEX:
            return t
    raise ValueError("the row has no loss token")


def mismatched_rows(rows: Sequence[PackedSequence]) -> list[PackedSequence]:
    """KTO's mismatched pairs: row ``i``'s prompt followed by row ``mismatched_order[i]``'s answer.

    Rows are one-example rows; the answer is everything from the other row's first own token on
    (its turns and observations, with its loss mask), so the pair asks one question and answers
    another, as the KTO paper's KL estimate wants.
    """
    out = []
    for i, j in enumerate(mismatched_order(len(rows))):
        head, tail = rows[i], rows[j]
        cut = first_loss_position(head.labels)
        start, end = first_loss_position(tail.labels), tail.lengths[0]
        ids = head.input_ids[:cut] + tail.input_ids[start:end]
        labels = [IGNORE_INDEX] * cut + tail.labels[start:end]
        out.append(PackedSequence(ids, labels, list(range(len(ids))), head.example_ids[:1], (len(ids),)))
    return out


def token_logps(model, batch: dict) -> torch.Tensor:
    """``(B, T)``: at position ``t``, ``log p(token t)`` where token ``t`` carries loss, else 0.

    From :func:`nat_ray.train.step.loss_logits`: logits only where the next token carries loss.
    """
    logits, picked, keep = loss_logits(model, batch)
    logps = torch.log_softmax(
        logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1
    )  # (B, K, V)
    wanted = picked != IGNORE_INDEX
    token = torch.gather(logps, 2, picked.clamp(min=0).unsqueeze(-1)).squeeze(-1) * wanted
    labels = batch["labels"]
    full = torch.zeros(labels.shape, dtype=token.dtype, device=labels.device)
    full[:, keep + 1] = token
    return full


def segment_sums(values: torch.Tensor, position_ids: torch.Tensor, segments: int) -> torch.Tensor:
    """``(B, segments)``: per row, the sum of ``values`` over each of its first ``segments`` examples.

    Examples begin where :func:`nat_ray.train.packing.example_starts` says (a packed row's restart).
    """
    index = (example_starts(position_ids).long().cumsum(-1) - 1).clamp(
        max=segments
    )  # the padding tail falls in the last bin
    out = torch.zeros((values.shape[0], segments + 1), dtype=values.dtype, device=values.device)
    out.scatter_add_(1, index, values)
    return out[:, :segments]


# --------------------------------------------------------------------------------------------
# One step


@dataclass(frozen=True)
class Preference:
    """A preference objective's settings, as the worker needs them.

    Attributes:
        objective: ``"kto"`` or ``"dpo"``.
        beta: the objective's beta.
        desirable_weight / undesirable_weight: KTO's lambda_D and lambda_U.
        positives: KTO: rows whose example index is below this are desirable (selection order).
        pad_id: pads the mismatched rows KTO builds.
    """

    objective: str
    beta: float
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    positives: int = 0
    pad_id: int = 0


Reference = Callable[[dict], torch.Tensor]  # a collated batch -> token_logps under the reference


class LocalEngine:
    """The part of DeepSpeed's engine :func:`preference_step` calls, over a plain model and optimizer.

    It runs the preference step in one process without Ray or DeepSpeed (``benchmarks/train.py``, a
    GPU box with only torch): a backward divides by the accumulation as DeepSpeed does, and every
    ``accumulation``-th step clips the gradients, steps the optimizer and the schedule.
    """

    def __init__(self, model, optimizer, scheduler, accumulation: int = 1, clip: float = 1.0) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.accumulation, self.clip, self.micro = accumulation, clip, 0

    def __call__(self, **kwargs):
        return self.model(**kwargs)

    def gradient_accumulation_steps(self) -> int:
        return self.accumulation

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.accumulation:
            return
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def preference_step(
    engine, micro_batches: Sequence[dict], device, spec: Preference, reference: Reference
) -> StepStats:
    """One optimizer step of KTO or DPO with a DeepSpeed engine, on every rank of a data-parallel group.

    The loss is the mean over the global batch's rows (pairs for DPO, examples for KTO): each
    micro-batch's mean is scaled by its share of the global rows, times ``accumulation x world``,
    which DeepSpeed divides out. KTO's ``z0`` is estimated once per step, before any update, from the
    mismatched pairs of this rank's rows, averaged over all ranks. Each micro-batch carries its rows
    under ``"rows"`` (:func:`nat_ray.train.data.step_batches` with ``keep_rows``).

    Returns:
        :class:`StepStats` with the objective's metrics (rewards, margin, accuracy, KL) averaged
        over the global batch.
    """
    import torch.distributed as dist

    start = time.perf_counter()
    world = dist.get_world_size() if dist.is_initialized() else 1

    def all_sum(values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(t)
        return t.tolist()

    local_rows = sum(len(mb["rows"]) for mb in micro_batches)
    n_global = max(1.0, all_sum([float(local_rows)])[0])
    z0 = _kto_z0(engine, micro_batches, device, spec, reference, all_sum) if spec.objective == "kto" else None
    scale = engine.gradient_accumulation_steps() * world / n_global
    lr = engine.get_lr()[0]
    total, loss_tokens = 0.0, 0
    sums = {"a": 0.0, "b": 0.0, "na": 0.0, "nb": 0.0, "won": 0.0}
    segments = 2 if spec.objective == "dpo" else 1  # a DPO row is a pair, a KTO row one example
    for mb in micro_batches:
        rows = mb["rows"]
        batch = to_device(mb, device)
        with torch.no_grad():
            ref = segment_sums(reference(batch), batch["position_ids"], segments)
        policy = segment_sums(token_logps(engine, batch), batch["position_ids"], segments)
        if spec.objective == "dpo":
            loss, chosen, rejected = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], spec.beta)
            sums["a"] += float(chosen.sum())
            sums["b"] += float(rejected.sum())
            sums["na"] += len(rows)
            sums["nb"] += len(rows)
            sums["won"] += float((chosen > rejected).sum())
        else:
            desirable = torch.tensor([r.example_ids[0] < spec.positives for r in rows], device=device)
            loss, rewards = kto_loss(
                policy[:, 0],
                ref[:, 0],
                desirable,
                z0,
                spec.beta,
                spec.desirable_weight,
                spec.undesirable_weight,
            )
            sums["a"] += float(rewards[desirable].sum())
            sums["b"] += float(rewards[~desirable].sum())
            sums["na"] += float(desirable.sum())
            sums["nb"] += float((~desirable).sum())
        engine.backward(loss * len(rows) * scale)
        engine.step()
        total += float(loss.detach()) * len(rows)
        loss_tokens += num_loss_tokens(mb)
    local_tokens = sum(mb["num_tokens"] for mb in micro_batches)
    local_padded = sum(mb["input_ids"].numel() for mb in micro_batches)
    keys = ("a", "b", "na", "nb", "won")
    summed = all_sum([total, local_tokens, local_padded, loss_tokens, *(sums[k] for k in keys)])
    total, tokens, padded, loss_tokens = summed[:4]
    s = dict(zip(keys, summed[4:]))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return StepStats(
        total / n_global,
        int(loss_tokens),
        int(tokens),
        int(padded),
        time.perf_counter() - start,
        lr,
        _metrics(spec.objective, s, z0),
    )


def _kto_z0(engine, micro_batches, device, spec: Preference, reference: Reference, all_sum) -> torch.Tensor:
    """KTO's reference point for this step: the mismatched pairs of this rank's rows, summed over ranks."""
    rows = [r for mb in micro_batches for r in mb["rows"]]
    size = max(len(mb["rows"]) for mb in micro_batches)
    mismatched = mismatched_rows(rows)
    total = 0.0
    with torch.no_grad():
        for at in range(0, len(mismatched), size):
            batch = to_device(collate_packed(mismatched[at : at + size], spec.pad_id), device)
            policy = segment_sums(token_logps(engine, batch), batch["position_ids"], 1)
            ref = segment_sums(reference(batch), batch["position_ids"], 1)
            total += float((policy - ref).sum())
    summed, count = all_sum([total, float(len(mismatched))])
    return kto_reference_point(torch.tensor(summed, device=device), count)


def _metrics(objective: str, s: dict, z0: torch.Tensor | None) -> dict[str, float]:
    """The step's objective metrics from global sums (``a``/``b``: chosen/rejected or desirable/undesirable)."""
    mean = lambda total, n: total / n if n else 0.0  # noqa: E731
    if objective == "dpo":
        chosen, rejected = mean(s["a"], s["na"]), mean(s["b"], s["nb"])
        return {
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margin": chosen - rejected,
            "rewards/accuracy": mean(s["won"], s["na"]),
        }
    out = {"kl": float(z0) if z0 is not None else 0.0}
    if s["na"]:  # a step without desirable (or undesirable) examples has no mean to report
        out["rewards/desirable"] = s["a"] / s["na"]
    if s["nb"]:
        out["rewards/undesirable"] = s["b"] / s["nb"]
    return out
