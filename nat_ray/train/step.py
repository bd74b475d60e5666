"""The training step in one process, without Ray or DeepSpeed: model, LoRA, loss, schedule.

:mod:`nat_ray.train.worker` wraps these pieces in Ray Train + DeepSpeed; everything here also runs
in a plain process, so a GPU box with only torch, transformers and peft can time the step
(``benchmarks/train_step.py``). Heavy libraries are imported inside the functions that use them.

The loss is the token-weighted mean over the *global* batch (every loss token of every
micro-batch on every worker counts once), not a mean of per-sequence or per-micro-batch means:
each micro-batch contributes ``sum of its token losses / loss tokens in the global batch``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from nat_ray.config import TrainConfig
from nat_ray.core.masks import IGNORE_INDEX
from nat_ray.errors import ConfigError
from nat_ray.train.packing import register_varlen_attention

MODEL_INPUTS = ("input_ids", "position_ids", "attention_mask")


# --------------------------------------------------------------------------------------------
# Settings derived from TrainConfig


def resolve_precision(precision: str, gpu: bool) -> str:
    """``"auto"`` -> bf16 on GPU, fp32 on CPU (bf16 matmuls are far slower on most CPUs)."""
    if precision == "auto":
        return "bf16" if gpu else "fp32"
    return precision


def torch_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def gradient_accumulation_steps(cfg: TrainConfig) -> int:
    """Micro-batches per worker per optimizer step: global / (micro x workers)."""
    return cfg.global_batch_size // (cfg.micro_batch_size * cfg.num_workers)


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Linear warmup length, rounded up as HF ``TrainingArguments.get_warmup_steps`` does."""
    return math.ceil(total_steps * warmup_ratio)


def lr_multiplier(step: int, warmup: int, total: int) -> float:
    """Cosine schedule with linear warmup (HF ``get_cosine_schedule_with_warmup``): 0 -> 1 -> 0.

    Args:
        step: optimizer steps taken so far (the multiplier applies to the next one).
        warmup: warmup steps.
        total: all optimizer steps of the run.
    """
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def cosine_schedule(optimizer, warmup: int, total: int):
    """A ``LambdaLR`` over :func:`lr_multiplier` (its state is just the step count)."""
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, lambda step: lr_multiplier(step, warmup, total))


def sync_schedule(scheduler, warmup: int, total: int) -> None:
    """Set the optimizer's learning rates for the scheduler's current step under *this* schedule.

    A resumed run restores the optimizer's last learning rate, which came from the schedule of
    the run that saved it; when the total steps changed (a larger ``max_steps``), the next step
    must already use the new schedule.
    """
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * lr_multiplier(scheduler.last_epoch, warmup, total)


def attention_for(packing: bool, gpu: bool) -> str:
    """The attention implementation for training: per-example attention for packed rows.

    Packed rows: flash-attention 2 on GPU when installed (varlen from the position ids), else
    :data:`nat_ray.train.packing.VARLEN_ATTENTION`. Padded batches: transformers' SDPA with the mask.
    """
    import importlib.util

    if not packing:
        return "sdpa"
    if gpu and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"

    return register_varlen_attention()


def deepspeed_config(cfg: TrainConfig, gpu: bool) -> dict:
    """The DeepSpeed config dict for this run.

    AdamW (betas 0.9/0.999, eps 1e-8, as the NAT repo's ``auto`` values) is built by DeepSpeed:
    torch's AdamW, or DeepSpeedCPUAdam when the optimizer state is offloaded. The learning-rate
    schedule is passed to ``deepspeed.initialize`` as a client scheduler (:func:`cosine_schedule`).
    """
    precision = resolve_precision(cfg.precision, gpu)
    zero: dict = {
        "stage": cfg.zero_stage,
        "contiguous_gradients": True,
        # Overlapping communication with the backward needs CUDA streams.
        "overlap_comm": gpu,
        "reduce_bucket_size": 5e7,
    }
    if cfg.zero_stage == 3:
        zero.update(
            {
                "stage3_gather_16bit_weights_on_model_save": True,
                "stage3_prefetch_bucket_size": 5e7,
                "stage3_param_persistence_threshold": 1e5,
            }
        )
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": gpu}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": gpu}
    return {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(cfg),
        "gradient_clipping": 1.0,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.learning_rate,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": cfg.weight_decay,
                # torch's AdamW: DeepSpeed's FusedAdam would JIT-compile a CUDA/C++ op first.
                "torch_adam": not cfg.offload_optimizer,
            },
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # the training loop logs progress itself
        "wall_clock_breakdown": False,
    }


# --------------------------------------------------------------------------------------------
# Model and LoRA


def load_model(
    model_path: str,
    precision: str = "fp32",
    attn_implementation: str = "sdpa",
    gradient_checkpointing: bool = False,
    config_overrides: dict | None = None,
    random_init: bool = False,
):
    """A causal LM ready to train: KV cache off (packing needs it off), optional checkpointing.

    Args:
        model_path: local HF checkpoint or hub id (already resolved, see ``models.resolve_model``).
        precision: ``"fp32"`` or ``"bf16"`` weights.
        attn_implementation: transformers attention backend (``sdpa``, ``eager``, ``flash_attention_2``).
        gradient_checkpointing: recompute activations in the backward.
        config_overrides: config fields to change (e.g. a bigger ``num_hidden_layers`` for timing);
            implies random weights.
        random_init: random weights from the config instead of the checkpoint's (for timing).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = torch_dtype(precision)
    if random_init or config_overrides:
        config = AutoConfig.from_pretrained(model_path)
        for key, value in (config_overrides or {}).items():
            if not hasattr(config, key):
                raise ConfigError(f"model config has no field {key!r} to override")
            setattr(config, key, value)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=dtype, attn_implementation=attn_implementation
        )
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def module_suffixes(model) -> set[str]:
    """Last name component of every submodule (what peft matches ``target_modules`` against)."""
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}


def check_lora_targets(model, targets: Sequence[str]) -> None:
    """Raise if a LoRA target module name does not occur in ``model``.

    Raises:
        ConfigError: naming the missing targets and the linear layers that do exist.
    """
    import torch

    names = module_suffixes(model)
    missing = [t for t in targets if t not in names]
    if missing:
        linear = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        raise ConfigError(
            f"train.lora_target_modules has {missing}, which the model lacks; its linear layers are {linear}"
        )


def check_lora_targets_for(model_path: str, targets: Sequence[str]) -> None:
    """:func:`check_lora_targets` on a weightless (meta-device) copy of the model: cheap for any size."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    check_lora_targets(model, targets)


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def build_model(
    cfg: TrainConfig, model_path: str, gpu: bool, attn_implementation: str | None = None, **kwargs
):
    """The model to train: the full model, or the base wrapped in LoRA adapters when ``cfg.mode == "lora"``;
    without dropout for a preference objective (:func:`disable_dropout`).

    Args:
        attn_implementation: ``None`` = :func:`attention_for` ``(cfg.packing, gpu)``.
        kwargs: more :func:`load_model` arguments (``config_overrides``, ``random_init``).

    Raises:
        ConfigError: a LoRA target module the model lacks.
    """
    import torch

    torch.manual_seed(cfg.seed)  # LoRA's A matrices are random
    model = load_model(
        model_path,
        resolve_precision(cfg.precision, gpu),
        attn_implementation or attention_for(cfg.packing, gpu),
        cfg.gradient_checkpointing,
        **kwargs,
    )
    if cfg.mode == "lora":
        from peft import get_peft_model

        check_lora_targets(model, cfg.lora_target_modules)
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
        model = get_peft_model(model, lora_config(cfg))
    if cfg.objective != "sft":
        disable_dropout(model)
    return model


def disable_dropout(model) -> None:
    """Set every dropout to 0: a preference loss compares the policy's log-probabilities with the
    reference's, and dropout noise in one of them (LoRA's dropout, a model's own) drowns the small
    differences it learns from; TRL's DPO and KTO trainers do the same by default."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def count_parameters(model) -> tuple[int, int]:
    """(all parameters, trainable parameters); tied weights once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


# --------------------------------------------------------------------------------------------
# Loss


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}


def num_loss_tokens(batch: dict) -> int:
    """Tokens of a collated micro-batch that carry loss (after the one-token shift)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def loss_logits(model, batch: dict):
    """The model's logits at the positions whose next token carries loss, and those next tokens.

    Logits are computed only there (``logits_to_keep`` with the union of those positions over the
    batch): prompts and observations are most of a NAT sequence, and the vocabulary projection is a
    fifth of the embedded model's FLOPs. SFT's loss and the preference objectives' log-probabilities
    both read them.

    Args:
        model: a causal LM (plain, peft or a DeepSpeed engine around one).
        batch: from :func:`nat_ray.train.packing.collate`, on the model's device: (B, T) tensors.

    Returns:
        ``(logits (B, K, V), targets (B, K), keep (K,))``: position ``keep[k]`` predicts
        ``targets[:, k]`` (``IGNORE_INDEX`` where that row's token carries no loss).
    """
    import torch

    labels = batch["labels"]
    targets = labels[:, 1:]  # (B, T-1): the token each position predicts
    wanted = (targets != IGNORE_INDEX).any(dim=0)  # (T-1,)
    keep = wanted.nonzero().squeeze(-1)
    if keep.numel() == 0:  # no loss token: one position keeps the graph, its target is ignored
        keep = torch.zeros(1, dtype=torch.long, device=labels.device)
    out = model(
        **{k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None},
        use_cache=False,  # with a cache, transformers ignores the packed position ids
        logits_to_keep=keep,
    )
    return out.logits, targets[:, keep], keep


def loss_sum(model, batch: dict):
    """Summed next-token cross-entropy over the loss tokens of one micro-batch (:func:`loss_logits`).

    Returns:
        (loss sum as a 0-d fp32 tensor with grad, number of loss tokens).
    """
    import torch.nn.functional as F

    logits, picked, _ = loss_logits(model, batch)
    logits = logits.float()  # (B, K, V)
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), picked.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total, int((picked != IGNORE_INDEX).sum())


@dataclass(frozen=True)
class StepStats:
    """One optimizer step.

    Attributes:
        loss: token-weighted mean loss over the global batch.
        loss_tokens: loss tokens in the global batch.
        tokens: real (non-pad) tokens processed (all workers, for :func:`deepspeed_step`).
        padded_tokens: tokens including padding processed (likewise).
        seconds: wall time of the step in this process.
        lr: learning rate used by the step.
        metrics: the objective's own figures (KTO's and DPO's rewards and KL; none for SFT).
    """

    loss: float
    loss_tokens: int
    tokens: int
    padded_tokens: int
    seconds: float
    lr: float
    metrics: dict[str, float] = field(default_factory=dict)


def train_step(model, optimizer, scheduler, micro_batches: Sequence[dict], device, clip: float = 1.0):
    """One optimizer step over ``micro_batches`` in a single process (no DeepSpeed, no Ray).

    Returns:
        :class:`StepStats`.
    """
    import torch

    start = time.perf_counter()
    n_global = sum(num_loss_tokens(mb) for mb in micro_batches)
    total = 0.0
    for mb in micro_batches:
        s, _ = loss_sum(model, to_device(mb, device))
        (s / max(1, n_global)).backward()
        total += float(s.detach())
    params = [p for p in model.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, clip)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return StepStats(
        total / max(1, n_global),
        n_global,
        sum(mb["num_tokens"] for mb in micro_batches),
        sum(mb["input_ids"].numel() for mb in micro_batches),
        time.perf_counter() - start,
        lr,
    )


def deepspeed_step(engine, micro_batches: Sequence[dict], device) -> StepStats:
    """One optimizer step with a DeepSpeed engine, on every rank of a data-parallel group.

    DeepSpeed divides the loss by the accumulation steps and averages gradients over ranks; scaling
    each micro-batch's loss sum by ``accumulation x world / loss tokens in the global batch``
    makes the update the gradient of the global token-weighted mean. Loss and token counts in
    the returned stats are summed over all ranks.
    """
    import torch
    import torch.distributed as dist

    start = time.perf_counter()
    world = dist.get_world_size() if dist.is_initialized() else 1
    local_tokens = sum(mb["num_tokens"] for mb in micro_batches)
    local_padded = sum(mb["input_ids"].numel() for mb in micro_batches)
    counts = torch.tensor([float(sum(num_loss_tokens(mb) for mb in micro_batches))], device=device)
    if world > 1:
        dist.all_reduce(counts)
    n_global = max(1.0, float(counts[0]))
    scale = engine.gradient_accumulation_steps() * world / n_global
    lr = engine.get_lr()[0]
    total = 0.0
    for mb in micro_batches:
        s, _ = loss_sum(engine, to_device(mb, device))
        engine.backward(s * scale)
        engine.step()
        total += float(s.detach())
    sums = torch.tensor([total, local_tokens, local_padded], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(sums)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return StepStats(
        float(sums[0]) / n_global,
        int(n_global),
        int(sums[1]),
        int(sums[2]),
        time.perf_counter() - start,
        lr,
    )
