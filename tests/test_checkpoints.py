"""``nat_ray.train.checkpoints``: a damaged or unfinished checkpoint is skipped for the last sound one.

Checkpoint folders here are small files shaped like the real ones (DeepSpeed shards, the trainer
state), sealed the way the worker seals them; the real DeepSpeed resume is in
``tests/integration/test_train.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

from nat_ray import safe_files
from nat_ray.config import TrainConfig
from nat_ray.train.checkpoints import (
    PLACEHOLDER_NOTE,
    STATE_FILE,
    checkpoint_folders,
    choose_checkpoint,
    new_checkpoint_name,
    set_aside_damaged,
)
from nat_ray.train.run import check_resume, run_fingerprint, write_fingerprint


def make_checkpoint(run_dir: Path, name: str, step: int, seal: bool = True) -> Path:
    folder = run_dir / name
    (folder / "deepspeed").mkdir(parents=True)
    (folder / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(bytes(range(256)) * 40)
    (folder / "latest").write_text("deepspeed")
    (folder / STATE_FILE).write_text(json.dumps({"step": step}))
    if seal:
        safe_files.seal_dir(folder)
    return folder


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:100])


def test_a_sound_latest_checkpoint_is_chosen(tmp_path):
    make_checkpoint(tmp_path, "step_000001", 1)
    latest = make_checkpoint(tmp_path, "step_000002", 2)
    assert choose_checkpoint(tmp_path, latest) == (latest, [])
    assert choose_checkpoint(tmp_path, None) == (None, [])  # Ray Train has none: a fresh start


def test_a_truncated_shard_makes_the_previous_checkpoint_chosen(tmp_path):
    older = make_checkpoint(tmp_path, "step_000001", 1)
    latest = make_checkpoint(tmp_path, "step_000002", 2)
    truncate(latest / "deepspeed" / "mp_rank_00_model_states.pt")
    chosen, skipped = choose_checkpoint(tmp_path, str(latest))
    assert chosen == older
    (line,) = skipped
    assert str(latest) in line and "mp_rank_00_model_states.pt does not match its sha256 (100 bytes)" in line


def test_an_unsealed_checkpoint_is_an_unfinished_save(tmp_path):
    older = make_checkpoint(tmp_path, "step_000001", 1)
    latest = make_checkpoint(tmp_path, "step_000002", 2, seal=False)
    chosen, skipped = choose_checkpoint(tmp_path, latest)
    assert chosen == older and "did not finish" in skipped[0]


def test_newer_folders_than_ray_trains_latest_are_not_chosen(tmp_path):
    # An unregistered newer folder (a save cut short after sealing) is not Ray Train's to resume.
    older = make_checkpoint(tmp_path, "step_000001", 1)
    latest = make_checkpoint(tmp_path, "step_000002", 2)
    make_checkpoint(tmp_path, "step_000003", 3)
    (latest / STATE_FILE).unlink()
    chosen, skipped = choose_checkpoint(tmp_path, latest)
    assert chosen == older and "trainer_state.json is missing" in skipped[0]


def test_no_sound_checkpoint_means_a_fresh_start_with_every_one_named(tmp_path):
    first = make_checkpoint(tmp_path, "step_000001", 1)
    latest = make_checkpoint(tmp_path, "step_000002", 2)
    truncate(first / "deepspeed" / "mp_rank_00_model_states.pt")
    (latest / "latest").unlink()
    chosen, skipped = choose_checkpoint(tmp_path, latest)
    assert chosen is None and len(skipped) == 2


def test_damaged_folders_are_set_aside_behind_a_placeholder(tmp_path):
    older = make_checkpoint(tmp_path, "step_000001", 1)
    latest = make_checkpoint(tmp_path, "step_000002", 2)
    truncate(latest / "deepspeed" / "mp_rank_00_model_states.pt")
    (line,) = set_aside_damaged(tmp_path)
    assert "step_000002" in line and "step_000002.damaged" in line
    kept = tmp_path / "step_000002.damaged"
    assert (kept / "deepspeed" / "mp_rank_00_model_states.pt").stat().st_size == 100  # kept as found
    # Ray Train's snapshot still lists step_000002, so something must stay under that name.
    assert (latest / PLACEHOLDER_NOTE).is_file() and len(list(latest.iterdir())) == 1
    assert choose_checkpoint(tmp_path, latest)[0] == older
    assert set_aside_damaged(tmp_path) == []  # the placeholder is not set aside again
    assert checkpoint_folders(tmp_path) == [latest, older]  # .damaged is not a checkpoint


def test_a_new_save_at_a_used_step_gets_its_own_folder(tmp_path):
    assert new_checkpoint_name(tmp_path, 2) == "step_000002"
    (tmp_path / "step_000002").mkdir()
    assert new_checkpoint_name(tmp_path, 2) == "step_000002-1"
    (tmp_path / "step_000002-1").mkdir()
    assert new_checkpoint_name(tmp_path, 2) == "step_000002-2"
    make_checkpoint(tmp_path, "step_000002-2", 2)
    assert checkpoint_folders(tmp_path)[0].name == "step_000002-2"  # newest repeat sorts first


def test_the_resume_check_sets_damage_aside_and_survives_a_damaged_run_file(tmp_path, caplog):
    fp = run_fingerprint(TrainConfig(), "/models/m", False)
    write_fingerprint(tmp_path, fp)
    make_checkpoint(tmp_path, "step_000001", 1)
    truncate(make_checkpoint(tmp_path, "step_000002", 2) / "deepspeed" / "mp_rank_00_model_states.pt")
    with caplog.at_level("WARNING"):
        assert check_resume(tmp_path, fp) is True
    assert "step_000002.damaged" in caplog.text
    (tmp_path / "nat_run.json").write_text('{"resolved_mod')
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert check_resume(tmp_path, fp) is True  # no crash
    assert "nat_run.json" in caplog.text and (tmp_path / "nat_run.json.damaged").is_file()
