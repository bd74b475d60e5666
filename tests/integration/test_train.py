"""Training end to end: real local Ray, Ray Train, DeepSpeed (2 CPU workers on gloo), the embedded model.

One full run (KTO on ZeRO-3, its reference a frozen copy in a second engine) trains two steps with a
checkpoint after each, then its export is loaded in transformers and vLLM. One LoRA run (DPO on
ZeRO-2, its reference the adapter disabled; two steps) exports an adapter and a merged model; a copy
of its folder with the newest checkpoint truncated resumes from the one before. Every global batch is
the whole tiny dataset, so losses of different steps are comparable. (SFT's step is tested without Ray
in tests/test_train_step.py; SFT under Ray Train by the loop, the notebook and the fault scenario.)
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from rows import math_row  # tests/rows.py

from nat_ray.config import EngineConfig, NatRayConfig, TrainConfig
from nat_ray.core import records

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def base_cfg(tmp_path_factory) -> TrainConfig:
    """2 positives + 2 negatives (~200 tokens each) packed into 2 rows = one global batch."""
    data = tmp_path_factory.mktemp("data")
    records.write_rows([math_row(i, c) for i in range(2) for c in (True, False)], data / "part-0.parquet")
    return TrainConfig(
        data=[str(data)],
        variant="nat",
        max_length=512,
        packing=True,
        epochs=10,
        global_batch_size=2,
        micro_batch_size=1,
        num_workers=2,
        use_gpu=False,
        learning_rate=2e-4,
        warmup_ratio=0.0,
        checkpoint_every=1,
        keep_checkpoints=1,
        storage_path=str(tmp_path_factory.mktemp("runs")),
    )


@pytest.fixture(scope="module")
def kto_run(local_ray, base_cfg):
    """KTO with full fine-tuning on ZeRO-3, two steps of the 4 examples, a checkpoint after each (the
    newest kept). A run's resume is the damaged-checkpoint test's, on the DPO run."""
    from nat_ray.train.run import run_train

    cfg = replace(
        base_cfg,
        mode="full",
        zero_stage=3,
        objective="kto",
        global_batch_size=4,
        run_name="kto",
    )
    return run_train(NatRayConfig(train=replace(cfg, max_steps=2)))


@pytest.fixture(scope="module")
def lora_cfg(base_cfg) -> TrainConfig:
    """DPO with LoRA on ZeRO-2 (2 pairs a step), two steps with a checkpoint after each (both kept)."""
    return replace(
        base_cfg,
        objective="dpo",
        mode="lora",
        zero_stage=2,
        lora_rank=8,
        lora_target_modules=["q_proj", "v_proj"],
        learning_rate=1e-3,
        max_steps=2,
        keep_checkpoints=2,
        run_name="lora",
    )


@pytest.fixture(scope="module")
def lora_run(local_ray, lora_cfg):
    from nat_ray.train.run import run_train

    return run_train(NatRayConfig(train=lora_cfg))


def test_ray_data_tokenization_matches_local(local_ray, base_cfg, embedded_path, monkeypatch):
    from nat_ray.train import data

    examples, _ = data.select_examples(base_cfg, data.read_trajectories(base_cfg.data))
    local = data.tokenize_examples(examples, embedded_path, 512)
    monkeypatch.setattr(data, "RAY_DATA_MIN_EXAMPLES", 0)
    assert data.tokenize_examples(examples, embedded_path, 512) == local


def test_full_export_loads_in_transformers_and_generates(kto_run, embedded_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = kto_run.export
    assert export["adapter"] is None
    path = Path(export["model"])
    assert (path / "model.safetensors").is_file() and (path / "chat_template.jinja").is_file()
    model = AutoModelForCausalLM.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(embedded_path)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Question: 3 boxes of 4 pens?"}],
        add_generation_prompt=True,
        return_tensors="pt",
    )
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_full_export_answers_in_vllm(kto_run):
    from nat_ray.core.react import Sampling
    from nat_ray.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(
        EngineConfig(model=kto_run.export["model"], max_model_len=1024, kv_cache_gb=1.0, max_num_seqs=4)
    )
    try:
        (answer,) = engine.generate(
            [[{"role": "user", "content": "Question: 3 boxes of 4 pens. How many pens?"}]],
            [Sampling(max_tokens=16)],
        )
    finally:
        engine.close()
    assert answer.error is None and answer.completion_tokens > 0 and answer.text


def test_kto_full_run_moves_desirable_above_undesirable(kto_run):
    assert (kto_run.step, kto_run.objective) == (2, "kto")
    assert kto_run.data["kto_weights"] == {"desirable": 1.0, "undesirable": 1.0}  # 2 positives, 2 negatives
    step1, step2 = kto_run.history
    # Before the first update the policy is the reference: every reward and the KL estimate are 0.
    assert (step1["kl"], step1["rewards/desirable"], step1["loss"]) == (0.0, 0.0, pytest.approx(0.5))
    assert step2["rewards/desirable"] > step2["rewards/undesirable"]
    card = json.loads((Path(kto_run.export["model"]) / "agent_card.json").read_text())
    assert (card["objective"], card["template"]) == ("kto", "zero-shot")
    run_dir = Path(kto_run.run_dir)
    assert sorted(p.name for p in run_dir.glob("step_*")) == ["step_000002"]  # keep_checkpoints=1
    assert (run_dir / "step_000002" / "CHECKSUMS.sha256").is_file()
    assert list((run_dir / "tensorboard").iterdir())


def test_dpo_lora_prefers_the_positive_and_its_card_asks_without_a_marker(lora_run):
    assert lora_run.objective == "dpo" and lora_run.data["pairs"]["pairs"] == 2
    step1, step2 = lora_run.history
    assert step1["loss"] == pytest.approx(math.log(2), abs=1e-4)  # a fresh adapter: policy == reference
    assert step2["rewards/margin"] > 0 and step2["loss"] < step1["loss"]
    card = json.loads((Path(lora_run.export["adapter"]) / "agent_card.json").read_text())
    assert (card["objective"], card["template"], card["marker"]) == (
        "dpo",
        "zero-shot",
        "Question: {question}",
    )
    # What nat-ray view shows of the run: its examples token by token, the loss on the agent's turns only.
    sample = json.loads((Path(lora_run.run_dir) / "loss_sample.json").read_text())
    assert sample["objective"] == "dpo" and len(sample["examples"]) == 4  # both pairs, each example
    first = sample["examples"][0]
    text = "".join(t for t, loss in zip(first["tokens"], first["loss"]) if loss)
    assert "Action: calculate[" in text and "Observation" not in text and "Question" not in text


def test_lora_exports_an_adapter_and_a_merged_model_that_agree(lora_run, embedded_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    export = lora_run.export
    assert (Path(export["adapter"]) / "adapter_config.json").is_file()
    ids = torch.tensor([[1, 504, 3216, 28, 253, 1345, 282, 2]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(embedded_path)
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, export["adapter"])
        adapter_logits = adapted(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(export["model"])
        merged_logits = merged(ids).logits
        assert merged.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > ids.shape[1]
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-4)  # the adapter learned something
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-4, atol=1e-3)


def test_a_truncated_newest_checkpoint_resumes_from_the_previous_one(lora_run, lora_cfg, tmp_path, caplog):
    """A copy of the LoRA run (moved folders resume), its step-2 model shard cut short: the next start
    sets step 2 aside with a warning and trains it again from step 1."""
    from nat_ray.train.run import run_train

    run_dir = tmp_path / "runs" / lora_cfg.run_name
    shutil.copytree(lora_run.run_dir, run_dir, ignore=shutil.ignore_patterns("export"))
    assert sorted(p.name for p in run_dir.glob("step_*")) == ["step_000001", "step_000002"]
    assert all((run_dir / n / "CHECKSUMS.sha256").is_file() for n in ("step_000001", "step_000002"))
    shards = sorted((run_dir / "step_000002").rglob("*model_states.pt"))
    assert shards
    shards[0].write_bytes(shards[0].read_bytes()[:1000])

    with caplog.at_level(logging.WARNING, logger="nat_ray.train.run"):
        second = run_train(NatRayConfig(train=replace(lora_cfg, storage_path=str(run_dir.parent))))
    assert "step_000002" in caplog.text and "set aside as step_000002.damaged" in caplog.text
    assert (second.start_step, second.step) == (1, 2)  # step 2 trained again from step 1
    assert [h["step"] for h in second.history] == [1, 2]
    assert second.history[0] == lora_run.history[0]  # step 1 came from the sound checkpoint
    # The same batch from the same weights (summed in another order by gloo): about the same loss.
    assert second.history[1]["loss"] == pytest.approx(lora_run.history[1]["loss"], rel=0.05)
    assert (run_dir / "step_000002.damaged").is_dir()  # kept for a person
    # The placeholder keeps Ray Train's old name; the new checkpoint has a folder of its own.
    assert Path(second.checkpoint).name == "step_000002-1"
    assert json.loads((Path(second.checkpoint) / "trainer_state.json").read_text())["step"] == 2
