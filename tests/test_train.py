"""The training stage's driver side without Ray: input checks, the per-rank schedule, resume checks."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from rows import math_row  # tests/rows.py

from nat_ray.config import NatRayConfig, TrainConfig, load_config
from nat_ray.core import nat_data, records
from nat_ray.core.masks import IGNORE_INDEX, TokenizedExample
from nat_ray.errors import ConfigError, DataError
from nat_ray.train.data import (
    finalize_examples,
    make_schedule,
    pad_token_id,
    prepare_rows,
    rank_table,
    read_trajectories,
    select_examples,
    step_batches,
    tokenize_examples,
)
from nat_ray.train.packing import single_rows
from nat_ray.train.run import (
    TrainResult,
    check_resume,
    format_result,
    run_fingerprint,
    run_train,
    write_fingerprint,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "trajectories"
    folder.mkdir()
    records.write_rows([math_row(i, c) for i in range(3) for c in (True, False)], folder / "part-0.parquet")
    return folder


def _cfg(data_dir, tmp_path, **fields) -> TrainConfig:
    base = dict(
        data=[str(data_dir)],
        storage_path=str(tmp_path / "runs"),
        global_batch_size=2,
        micro_batch_size=1,
        num_workers=2,
        max_length=512,
    )
    return TrainConfig(**{**base, **fields})


# --------------------------------------------------------------------------------------------
# Bad input: a clear error before any training


def test_missing_data_path(tmp_path):
    with pytest.raises(DataError, match="does not exist.*import-nat"):
        read_trajectories([str(tmp_path / "nope")])


def test_folder_without_parquet(tmp_path):
    with pytest.raises(DataError, match="no .parquet files"):
        read_trajectories([str(tmp_path)])


def test_file_with_other_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"question": ["q"], "answer": ["a"]}), path)
    with pytest.raises(DataError, match="not a trajectory file.*trajectory_id"):
        read_trajectories([str(path)])


def test_empty_trajectory_file(tmp_path):
    records.write_rows([], tmp_path / "empty.parquet")
    with pytest.raises(DataError, match="hold no trajectories"):
        read_trajectories([str(tmp_path / "empty.parquet")])


def test_variant_that_needs_negatives(data_dir, tmp_path):
    rows = [r for r in read_trajectories([str(data_dir)]) if r[nat_data.CORRECT_ROBUST]]
    with pytest.raises(DataError, match="needs negative trajectories"):
        select_examples(_cfg(data_dir, tmp_path, variant="nat"), rows)
    examples, _ = select_examples(_cfg(data_dir, tmp_path, variant="wo_neg"), rows)
    assert len(examples) == 3


def test_run_train_rejects_bad_input_before_starting_ray(data_dir, tmp_path, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray must not start for bad input"))
    cases = [
        (dict(data=[str(tmp_path / "missing")]), DataError, "does not exist"),
        (
            dict(mode="lora", lora_target_modules=["q_proj", "query_key_value"]),
            ConfigError,
            "query_key_value",
        ),
        (dict(variant="nat_ab_typo"), ConfigError, "unknown data variant"),
    ]
    for fields, error, message in cases:
        with pytest.raises(error, match=message):
            run_train(NatRayConfig(train=_cfg(data_dir, tmp_path, **fields)))


def test_overlong_examples_are_counted_truncated_or_dropped(data_dir, tmp_path, embedded_path):
    rows = read_trajectories([str(data_dir)])
    cfg = _cfg(data_dir, tmp_path, max_length=150, packing=False)
    examples, selection = select_examples(cfg, rows)
    lengths = [len(ex.input_ids) for ex in tokenize_examples(examples, embedded_path, None)]
    assert all(n > 150 for n in lengths)  # every example is over max_length

    kept, stats = prepare_rows(cfg, examples, selection, embedded_path)
    assert stats["truncated"] == len(examples) and stats["examples"] == len(examples)
    assert all(len(r) == 150 for r in kept)
    # Dropping every example leaves nothing: an error, not an empty run.
    with pytest.raises(DataError, match="no example is left"):
        prepare_rows(replace(cfg, overlong="drop"), examples, selection, embedded_path)


def test_finalize_drops_examples_whose_loss_was_cut_off():
    ok = TokenizedExample([1, 2, 3], [IGNORE_INDEX, 2, 3], truncated=True)
    cut = TokenizedExample([1, 2, 3], [IGNORE_INDEX] * 3, truncated=True)
    fake = [nat_data.ChatExample([], 0, "a", "correct"), nat_data.ChatExample([], 0, "b", "correct")]
    kept, stats = finalize_examples([ok, cut], fake, "truncate")
    assert kept == [ok]
    assert stats == {"truncated": 2, "dropped_overlong": 0, "dropped_no_loss": 1}
    with pytest.raises(DataError, match="'dropped_overlong': 2"):
        finalize_examples([ok, cut], fake, "drop")


def test_prepare_rows_packs_and_counts(data_dir, tmp_path, embedded_path):
    cfg = _cfg(data_dir, tmp_path, max_length=1024, packing=True)
    examples, selection = select_examples(cfg, read_trajectories([str(data_dir)]))
    rows, stats = prepare_rows(cfg, examples, selection, embedded_path)
    assert stats["positives"] == 3 and stats["negatives"] == 3 and stats["examples"] == 6
    assert sorted(i for r in rows for i in r.example_ids) == list(range(6))
    assert len(rows) < 6 and stats["rows"] == len(rows)  # several ~220-token examples per 1024 row
    assert stats["tokens"] == sum(len(r) for r in rows) and 0 < stats["packing_efficiency"] <= 1


# --------------------------------------------------------------------------------------------
# The schedule


def test_schedule_counts_steps_and_accumulation():
    cfg = TrainConfig(global_batch_size=8, micro_batch_size=2, num_workers=2, epochs=2, warmup_ratio=0.1)
    s = make_schedule(21, cfg)
    assert (s.accum, s.steps_per_epoch, s.total_steps, s.warmup_steps) == (2, 2, 4, 1)
    capped = make_schedule(21, replace(cfg, max_steps=3))
    assert capped.total_steps == 3
    with pytest.raises(DataError, match="fewer than train.global_batch_size=8"):
        make_schedule(7, cfg)


def test_rank_streams_cover_each_epoch_once_and_are_deterministic():
    cfg = TrainConfig(global_batch_size=6, micro_batch_size=1, num_workers=2, epochs=3)
    s = make_schedule(13, cfg)  # 2 steps per epoch, 1 row dropped per epoch
    streams = [s.rank_stream(r, seed=5) for r in range(2)]
    assert streams == [s.rank_stream(r, seed=5) for r in range(2)]
    assert streams != [s.rank_stream(r, seed=6) for r in range(2)]
    for epoch in range(3):
        steps = {2 * epoch, 2 * epoch + 1}
        rows = [i for stream in streams for step, _, i in stream if step in steps]
        assert len(rows) == len(set(rows)) == 12  # no row twice in an epoch
    for stream in streams:
        # Every rank has accum micro-batches of micro_batch rows at every step, in order.
        per_step = Counter((step, micro) for step, micro, _ in stream)
        assert set(per_step.values()) == {1} and len(per_step) == s.total_steps * s.accum
        assert [step for step, _, _ in stream] == sorted(step for step, _, _ in stream)


def test_rank_rows_come_back_as_micro_batches_per_step():
    """A rank's table (what its Ray dataset holds) -> (step, micro-batches), resumed steps skipped."""
    rows = single_rows(
        [TokenizedExample([5 + i] * (2 + i), [IGNORE_INDEX] + [5 + i] * (1 + i)) for i in range(3)]
    )
    stream = [(0, 0, 2), (0, 1, 0), (1, 0, 1), (1, 1, 2)]  # (step, micro, row)
    table = rank_table(rows, stream).to_pylist()
    got = list(step_batches(iter(table), 0, 0, packed=False))
    assert [step for step, _ in got] == [0, 1] and all(len(micro) == 2 for _, micro in got)
    assert got[0][1][0]["input_ids"].tolist() == [[7, 7, 7, 7]]  # row 2 first, as the stream says
    assert got[1][1][0]["input_ids"].tolist() == [[6, 6, 6]]
    resumed = list(step_batches(iter(table), 1, 0, packed=False))
    assert [step for step, _ in resumed] == [1]


def test_pad_token_id_falls_back_to_eos(tokenizer):
    import copy

    assert tokenizer.pad_token_id is not None and pad_token_id(tokenizer) == tokenizer.pad_token_id
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None and pad_token_id(no_pad) == tokenizer.eos_token_id


# --------------------------------------------------------------------------------------------
# Resume checks


def test_resume_refuses_changed_settings(tmp_path):
    run_dir = tmp_path / "nat"
    cfg = TrainConfig(max_steps=2)
    fp = run_fingerprint(cfg, "/models/m", gpu=False)
    assert check_resume(run_dir, fp) is False
    write_fingerprint(run_dir, fp)
    assert check_resume(run_dir, fp) is False  # no checkpoint yet: a fresh start
    (run_dir / "step_000002").mkdir()
    assert check_resume(run_dir, run_fingerprint(TrainConfig(max_steps=4), "/models/m", False)) is True
    with pytest.raises(ConfigError, match=r"learning_rate: 5e-05 -> 0\.001.*new train.run_name"):
        check_resume(run_dir, run_fingerprint(TrainConfig(learning_rate=1e-3), "/models/m", False))
    assert json.loads((run_dir / "nat_run.json").read_text())["resolved_model"] == "/models/m"


def test_format_result_summarizes_a_resumed_lora_run():
    result = TrainResult(
        run_dir="/runs/train/lora",
        export={"model": "/runs/train/lora/export/model", "adapter": "/runs/train/lora/export/adapter"},
        data={"positives": 3, "negatives": 3, "examples": 6, "truncated": 1, "dropped_overlong": 0,
              "dropped_no_loss": 0, "rows": 2, "tokens": 1300, "loss_tokens": 400,
              "packing_efficiency": 0.635},
        schedule={"total_steps": 4, "steps_per_epoch": 1, "global_batch": 2, "micro_batch": 1,
                  "workers": 2, "accum": 1},
        start_step=2,
        step=4,
        history=[{"step": 3, "loss": 2.5}, {"step": 4, "loss": 2.0}],
        final_loss=2.0,
        seconds=12.5,
        resumed=True,
        checkpoint=None,
    )  # fmt: skip
    assert json.loads(json.dumps(result.to_dict()))["start_step"] == 2  # what --json writes
    lines = format_result(result).splitlines()
    assert lines[0].endswith("-> 2 rows, 1300 tokens (400 with loss), packing efficiency 64%")
    assert (
        lines[1]
        == "schedule  4 steps (1 per epoch, global batch 2, micro-batch 1 x 2 workers x 1 accumulation)"
    )
    assert lines[2] == "training  steps 2 -> 4 (resumed), final loss 2.0000, 12.5s"
    assert lines[3] == "loss      step 3: 2.5000 -> step 4: 2.0000"
    assert lines[4:6] == [
        "export    model: /runs/train/lora/export/model",
        "export    adapter: /runs/train/lora/export/adapter",
    ]
    assert lines[6].startswith("run dir   /runs/train/lora")
    pairs = {
        "questions": 4,
        "paired_questions": 3,
        "pairs": 3,
        "unused_positives": 0,
        "unused_negatives": 2,
        "seed": 7,
    }
    dpo = replace(result, objective="dpo", data={**result.data, "pairs": pairs})
    assert format_result(dpo).splitlines()[0] == (
        "objective dpo: 3 pairs from 3 of 4 questions (0 positives and 2 negatives without a partner, seed 7)"
    )


# --------------------------------------------------------------------------------------------
# Shipped configs


@pytest.mark.parametrize("name", ["train.yaml", "train_lora.yaml"])
def test_shipped_train_configs_load(name):
    cfg = load_config(NatRayConfig, CONFIGS / name)
    assert cfg.train.num_workers == 2 and cfg.train.use_gpu is not True
    assert cfg.train.mode == ("lora" if "lora" in name else "full")


def test_a_pipeline_driver_echoes_the_workers_step_lines(tmp_path, caplog):
    """Ray started by the rollout hides the workers' output: the driver logs their step lines instead."""
    import logging

    from nat_ray.train.run import ProgressEcho
    from nat_ray.train.worker import write_progress

    with caplog.at_level(logging.INFO, logger="nat_ray.train.run"):
        with ProgressEcho(tmp_path, enabled=True, every_s=0.05):
            write_progress(str(tmp_path), "step 1/4  loss 1.0")
            deadline = time.time() + 5
            while "step 1/4" not in caplog.text and time.time() < deadline:
                time.sleep(0.02)
            write_progress(str(tmp_path), "step 2/4  loss 0.5")
            while "step 2/4" not in caplog.text and time.time() < deadline:
                time.sleep(0.02)
    lines = [r.getMessage() for r in caplog.records if "step" in r.getMessage()]
    assert lines == [f"{tmp_path.name}: step 1/4  loss 1.0", f"{tmp_path.name}: step 2/4  loss 0.5"]
    with ProgressEcho(tmp_path, enabled=False) as off:
        assert not off.thread.is_alive()
