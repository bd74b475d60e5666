"""Golden figures: what the fixed seeds make, recorded before the code moved into packages.

Refactors must leave behaviour alone: the NAT examples built from the default task's shipped
trajectories, tokenized and packed, hash to the recorded values for each recipe, and four training
steps of a small model from a fixed seed give the recorded losses. (The trajectories themselves are
checked by tests/test_word_math.py: regenerating them gives the shipped file.) A change that is
meant to change these says so and records the new figures.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from nat_ray.config import TrainConfig
from nat_ray.core import records
from nat_ray.train import data
from nat_ray.train.packing import collate, pack_examples
from nat_ray.train.step import cosine_schedule, load_model, train_step

TEACHER = Path(__file__).parents[1] / "examples" / "word_math" / "data" / "teacher.parquet"
# Recorded on main 0f7488b (before the move into packages), from the embedded SmolLM2 tokenizer.
PACKED = {
    "wo_neg": (376, 188, "2dafb3d3c2fa3e15"),
    "nut": (600, 288, "f78585d10cabd21c"),
    "nat": (600, 288, "fbaa79d97c4f6ed8"),
}
LOSSES = [10.874866242104389, 10.484791857130984, 10.122471586186835, 9.798922274975066]
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16}  # fmt: skip


@pytest.fixture(scope="module")
def packed_rows(embedded_path):
    rows = records.read_rows(TEACHER)
    tokenizer = data.load_tokenizer(embedded_path)
    out = {}
    for variant in PACKED:
        examples, _ = data.select_examples(TrainConfig(variant=variant, label_mode="robust"), rows)
        out[variant] = (
            examples,
            pack_examples([data.tokenize_example(tokenizer, e, 512) for e in examples], 512),
        )
    return out


@pytest.mark.parametrize("variant", list(PACKED))
def test_packed_training_rows_are_the_recorded_ones(packed_rows, variant):
    examples, packed = packed_rows[variant]
    digest = hashlib.sha256(
        json.dumps([[list(r.input_ids), list(r.labels)] for r in packed]).encode()
    ).hexdigest()
    assert (len(examples), len(packed), digest[:16]) == PACKED[variant]


def test_a_small_models_losses_are_the_recorded_ones(packed_rows, embedded_path):
    _, packed = packed_rows["nat"]
    torch.manual_seed(0)
    model = load_model(embedded_path, config_overrides=TINY, random_init=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = cosine_schedule(opt, 0, 100)
    first = pack_examples([data.tokenize_example(data.load_tokenizer(embedded_path), e, 512)
                           for e in packed_rows["nat"][0][:8]], 512)  # fmt: skip
    batch = [collate(first[:2], 2, True)]
    losses = [train_step(model, opt, sched, batch, torch.device("cpu")).loss for _ in range(4)]
    assert losses == pytest.approx(LOSSES, rel=1e-4)
