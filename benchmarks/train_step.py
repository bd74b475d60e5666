"""Throughput of the NAT training step without Ray or DeepSpeed: tokens/s and MFU on one device.

Run from the repository root; a GPU box needs only torch, transformers and peft (no Ray, vLLM or
DeepSpeed)::

    python benchmarks/train_step.py --steps 20 --precision bf16 --peak-tflops 989
    python benchmarks/train_step.py --data runs/rollout/trajectories --examples 512

It builds the model as training does (:func:`nat_ray.train.step.build_model`), packs or pads the
rows as ``train.packing`` says, and times :func:`nat_ray.train.step.train_step` (forward, backward,
clipping, AdamW) after a few untimed warmup steps. Tokens/s counts real (non-pad) tokens; MFU is
6 x parameters FLOPs per token (forward 2N + backward 4N) over the device's dense bf16 peak.
Data: trajectory Parquet (``--data``) or synthetic NAT-like examples. Defaults not named here are
:class:`nat_ray.config.TrainConfig`'s, so a plain run times the step ``nat-ray train`` takes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/train_step.py` from the repo root
    sys.path.insert(0, str(ROOT))

from nat_ray.config import TrainConfig  # noqa: E402
from nat_ray.core.masks import IGNORE_INDEX, TokenizedExample  # noqa: E402
from nat_ray.errors import ConfigError  # noqa: E402
from nat_ray.train.packing import PackedSequence, collate, pack_examples, single_rows  # noqa: E402
from nat_ray.train.step import (  # noqa: E402
    StepStats,
    build_model,
    cosine_schedule,
    count_parameters,
    resolve_precision,
    train_step,
)

log = logging.getLogger("benchmarks.train_step")

DEFAULTS = TrainConfig()
# Dense bf16 peak of common accelerators (TFLOP/s), for MFU when --peak-tflops is not given.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def mfu(tokens_per_second: float, num_params: int, peak_flops: float | None) -> float | None:
    """Model FLOPs utilization with the 6N FLOPs-per-token estimate (forward 2N + backward 4N)."""
    if not peak_flops:
        return None
    return 6.0 * num_params * tokens_per_second / peak_flops


def peak_flops_of(device) -> float | None:
    """Dense bf16 peak FLOP/s of a known CUDA device, else ``None``."""
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def synthetic_examples(
    n: int, mean_length: int, max_length: int, vocab_size: int, seed: int = 0, loss_share: float = 0.35
) -> list[TokenizedExample]:
    """Random examples with NAT-like lengths (log-normal around ``mean_length``) and loss spans."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = max(16, min(max_length, int(rng.lognormvariate(math.log(mean_length), 0.35))))
        ids = [rng.randrange(3, vocab_size) for _ in range(length)]
        labels = [IGNORE_INDEX] * length
        start = length // 3
        while start < length:  # alternate loss spans (the agent) and masked spans (observations)
            span = rng.randrange(8, 64)
            if rng.random() < loss_share / (1 - 1 / 3):
                labels[start : start + span] = ids[start : start + span]
            start += span
        out.append(TokenizedExample(ids, labels[:length]))
    return out


def micro_batches_of(
    rows: Sequence[PackedSequence], micro_batch_size: int, pad_id: int, packed: bool, seed: int = 0
) -> list[dict]:
    """Shuffle rows (seeded) and collate them into micro-batches (the last partial one kept)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [
        collate([rows[i] for i in order[j : j + micro_batch_size]], pad_id, packed)
        for j in range(0, len(order), micro_batch_size)
    ]


def time_training(
    model,
    micro_batches: Sequence[dict],
    device,
    grad_accum: int = 1,
    warmup_steps_untimed: int = 1,
    max_steps: int | None = None,
    learning_rate: float = DEFAULTS.learning_rate,
) -> dict:
    """Train over ``micro_batches`` (``grad_accum`` per step) and time it, skipping warmup steps.

    Returns:
        ``{"steps", "tokens", "padded_tokens", "loss_tokens", "seconds", "tokens_per_s",
        "loss_first", "loss_last"}`` over the timed steps (tokens are real, non-pad tokens).

    Raises:
        ValueError: the micro-batches make no step beyond the warmup steps.
    """
    import torch

    steps = [micro_batches[i : i + grad_accum] for i in range(0, len(micro_batches), grad_accum)]
    if max_steps is not None:
        steps = steps[: warmup_steps_untimed + max_steps]
    if len(steps) <= warmup_steps_untimed:
        raise ValueError(
            f"{len(steps)} steps leave nothing to time after {warmup_steps_untimed} warmup steps"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    scheduler = cosine_schedule(optimizer, 0, len(steps))
    model.train()
    timed: list[StepStats] = []
    losses = []
    for i, mbs in enumerate(steps):
        stats = train_step(model, optimizer, scheduler, mbs, device)
        losses.append(stats.loss)
        if i >= warmup_steps_untimed:
            timed.append(stats)
    seconds = sum(s.seconds for s in timed)
    tokens = sum(s.tokens for s in timed)
    return {
        "steps": len(timed),
        "tokens": tokens,
        "padded_tokens": sum(s.padded_tokens for s in timed),
        "loss_tokens": sum(s.loss_tokens for s in timed),
        "seconds": round(seconds, 3),
        "tokens_per_s": tokens / seconds,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def parse_model_overrides(text: str | None) -> dict:
    """``"hidden_size=2048,num_hidden_layers=24"`` -> ``{"hidden_size": 2048, ...}`` (values as JSON).

    Raises:
        ConfigError: an item without ``=``.
    """
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--model-overrides expects key=value[,key=value], got {item!r}")
        out[key.strip()] = json.loads(value)
    return out


def load_examples(
    paths: Sequence[str], variant: str, tokenizer, max_length: int, limit: int | None, seed: int
) -> list[TokenizedExample]:
    """Tokenized NAT examples from trajectory Parquet (over-long ones truncated)."""
    from nat_ray.core import nat_data, records
    from nat_ray.core.masks import tokenize_example

    rows = [row for path in paths for row in records.read_rows(path)]
    examples, _ = nat_data.build_examples(rows, variant, seed=seed)
    random.Random(seed).shuffle(examples)
    examples = examples[:limit] if limit else examples
    return [tokenize_example(tokenizer, ex.messages, max_length, ex.prompt_messages) for ex in examples]


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/train_step.py",
        description="Time the NAT training step without Ray or DeepSpeed: tokens/s (real tokens, no "
        "padding) and MFU (6 x parameters FLOPs per token). Data: trajectory Parquet (--data) or "
        "synthetic NAT-like examples. Training defaults are nat_ray.config.TrainConfig's.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=DEFAULTS.base_model, help="HF checkpoint path or hub id")
    p.add_argument(
        "--model-overrides",
        help='config fields for a random-weight model, e.g. "hidden_size=2048,num_hidden_layers=24"',
    )
    p.add_argument("--random-init", action="store_true", help="random weights (timing only)")
    p.add_argument("--data", nargs="*", default=[], help="trajectory Parquet files/folders; none = synthetic")
    p.add_argument("--variant", default=DEFAULTS.variant, help="NAT data variant (with --data)")
    p.add_argument("--examples", type=int, default=256, help="examples to use")
    p.add_argument("--mean-length", type=int, default=500, help="synthetic examples' typical length")
    p.add_argument(
        "--max-length", type=int, default=DEFAULTS.max_length, help="tokens per example and per packed row"
    )
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=DEFAULTS.packing)
    p.add_argument("--micro-batch-size", type=int, default=DEFAULTS.micro_batch_size, help="rows per forward")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--mode", choices=("full", "lora"), default=DEFAULTS.mode)
    p.add_argument("--lora-rank", type=int, default=DEFAULTS.lora_rank)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=DEFAULTS.precision)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--attn",
        help="attention implementation (sdpa, eager, flash_attention_2, nat_varlen_sdpa); default: "
        "per-example attention when packing, sdpa otherwise",
    )
    p.add_argument("--gradient-checkpointing", action="store_true", default=DEFAULTS.gradient_checkpointing)
    p.add_argument("--peak-tflops", type=float, help="device peak TFLOP/s for MFU (default: known GPUs)")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="model init, data order and selection")
    p.add_argument("--json", metavar="PATH", help="also write the result here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import torch
    from transformers import AutoTokenizer

    from nat_ray.hardware import cuda_available
    from nat_ray.models import resolve_model
    from nat_ray.train.data import pad_token_id

    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    gpu = args.device == "cuda" or (args.device == "auto" and cuda_available())
    device = torch.device("cuda" if gpu else "cpu")
    model_path = resolve_model(args.model)
    # Validated like any TrainConfig: one worker whose global batch is grad_accum micro-batches.
    cfg = replace(
        DEFAULTS,
        base_model=model_path,
        precision=args.precision,
        mode=args.mode,
        lora_rank=args.lora_rank,
        micro_batch_size=args.micro_batch_size,
        num_workers=1,
        global_batch_size=args.micro_batch_size * args.grad_accum,
        gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed,
        max_length=args.max_length,
        packing=args.packing,
    )
    overrides = parse_model_overrides(args.model_overrides)
    model = build_model(
        cfg, model_path, gpu, args.attn, config_overrides=overrides, random_init=args.random_init
    ).to(device)
    num_params, trainable = count_parameters(model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if args.data:
        examples = load_examples(
            args.data, args.variant, tokenizer, args.max_length, args.examples, args.seed
        )
    else:
        vocab = model.config.get_text_config().vocab_size if hasattr(model, "config") else 32000
        examples = synthetic_examples(args.examples, args.mean_length, args.max_length, vocab, args.seed)
    rows = pack_examples(examples, args.max_length) if args.packing else single_rows(examples)
    mbs = micro_batches_of(rows, args.micro_batch_size, pad_token_id(tokenizer), args.packing, args.seed)
    result = time_training(model, mbs, device, args.grad_accum, args.warmup, args.steps)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops_of(device)
    result.update(
        {
            "device": torch.cuda.get_device_name(device)
            if gpu
            else f"cpu ({torch.get_num_threads()} threads)",
            "precision": resolve_precision(args.precision, gpu),
            "mode": args.mode,
            "packing": args.packing,
            "rows": len(rows),
            "examples": len(examples),
            "num_params": num_params,
            "trainable_params": trainable,
            "pad_share": 1 - result["tokens"] / result["padded_tokens"],
            "mfu": mfu(result["tokens_per_s"], num_params, peak),
            "peak_flops": peak,
        }
    )
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
