"""``nat_ray.experiment.pipeline``'s bookkeeping: the manifest, resuming stage by stage, config copies, data hashes.

No stage runs here: each stage is a small function that counts its calls.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nat_ray.config import NatRayConfig, PipelineConfig, with_sections
from nat_ray.errors import ConfigError
from nat_ray.experiment.pipeline import Manifest, file_hashes, run_stage

SHA256_ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256(b"abc")
SHA256_EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # sha256(b"")


class Stage:
    """A stage function that counts its calls and returns ``outputs`` (or raises ``error``)."""

    def __init__(self, outputs: dict | None = None, error: Exception | None = None) -> None:
        self.outputs = outputs if outputs is not None else {"data": ["part-0.parquet"]}
        self.error = error
        self.calls = 0

    def __call__(self) -> dict:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.outputs


@pytest.fixture
def cfg() -> NatRayConfig:
    return NatRayConfig(pipeline=PipelineConfig(name="exp1"))


@pytest.fixture
def path(tmp_path) -> Path:
    return tmp_path / "manifest.json"


def on_disk(path: Path) -> dict:
    return json.loads(path.read_text())


def test_a_new_manifest_is_written_at_once_with_provenance(path, cfg):
    Manifest(path, cfg)
    data = on_disk(path)
    assert data["stages"] == {} and data["name"] == "exp1"
    assert data["config"]["pipeline"]["name"] == "exp1"
    assert {"versions", "git_commit", "python", "machine"} <= set(data)
    assert not list(path.parent.glob(".manifest.json.tmp*"))


def test_run_stage_runs_once_and_records_outputs(path, cfg):
    manifest = Manifest(path, cfg)
    stage = Stage({"data": ["a"], "rows": 3})
    entry = run_stage(manifest, "rollout", stage)
    assert stage.calls == 1
    assert entry["status"] == "done" and entry["data"] == ["a"] and entry["rows"] == 3
    assert entry["seconds"] >= 0
    assert run_stage(manifest, "rollout", stage) == entry and stage.calls == 1  # done: skipped


def test_a_done_stage_is_skipped_on_resume_with_outputs_from_disk(path, cfg):
    first = run_stage(Manifest(path, cfg), "rollout", Stage({"data": ["runs/x/rollout"]}))
    again = Stage({"data": ["something else"]})
    resumed = run_stage(Manifest(path, cfg), "rollout", again)  # a new process on the same run
    assert again.calls == 0
    assert resumed == first and resumed["data"] == ["runs/x/rollout"]


def test_the_manifest_is_rewritten_after_every_stage(path, cfg):
    manifest = Manifest(path, cfg)
    run_stage(manifest, "rollout", Stage({"data": ["d"]}))

    def train() -> dict:
        # While the second stage runs, the first is already on disk: a crash now loses nothing.
        assert on_disk(path)["stages"]["rollout"]["status"] == "done"
        assert "train:nat" not in on_disk(path)["stages"]
        return {"export": "e"}

    run_stage(manifest, "train:nat", train)
    assert set(on_disk(path)["stages"]) == {"rollout", "train:nat"}
    assert Manifest(path, cfg).done("train:nat")["export"] == "e"


def test_a_stage_that_raised_is_not_done_and_reruns(path, cfg):
    manifest = Manifest(path, cfg)
    run_stage(manifest, "rollout", Stage())
    failing = Stage(error=RuntimeError("out of memory"))
    with pytest.raises(RuntimeError, match="out of memory"):
        run_stage(manifest, "train:nat", failing)
    assert manifest.done("train:nat") is None
    assert "train:nat" not in on_disk(path)["stages"]

    retry = Stage({"export": "e"})
    resumed = Manifest(path, cfg)
    assert run_stage(resumed, "train:nat", retry)["export"] == "e" and retry.calls == 1
    assert resumed.done("rollout") is not None  # the earlier stage stays done


def test_only_status_done_counts_as_done(path, cfg):
    manifest = Manifest(path, cfg)
    manifest.data["stages"]["eval:base"] = {"status": "running"}
    assert manifest.done("eval:base") is None and manifest.done("never-ran") is None


def test_resume_keeps_stages_and_refreshes_the_config(path, cfg):
    run_stage(Manifest(path, cfg), "rollout", Stage())
    other = with_sections(cfg, agent={"max_turns": 3})
    Manifest(path, other)
    data = on_disk(path)
    assert data["config"]["agent"]["max_turns"] == 3  # the latest run's config
    assert data["stages"]["rollout"]["status"] == "done"


DAMAGE = {
    "truncated": lambda text: text[: len(text) // 2],
    "garbage": lambda text: "\x00\xff not json at all",
    "not a manifest": lambda text: "[1, 2, 3]",
    # Still valid JSON, but not what was written: only the kept sha256 tells.
    "edited": lambda text: text.replace('"done"', '"failed"'),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_manifest_is_named_set_aside_and_the_stages_run_again(path, cfg, caplog, damage):
    run_stage(Manifest(path, cfg), "rollout", Stage())
    original = path.read_text()
    path.write_text(DAMAGE[damage](original))
    damaged_bytes = path.read_bytes()

    with caplog.at_level("WARNING", logger="nat_ray.experiment.manifest"):
        manifest = Manifest(path, cfg)  # no crash, no half-read stages
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert str(path) in warning.getMessage() and "manifest.json.damaged" in warning.getMessage()
    kept = path.with_name("manifest.json.damaged")
    assert kept.read_bytes() == damaged_bytes  # kept for a person, untouched
    assert manifest.done("rollout") is None
    rerun = Stage({"data": ["again"]})
    assert run_stage(manifest, "rollout", rerun)["data"] == ["again"] and rerun.calls == 1
    assert Manifest(path, cfg).done("rollout")["data"] == ["again"]  # the rebuilt one is sound


def test_a_second_damage_does_not_overwrite_the_first_set_aside(path, cfg):
    for _ in range(2):
        Manifest(path, cfg)
        path.write_text("{")
    Manifest(path, cfg)
    assert path.with_name("manifest.json.damaged").read_text() == "{"
    assert path.with_name("manifest.json.damaged2").read_text() == "{"


def test_a_manifest_written_before_checksums_is_still_read(path, cfg):
    path.write_text(json.dumps({"stages": {"rollout": {"status": "done", "data": ["old"]}}}))
    assert Manifest(path, cfg).done("rollout")["data"] == ["old"]
    assert path.with_name("manifest.json.sha256").is_file()  # sealed from now on


def test_a_half_written_temp_file_is_ignored(path, cfg):
    # save() writes a temporary file beside it and renames it, so a crash mid-write leaves only that.
    run_stage(Manifest(path, cfg), "rollout", Stage())
    path.with_name(".manifest.json.tmp999.1").write_text('{"stages": {')
    manifest = Manifest(path, cfg)
    assert manifest.done("rollout") is not None
    assert json.loads(path.read_text())["stages"]["rollout"]["status"] == "done"


def test_the_manifest_class_is_shared_not_copied():
    from nat_ray.experiment import manifest, pipeline

    assert issubclass(pipeline.Manifest, manifest.Manifest) and pipeline.run_stage is manifest.run_stage


def test_with_sections_copies_and_leaves_the_original(cfg):
    changed = with_sections(cfg, train={"variant": "nut", "run_name": "nut"}, eval={"output_dir": "x"})
    assert (changed.train.variant, changed.train.run_name, changed.eval.output_dir) == ("nut", "nut", "x")
    assert cfg.train.variant == NatRayConfig().train.variant and cfg.eval.output_dir != "x"
    assert changed.train.learning_rate == cfg.train.learning_rate  # other fields kept
    assert changed.engine == cfg.engine and changed.pipeline == cfg.pipeline


def test_with_sections_validates_like_the_config(cfg):
    with pytest.raises(ConfigError, match="pipeline.name"):
        with_sections(cfg, pipeline={"name": "a/b"})
    with pytest.raises(ConfigError, match="unknown train field.*no_such_field"):
        with_sections(cfg, train={"no_such_field": 1})
    with pytest.raises(ConfigError, match="no config section 'trian'"):
        with_sections(cfg, trian={"variant": "nat"})


def test_file_hashes_of_files_and_folders(tmp_path):
    folder = tmp_path / "trajectories"
    folder.mkdir()
    (folder / "b.parquet").write_bytes(b"abc")
    (folder / "a.parquet").write_bytes(b"")
    (folder / "notes.txt").write_bytes(b"not data")
    single = tmp_path / "imported.parquet"
    single.write_bytes(b"abc")
    hashes = file_hashes([str(folder), str(single)])
    assert hashes == {
        str(folder / "a.parquet"): SHA256_EMPTY,
        str(folder / "b.parquet"): SHA256_ABC,
        str(single): SHA256_ABC,
    }
    assert list(hashes)[:2] == [str(folder / "a.parquet"), str(folder / "b.parquet")]  # sorted
    assert file_hashes([]) == {}


def test_data_sources_count_each_sources_positives_and_negatives_by_model(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nat_ray.experiment.pipeline import data_sources, format_sources

    rollout = tmp_path / "rollout"
    rollout.mkdir()
    pq.write_table(
        pa.table({"model": ["base"] * 3, "correct_robust": [False, False, True]}), rollout / "p.parquet"
    )
    teacher = tmp_path / "teacher.parquet"
    pq.write_table(pa.table({"model": ["teacher"] * 2, "correct_robust": [True, True]}), teacher)
    sources = data_sources([str(rollout), str(teacher)])
    assert sources == [
        {"path": str(rollout), "models": {"base": {"trajectories": 3, "positives": 1, "negatives": 2}}},
        {"path": str(teacher), "models": {"teacher": {"trajectories": 2, "positives": 2, "negatives": 0}}},
    ]
    text = format_sources(sources)
    assert f"| {teacher} | teacher | 2 | 2 | 0 |" in text and "## Training data" in text


def test_the_base_is_one_row_or_one_per_way_of_asking():
    from nat_ray.experiment.pipeline import base_label

    assert base_label(1, [1]) == "base"
    assert [base_label(s, [0, 1]) for s in (0, 1)] == ["base-0shot", "base-1shot"]
    with pytest.raises(ConfigError, match="base_shots"):
        PipelineConfig(base_shots=[2])


def test_a_failing_stage_ends_the_pipelines_parent_run_failed(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    import nat_ray.rollout.run
    from nat_ray.experiment.pipeline import run_pipeline

    def broken_rollout(cfg, progress=True):
        raise RuntimeError("the rollout died")

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(nat_ray.rollout.run, "run_rollout", broken_rollout)
    cfg = NatRayConfig(pipeline=PipelineConfig(name="exp", runs_dir=str(tmp_path)))
    with pytest.raises(RuntimeError, match="the rollout died"):
        run_pipeline(cfg)
    client = MlflowClient(tracking_uri=(tmp_path / "exp" / "mlruns").as_uri())
    runs = {
        r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    }
    assert runs["exp"].info.status == "FAILED" and runs["rollout"].info.status == "FAILED"


def test_missing_trajectories_are_refused_before_the_run_folder_is_made(tmp_path):
    from nat_ray.experiment.pipeline import run_pipeline

    cfg = NatRayConfig(
        pipeline=PipelineConfig(
            name="exp", runs_dir=str(tmp_path), extra_trajectories=[str(tmp_path / "none")]
        )
    )
    with pytest.raises(ConfigError, match="extra_trajectories"):
        run_pipeline(cfg)
    assert not (tmp_path / "exp").exists()
