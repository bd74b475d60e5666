"""The training step without Ray or DeepSpeed: schedule, DeepSpeed config, LoRA checks, loss weighting.

The throughput script around it (``benchmarks/train_step.py``) is tested in test_benchmark_train_step.py.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from nat_ray.config import TrainConfig
from nat_ray.core.masks import IGNORE_INDEX, TokenizedExample
from nat_ray.errors import ConfigError
from nat_ray.train.packing import collate, pack_examples, single_rows
from nat_ray.train.step import (
    build_model,
    check_lora_targets,
    check_lora_targets_for,
    cosine_schedule,
    deepspeed_config,
    gradient_accumulation_steps,
    load_model,
    loss_sum,
    lr_multiplier,
    num_loss_tokens,
    train_step,
    warmup_steps,
)

PAD = 2
# A two-layer, 64-wide model with the embedded model's vocabulary: fast, same code paths.
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16}  # fmt: skip


def test_lr_schedule_hand_worked():
    # 2 warmup steps, 10 in all: 0, 0.5, then cosine from 1 down to 0 over steps 2..10.
    assert [lr_multiplier(s, 2, 10) for s in (0, 1, 2)] == [0.0, 0.5, 1.0]
    assert lr_multiplier(6, 2, 10) == pytest.approx(0.5)  # half way through the decay
    assert lr_multiplier(10, 2, 10) == pytest.approx(0.0)
    assert lr_multiplier(3, 0, 4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 4)))
    assert warmup_steps(100, 0.03) == 3 and warmup_steps(10, 0.03) == 1 and warmup_steps(10, 0.0) == 0


def test_cosine_schedule_drives_the_optimizer():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1e-3)
    sched = cosine_schedule(opt, 1, 3)
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 1e-3, 0.5e-3])


def test_deepspeed_config_cpu_defaults():
    cfg = TrainConfig(global_batch_size=8, micro_batch_size=2, num_workers=2, zero_stage=3)
    ds = deepspeed_config(cfg, gpu=False)
    assert gradient_accumulation_steps(cfg) == 2
    assert ds["train_batch_size"] == 8
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 1.0
    assert ds["bf16"] == {"enabled": False}  # fp32 on CPU
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["overlap_comm"] is False
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "offload_optimizer" not in ds["zero_optimization"]
    assert ds["optimizer"]["type"] == "AdamW"
    assert ds["optimizer"]["params"]["lr"] == cfg.learning_rate
    assert ds["optimizer"]["params"]["torch_adam"] is True
    json.dumps(ds)  # plain JSON, as DeepSpeed wants


def test_deepspeed_config_gpu_with_offload():
    cfg = TrainConfig(
        global_batch_size=64,
        micro_batch_size=2,
        num_workers=4,
        zero_stage=3,
        offload_optimizer=True,
        offload_params=True,
    )
    ds = deepspeed_config(cfg, gpu=True)
    assert ds["gradient_accumulation_steps"] == 8  # the paper's 4 GPUs x 2 x 8
    assert ds["bf16"] == {"enabled": True}
    zero = ds["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert zero["overlap_comm"] is True
    assert ds["optimizer"]["params"]["torch_adam"] is False  # DeepSpeedCPUAdam for offloaded state
    stage2 = deepspeed_config(replace(cfg, zero_stage=2, offload_params=False), gpu=True)
    assert "stage3_gather_16bit_weights_on_model_save" not in stage2["zero_optimization"]


def test_precision_override_on_cpu():
    assert deepspeed_config(TrainConfig(precision="bf16"), gpu=False)["bf16"]["enabled"] is True
    assert deepspeed_config(TrainConfig(precision="fp32"), gpu=True)["bf16"]["enabled"] is False


def test_missing_lora_target_is_a_config_error(embedded_path):
    with pytest.raises(ConfigError, match=r"\['qkv_proj'\].*q_proj"):
        check_lora_targets_for(embedded_path, ["q_proj", "qkv_proj"])
    check_lora_targets_for(embedded_path, ["q_proj", "v_proj", "gate_proj"])  # all exist


def _tiny(path, **cfg):
    return build_model(TrainConfig(**cfg), path, gpu=False, config_overrides=TINY)


def test_lora_model_trains_only_adapters(embedded_path):
    model = _tiny(embedded_path, mode="lora", lora_rank=4, lora_target_modules=["q_proj", "v_proj"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * TINY["num_hidden_layers"]  # A and B, two targets, each layer
    with pytest.raises(ConfigError, match="c_attn"):
        check_lora_targets(model, ["c_attn"])


def _examples(n, seed=0, vocab=1000):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(12, 40)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        labels = [i if rng.random() < 0.4 else IGNORE_INDEX for i in ids]
        out.append(TokenizedExample(ids, labels))
    return out


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_loss_is_token_weighted_over_the_global_batch(embedded_path):
    """Accumulating uneven micro-batches gives the gradient of the mean over all loss tokens."""
    model = _tiny(embedded_path)
    examples = _examples(5)
    whole = collate(single_rows(examples), PAD, packed=False)
    s, n = loss_sum(model, whole)
    (s / n).backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)

    micro = [
        collate(single_rows(examples[:1]), PAD, False),
        collate(pack_examples(examples[1:], 256), PAD, True),
    ]
    assert num_loss_tokens(micro[0]) != num_loss_tokens(micro[1])  # a mean of means would differ
    n_global = sum(num_loss_tokens(mb) for mb in micro)
    assert n_global == n
    for mb in micro:
        s_mb, _ = loss_sum(model, mb)
        (s_mb / n_global).backward()
    got = _grads(model)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)


def test_batch_without_loss_tokens_gives_zero_loss(embedded_path):
    model = _tiny(embedded_path)
    ex = TokenizedExample([5, 6, 7, 8], [IGNORE_INDEX] * 4)
    s, n = loss_sum(model, collate(single_rows([ex]), PAD, False))
    assert n == 0 and float(s.detach()) == 0.0
    s.backward()  # still part of the graph


def test_train_steps_lower_the_loss_on_repeated_data(embedded_path):
    torch.manual_seed(0)
    model = _tiny(embedded_path)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = cosine_schedule(opt, 0, 100)
    batch = [collate(pack_examples(_examples(4), 128), PAD, True)]
    losses = [train_step(model, opt, sched, batch, torch.device("cpu")).loss for _ in range(8)]
    assert losses[-1] < losses[0] * 0.9


def test_random_init_override_must_name_a_config_field(embedded_path):
    with pytest.raises(ConfigError, match="no_such_field"):
        load_model(embedded_path, config_overrides={"no_such_field": 1})


def test_step_and_data_modules_import_neither_ray_nor_deepspeed():
    """A GPU box with only torch, transformers and peft runs the step (benchmarks/train_step.py)."""
    code = (
        "import sys\n"
        "import nat_ray.train, nat_ray.train.step, nat_ray.train.data\n"
        "print(','.join(m for m in ('ray', 'vllm', 'deepspeed') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing the step pulled in: {out.stdout.strip()}"
