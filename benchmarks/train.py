"""Benchmark of stage 2, training (issue 7): packed rows against padded batches, side by side.

Run from the repository root (no arguments; about 10-15 minutes on the 2-core CPU machine)::

    .venv/bin/python benchmarks/train.py        # writes benchmarks/results/train.json

It times :func:`nat_ray.train.step.train_step` (forward, backward, clipping, AdamW) without Ray
or DeepSpeed: the question is what packing buys, not what Ray costs. Both arms use:

- the same data: NAT examples (``nat`` variant) of the GPT-3.5 StrategyQA trajectories the NAT
  repo ships (``shared/data``, converted with :mod:`nat_ray.import_nat`), tokenized with the loss
  masks of :mod:`nat_ray.core.masks`, ``max_length`` 1024; the same examples in both arms;
- the same model and precision (the embedded SmolLM2-135M; fp32 on CPU, bf16 on GPU), a fresh
  copy per arm, AdamW at the paper's 5e-5, one micro-batch per optimizer step;
- the same ``micro_batch_size`` = 2: two *examples* right-padded to the longer one with a 2D
  attention mask (transformers' SDPA, as the NAT repo / HF Trainer batch them), against two
  *packed rows* of up to 1024 tokens (best-fit decreasing) with per-example attention
  (:data:`nat_ray.train.packing.VARLEN_ATTENTION`). This is ``train.packing`` on vs off with every
  other setting equal.

The two arms run interleaved in one process -- after each optimizer step the arm that is behind
in examples takes the next -- so both see the same load on a shared machine. The first step of
each arm is warmup and not timed. Tokens/s counts real (non-pad) tokens in both arms.
``packed_over_padded`` = packed tokens/s / padded tokens/s.

``dpo_step`` (issue 27): what a DPO step costs over an SFT step on the same pairs. Pairs of one
question's positive and negative trajectory (the same StrategyQA trajectories, the plain prompt),
each packed as one row as training packs them; two fresh full-fine-tuning copies, interleaved, one
pair per optimizer step: SFT's :func:`~nat_ray.train.step.train_step` on the row against
:func:`~nat_ray.train.objectives.preference_step` (policy forward and backward, plus the frozen
reference's forward over both sequences). ``dpo_over_sft`` = DPO's seconds per pair / SFT's; a
forward is about a third of a forward and backward, so the arithmetic says about 4/3.

On a GPU it also reports ``mfu``: 6 x parameters FLOPs per token (forward 2N + backward 4N)
over the device's dense bf16 peak, for the packed arm, and for a random-weight ~1B Llama built
from the embedded model's config (a 135M model cannot fill a GPU).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/train.py` from the repo root
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from machine_info import cpu_model, memory_gib  # noqa: E402 - beside this script
from train_step import mfu, micro_batches_of, peak_flops_of, synthetic_examples  # noqa: E402 - beside this script

from nat_ray.config import TrainConfig  # noqa: E402
from nat_ray.core.masks import tokenize_example  # noqa: E402
from nat_ray.train.data import pad_token_id  # noqa: E402
from nat_ray.train.packing import pack_examples, packing_efficiency, single_rows  # noqa: E402
from nat_ray.train.step import build_model, cosine_schedule, count_parameters, train_step  # noqa: E402

log = logging.getLogger("benchmarks.train")

RESULTS = ROOT / "benchmarks" / "results" / "train.json"
MAX_LENGTH = 1024
MICRO_BATCH = 2
CPU_PAIRS = 8  # DPO against SFT: pairs per arm (the first is warmup)
GPU_PAIRS = 64
CPU_EXAMPLES = 24  # ~14k tokens per arm: minutes at ~50 tokens/s
GPU_EXAMPLES = 512
# One thread per process on this shared 2-core machine: with two, OpenMP threads spin against
# other jobs and a step's time varies tenfold. Both arms run under the same setting.
CPU_THREADS = 1
SEED = 0
# A ~1.2B Llama (random weights) for MFU on a GPU; the vocabulary is the embedded model's.
LLAMA_1B = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 128,
}


def machine(gpu: bool) -> dict:
    import transformers

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": memory_gib(),
        "gpu": torch.cuda.get_device_name(0) if gpu else None,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "note": "other processes may share these cores: compare load_average_at_start and _at_end",
    }


def nat_rows() -> list[dict] | None:
    """The NAT repo's GPT-3.5 StrategyQA trajectory rows, or ``None`` (warned) on a machine without them."""
    from nat_ray.import_nat import import_nat, resolve_inputs

    try:
        return import_nat(resolve_inputs([]))[0]
    except Exception as err:  # noqa: BLE001 - no shared data on this machine: the caller goes synthetic
        log.warning("NAT trajectories unavailable (%s); using synthetic NAT-like examples", err)
        return None


def fresh_model(cfg: TrainConfig, model_path: str, gpu: bool, device, **kw):
    """One arm's own model copy in training mode and its AdamW (the NAT repo's settings, lr 5e-5)."""
    model = build_model(cfg, model_path, gpu, **kw).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=5e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def nat_examples(tokenizer, n: int) -> tuple[list, str]:
    """Tokenized NAT examples from the NAT repo's StrategyQA trajectories (or synthetic ones)."""
    from nat_ray.core import nat_data

    rows = nat_rows()
    if rows is None:
        return synthetic_examples(n, 577, MAX_LENGTH, tokenizer.vocab_size, SEED), "synthetic"
    source = "NAT repo GPT-3.5 StrategyQA trajectories (shared/data), variant nat"
    examples, _ = nat_data.build_examples(rows, "nat", seed=42)
    random.Random(SEED).shuffle(examples)
    return [
        tokenize_example(tokenizer, ex.messages, MAX_LENGTH, ex.prompt_messages) for ex in examples[:n]
    ], source


class Arm:
    """One side of the comparison: its own model copy, optimizer and micro-batches."""

    def __init__(self, name: str, packed: bool, model_path: str, rows, pad_id: int, device, gpu: bool, **kw):
        cfg = TrainConfig(
            packing=packed, micro_batch_size=MICRO_BATCH, global_batch_size=MICRO_BATCH, num_workers=1
        )
        self.name = name
        self.model, self.optimizer = fresh_model(cfg, model_path, gpu, device, **kw)
        self.batches = micro_batches_of(rows, MICRO_BATCH, pad_id, packed, SEED)
        self.scheduler = cosine_schedule(self.optimizer, 0, len(self.batches))
        self.device = device
        self.done = 0  # micro-batches run
        self.timed = {"steps": 0, "tokens": 0, "padded_tokens": 0, "loss_tokens": 0, "seconds": 0.0}
        self.losses: list[float] = []
        self.attention = self.model.config._attn_implementation

    @property
    def finished(self) -> bool:
        return self.done >= len(self.batches)

    def step(self) -> None:
        batch = self.batches[self.done]
        stats = train_step(self.model, self.optimizer, self.scheduler, [batch], self.device)
        self.losses.append(stats.loss)
        if self.done > 0:  # the first step is warmup (allocator, kernels)
            for key, value in (
                ("steps", 1),
                ("tokens", stats.tokens),
                ("padded_tokens", stats.padded_tokens),
                ("loss_tokens", stats.loss_tokens),
                ("seconds", stats.seconds),
            ):
                self.timed[key] += value
        self.done += 1
        log.info(
            "%-6s step %3d/%d  %5d tokens in %6.1fs  loss %.4f",
            self.name,
            self.done,
            len(self.batches),
            stats.tokens,
            stats.seconds,
            stats.loss,
        )

    def result(self, num_params: int, peak: float | None) -> dict:
        t = self.timed
        tps = t["tokens"] / t["seconds"]
        return {
            "attention": self.attention,
            "micro_batches": len(self.batches),
            "timed_steps": t["steps"],
            "tokens": t["tokens"],
            "padded_tokens": t["padded_tokens"],
            "pad_share": round(1 - t["tokens"] / t["padded_tokens"], 4),
            "seconds": round(t["seconds"], 2),
            "tokens_per_s": round(tps, 2),
            "loss_first": round(self.losses[0], 4),
            "loss_last": round(self.losses[-1], 4),
            "mfu": None if peak is None else round(mfu(tps, num_params, peak), 4),
        }


def run_arms(arms: dict[str, Arm], share: dict[str, float]) -> None:
    """Interleave: the arm with the smaller share of its work done goes next."""
    while not all(a.finished for a in arms.values()):
        name = min((n for n, a in arms.items() if not a.finished), key=lambda n: arms[n].done * share[n])
        arms[name].step()


def mfu_1b(model_path: str, examples, pad_id: int, device, peak: float) -> dict:
    """Packed training throughput and MFU of a random-weight ~1.2B Llama on the same data (GPU only)."""
    cfg = TrainConfig(packing=True, micro_batch_size=4, global_batch_size=4, num_workers=1, precision="bf16")
    model = build_model(cfg, model_path, True, config_overrides=LLAMA_1B).to(device)
    n_params, _ = count_parameters(model)
    rows = pack_examples(examples, 4096)
    batches = micro_batches_of(rows, MICRO_BATCH, pad_id, True, SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    sched = cosine_schedule(opt, 0, len(batches))
    tokens, seconds = 0, 0.0
    for i, batch in enumerate(batches[:40]):
        stats = train_step(model, opt, sched, [batch], device)
        if i >= 3:
            tokens, seconds = tokens + stats.tokens, seconds + stats.seconds
    tps = tokens / seconds
    return {
        "params": n_params,
        "max_length": 4096,
        "tokens_per_s": round(tps, 1),
        "mfu": round(mfu(tps, n_params, peak), 4),
    }


def preference_pairs(tokenizer, n: int) -> tuple[list, str]:
    """``n`` packed (positive, negative) rows of one question each, plain prompt (or synthetic ones)."""
    from nat_ray.core import nat_data
    from nat_ray.core.preference import PLAIN_VARIANT, draw_pairs
    from nat_ray.train.packing import make_row

    rows = nat_rows()
    if rows is None:
        examples = synthetic_examples(2 * n, 577, MAX_LENGTH, tokenizer.vocab_size, SEED)
        return [make_row(examples, [2 * i, 2 * i + 1]) for i in range(n)], "synthetic"
    source = "NAT repo GPT-3.5 StrategyQA trajectories (shared/data), pairs of one question, plain prompt"
    pairs, _ = draw_pairs(rows, lambda r: r[nat_data.QUESTION_ID], nat_data.is_positive, SEED)
    random.Random(SEED).shuffle(pairs)
    out = []
    for pair in pairs[:n]:
        examples = []
        for row in pair:
            ex = nat_data.build_example(row, PLAIN_VARIANT)
            examples.append(tokenize_example(tokenizer, ex.messages, MAX_LENGTH, ex.prompt_messages))
        out.append(make_row(examples, [0, 1]))
    return out, source


def dpo_cost(model_path: str, rows, pad_id: int, device, gpu: bool) -> dict:
    """Seconds per pair of an SFT step and a DPO step on the same packed pairs, interleaved."""
    from nat_ray.train.objectives import LocalEngine, Preference, preference_step, token_logps
    from nat_ray.train.packing import collate
    from nat_ray.train.step import load_model, resolve_precision

    def fresh(objective: str):
        cfg = TrainConfig(
            packing=True, micro_batch_size=1, global_batch_size=1, num_workers=1, objective=objective
        )
        model, optimizer = fresh_model(cfg, model_path, gpu, device)
        return model, optimizer, cosine_schedule(optimizer, 0, len(rows))

    sft_model, sft_opt, sft_sched = fresh("sft")
    dpo_model, dpo_opt, dpo_sched = fresh("dpo")
    engine = LocalEngine(dpo_model, dpo_opt, dpo_sched)
    reference = load_model(model_path, resolve_precision("auto", gpu), dpo_model.config._attn_implementation)
    reference.to(device).eval().requires_grad_(False)
    spec = Preference("dpo", beta=0.1)
    seconds = {"sft": 0.0, "dpo": 0.0}
    losses: dict[str, list[float]] = {"sft": [], "dpo": []}
    for i, row in enumerate(rows):
        batch = collate([row], pad_id, True)
        for name in ("sft", "dpo") if i % 2 else ("dpo", "sft"):  # alternate who goes first
            if name == "sft":
                stats = train_step(sft_model, sft_opt, sft_sched, [batch], device)
            else:
                stats = preference_step(
                    engine, [{**batch, "rows": [row]}], device, spec, lambda b: token_logps(reference, b)
                )
            losses[name].append(round(stats.loss, 4))
            if i > 0:  # the first pair is warmup
                seconds[name] += stats.seconds
            log.info("%s pair %d/%d in %.1fs  loss %.4f", name, i + 1, len(rows), stats.seconds, stats.loss)
    timed = len(rows) - 1
    return {
        "pairs": len(rows),
        "timed_pairs": timed,
        "tokens_per_pair": round(sum(len(r) for r in rows) / len(rows), 1),
        "sft_seconds_per_pair": round(seconds["sft"] / timed, 3),
        "dpo_seconds_per_pair": round(seconds["dpo"] / timed, 3),
        "dpo_over_sft": round(seconds["dpo"] / seconds["sft"], 3),
        "expected": "about 4/3: the reference adds one forward to SFT's forward and backward",
        "losses": losses,
    }


def main() -> int:
    from transformers import AutoTokenizer

    from nat_ray.models import resolve_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "nat_ray.import_nat", "nat_ray.core.nat_data"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    if not gpu:
        torch.set_num_threads(CPU_THREADS)
    began = time.time()
    model_path = resolve_model("embedded")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = pad_token_id(tokenizer)
    examples, source = nat_examples(tokenizer, GPU_EXAMPLES if gpu else CPU_EXAMPLES)
    packed_rows = pack_examples(examples, MAX_LENGTH)
    padded_rows = single_rows(examples)
    info = machine(gpu)
    arms = {
        "packed": Arm("packed", True, model_path, packed_rows, pad_id, device, gpu),
        "padded": Arm("padded", False, model_path, padded_rows, pad_id, device, gpu),
    }
    n_params, _ = count_parameters(arms["packed"].model)
    peak = peak_flops_of(device)
    # Equal progress through the data: weight each arm's step count by its micro-batches.
    run_arms(arms, {name: 1 / len(arm.batches) for name, arm in arms.items()})
    packed, padded = (arms[n].result(n_params, peak) for n in ("packed", "padded"))
    result = {
        "benchmark": "training tokens/s: packed rows vs padded batches (nat_ray.train.step, no Ray)",
        "date": datetime.now().isoformat(timespec="seconds"),
        "packed_over_padded": round(packed["tokens_per_s"] / padded["tokens_per_s"], 3),
        "target": ">= 1.5",
        "packed": packed,
        "padded": padded,
        "mfu": packed["mfu"],
        "data": {
            "source": source,
            "examples": len(examples),
            "tokens": sum(len(e.input_ids) for e in examples),
            "loss_tokens": sum(e.num_loss_tokens for e in examples),
            "truncated": sum(e.truncated for e in examples),
            "max_length": MAX_LENGTH,
            "packed_rows": len(packed_rows),
            "packing_efficiency": round(packing_efficiency(packed_rows, MAX_LENGTH), 4),
        },
        "settings": {
            "model": "embedded SmolLM2-135M-Instruct",
            "params": n_params,
            "precision": "bf16" if gpu else "fp32",
            "micro_batch_size": MICRO_BATCH,
            "optimizer": "AdamW lr 5e-5, clip 1.0, one micro-batch per step",
            "interleaved": True,
        },
        "machine": {**info, "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "seconds": round(time.time() - began, 1),
    }
    del arms
    pair_rows, pair_source = preference_pairs(tokenizer, GPU_PAIRS if gpu else CPU_PAIRS)
    result["dpo_step"] = {"source": pair_source, **dpo_cost(model_path, pair_rows, pad_id, device, gpu)}
    if gpu and peak:
        torch.cuda.empty_cache()
        result["mfu_llama_1b"] = mfu_1b(model_path, examples, pad_id, device, peak)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    result["seconds"] = round(time.time() - began, 1)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("packed_over_padded", "mfu", "seconds")}, indent=2))
    print(f"dpo step over sft step, per pair: {result['dpo_step']['dpo_over_sft']}")
    print(
        f"packed {packed['tokens_per_s']} tok/s vs padded {padded['tokens_per_s']} tok/s "
        f"(pad share {padded['pad_share']:.0%}) -> {RESULTS}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
