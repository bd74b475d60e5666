"""A damaged newest checkpoint: the next start resumes from the one before, named in a warning.

Real local Ray, Ray Train, DeepSpeed (2 CPU workers on gloo) and the embedded model: two steps
with a checkpoint after each, the newest checkpoint's model shard truncated, then the same run
started again: step 2 is trained again from step 1.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from rows import math_row  # tests/rows.py

from nat_ray.config import NatRayConfig, TrainConfig
from nat_ray.core import records

pytestmark = pytest.mark.integration


def test_a_truncated_newest_checkpoint_resumes_from_the_previous_one(local_ray, tmp_path, caplog):
    from dataclasses import replace

    from nat_ray.train.run import run_train

    records.write_rows([math_row(i, c) for i in range(2) for c in (True, False)], tmp_path / "part-0.parquet")
    cfg = TrainConfig(
        data=[str(tmp_path / "part-0.parquet")],
        variant="nat",
        mode="lora",
        zero_stage=2,
        lora_rank=8,
        lora_target_modules=["q_proj", "v_proj"],
        max_length=512,
        packing=True,
        epochs=10,
        global_batch_size=2,
        micro_batch_size=1,
        num_workers=2,
        use_gpu=False,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        checkpoint_every=1,
        keep_checkpoints=2,
        storage_path=str(tmp_path / "runs"),
        run_name="damaged",
    )
    first = run_train(NatRayConfig(train=replace(cfg, max_steps=2)))
    run_dir = Path(first.run_dir)
    assert sorted(p.name for p in run_dir.glob("step_*")) == ["step_000001", "step_000002"]
    assert all((run_dir / n / "CHECKSUMS.sha256").is_file() for n in ("step_000001", "step_000002"))
    shards = sorted((run_dir / "step_000002").rglob("*model_states.pt"))
    assert shards
    shards[0].write_bytes(shards[0].read_bytes()[:1000])

    with caplog.at_level(logging.WARNING, logger="nat_ray.train.run"):
        second = run_train(NatRayConfig(train=replace(cfg, max_steps=2)))
    assert "step_000002" in caplog.text and "set aside as step_000002.damaged" in caplog.text
    assert (second.start_step, second.step) == (1, 2)  # step 2 trained again from step 1
    assert [h["step"] for h in second.history] == [1, 2]
    assert second.history[0] == first.history[0]  # step 1 came from the sound checkpoint
    # The same batch from the same weights (summed in another order by gloo): about the same loss.
    assert second.history[1]["loss"] == pytest.approx(first.history[1]["loss"], rel=0.05)
    assert (run_dir / "step_000002.damaged").is_dir()  # kept for a person
    # The placeholder keeps Ray Train's old name; the new checkpoint has a folder of its own.
    assert Path(second.checkpoint).name == "step_000002-1"
    assert json.loads((Path(second.checkpoint) / "trainer_state.json").read_text())["step"] == 2
