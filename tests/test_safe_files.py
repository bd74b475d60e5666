"""``nat_ray.safe_files``: atomic writes, kept checksums, and damage named instead of read half."""

from __future__ import annotations

import json
import threading

import pytest

from nat_ray import safe_files
from nat_ray.safe_files import DamagedFile


def test_write_then_read_round_trips_and_keeps_a_checksum(tmp_path):
    path = safe_files.write_json(tmp_path / "state.json", {"step": 3})
    assert safe_files.read_json(path) == {"step": 3}
    side = safe_files.checksum_path(path)
    assert side.read_text().split() == [safe_files.sha256_file(path), "state.json"]
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []  # no temp file left


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],  # truncated
        lambda b: b.replace(b"3", b"4"),  # same length, one byte changed
        lambda b: b"",  # emptied
    ],
)
def test_changed_bytes_fail_the_checksum(tmp_path, damage):
    path = safe_files.write_json(tmp_path / "state.json", {"step": 3})
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DamagedFile, match="does not match") as err:
        safe_files.read_json(path)
    assert err.value.path == path


def test_a_file_without_checksum_is_read_unless_one_is_required(tmp_path):
    path = tmp_path / "old.json"
    path.write_text('{"a": 1}')
    assert safe_files.read_json(path) == {"a": 1}
    with pytest.raises(DamagedFile, match="no checksum"):
        safe_files.read_json(path, require_checksum=True)


def test_garbage_without_checksum_is_damaged_not_a_json_error(tmp_path):
    path = tmp_path / "old.json"
    path.write_bytes(b"\xff\xfe{")
    with pytest.raises(DamagedFile, match="not valid JSON"):
        safe_files.read_json(path)


def test_set_aside_keeps_the_file_and_its_checksum_numbered(tmp_path):
    path = safe_files.write_bytes(tmp_path / "m.json", b"one")
    first = safe_files.set_aside(path)
    assert first.name == "m.json.damaged" and first.read_bytes() == b"one"
    assert safe_files.checksum_path(first).is_file() and not path.exists()
    safe_files.write_bytes(path, b"two")
    assert safe_files.set_aside(path).name == "m.json.damaged2"
    assert first.read_bytes() == b"one"
    assert safe_files.set_aside(tmp_path / "never.json") is None


def test_seal_records_a_file_another_library_wrote(tmp_path):
    path = tmp_path / "part.parquet"
    path.write_bytes(b"PAR1 data PAR1")
    safe_files.seal(path)
    assert safe_files.read_bytes(path, require_checksum=True) == b"PAR1 data PAR1"
    path.write_bytes(b"PAR1 da")
    with pytest.raises(DamagedFile):
        safe_files.read_bytes(path)


def test_a_sealed_folder_names_its_missing_and_changed_files(tmp_path):
    folder = tmp_path / "ckpt"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"a" * 100)
    (folder / "sub" / "b.bin").write_bytes(b"b" * 10)
    (folder / "c.json").write_text(json.dumps({"x": 1}))
    safe_files.seal_dir(folder)
    assert safe_files.check_dir(folder) == []
    (folder / "a.bin").write_bytes(b"a" * 50)
    (folder / "sub" / "b.bin").unlink()
    (folder / "new.txt").write_text("files added later are not checked")
    problems = safe_files.check_dir(folder)
    assert len(problems) == 2
    assert "a.bin does not match its sha256 (50 bytes)" in problems
    assert "sub/b.bin is missing" in problems


def test_an_unsealed_folder_is_sound_only_when_no_seal_is_required(tmp_path):
    (tmp_path / "f").mkdir()
    assert safe_files.check_dir(tmp_path / "f") == []
    assert "has no CHECKSUMS.sha256" in safe_files.check_dir(tmp_path / "f", require_checksum=True)[0]
    assert "is not a folder" in safe_files.check_dir(tmp_path / "missing")[0]


# ----------------------------------------------------------------------------------------------
# Staged files and folders: whole or not at all, never a moment without the target


def test_staged_dir_replaces_a_folder_whole_and_leaves_no_temp(tmp_path):
    target = tmp_path / "adapter"
    for version in ("1", "2"):
        with safe_files.staged_dir(target) as staging:
            staging.mkdir()
            (staging / "weights").write_text(version)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert [p.name for p in target.iterdir()] == ["weights"] and (target / "weights").read_text() == "2"


def test_a_failed_stage_leaves_the_old_folder_and_file_and_no_temp(tmp_path):
    target, file = tmp_path / "adapter", tmp_path / "plot.png"
    with safe_files.staged_dir(target) as staging:
        staging.mkdir()
        (staging / "weights").write_text("old")
    file.write_text("old")
    for stage, path in ((safe_files.staged_dir, target), (safe_files.staged_file, file)):
        with pytest.raises(RuntimeError), stage(path) as tmp:
            if stage is safe_files.staged_dir:
                tmp.mkdir()
            (tmp / "weights" if tmp.is_dir() else tmp).write_text("half")
            raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "plot.png"]
    assert (target / "weights").read_text() == "old" and file.read_text() == "old"


def test_staged_file_keeps_the_suffix_writers_choose_a_format_by(tmp_path):
    with safe_files.staged_file(tmp_path / "curve.png") as tmp:
        assert tmp.suffix == ".png" and tmp.name.startswith(".")
        tmp.write_bytes(b"png")
    assert (tmp_path / "curve.png").read_bytes() == b"png"


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_dir_with_and_without_an_atomic_swap(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(safe_files, "_exchange", lambda a, b: False)
    target = tmp_path / "out"
    for version in range(3):
        staged = tmp_path / f".new{version}"
        staged.mkdir()
        (staged / "v").write_text(str(version))
        safe_files.replace_dir(staged, target)
        assert (target / "v").read_text() == str(version) and not staged.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_reader_never_finds_the_folder_missing_while_it_is_replaced(tmp_path):
    if not safe_files._exchange(tmp_path, tmp_path):  # no renameat2 here: the fallback has a gap
        pytest.skip("this OS cannot swap two paths in one step")
    target = tmp_path / "adapter"
    target.mkdir()
    missing, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            if not target.is_dir():
                missing.append(1)

    reader = threading.Thread(target=watch)
    reader.start()
    try:
        for version in range(200):
            with safe_files.staged_dir(target) as staging:
                staging.mkdir()
                (staging / "v").write_text(str(version))
    finally:
        stop.set()
        reader.join()
    assert missing == [] and (target / "v").read_text() == "199"
