"""The search index on disk: shards and their checksums, exact vs FAISS search, damaged files rebuilt.

The shard format and both searches run on synthetic vectors (milliseconds); building and repairing
an index embeds 24 real HotpotQA paragraphs with the real MiniLM model, in this process.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from nat_ray import safe_files
from nat_ray.config import ToolsConfig
from nat_ray.errors import ConfigError
from nat_ray.paths import PACKAGE_DATA_DIR
from nat_ray.tools.search import index_store
from nat_ray.tools.search.index_build import IndexOptions, ensure_index
from nat_ray.tools.search.tool import LocalSearchIndex, default_model_path, load_model

SAMPLE = PACKAGE_DATA_DIR / "hotpotqa" / "corpus_sample.jsonl.gz"


def unit_vectors(n: int, dim: int = 32, clusters: int = 20, seed: int = 0) -> np.ndarray:
    """Clustered, L2-normalized vectors: like sentence embeddings, neighbours share a topic."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim))
    x = centers[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]


# ---------------------------------------------------------------------------------------------------
# Shard format


def test_shard_writer_cuts_shards_and_keeps_checksums(tmp_path):
    vectors = unit_vectors(250)
    rows = np.random.default_rng(1).permutation(250)
    writer = index_store.ShardWriter(tmp_path, shard_rows=100)
    for start in range(0, 250, 30):  # batches that do not line up with shards
        writer.add(vectors[rows[start : start + 30]], rows[start : start + 30])
    shards = writer.close()
    assert [s["count"] for s in shards] == [100, 100, 50]
    manifest = {"version": index_store.FORMAT_VERSION, "count": 250, "dim": 32, "shards": shards}
    index_store.write_manifest(tmp_path, manifest)
    assert index_store.read_manifest(tmp_path) == manifest
    assert index_store.damaged_files(tmp_path, manifest) == {}
    opened = index_store.open_shards(tmp_path, manifest)
    assert all(isinstance(emb, np.memmap) and emb.dtype == np.float16 for emb, _ in opened)
    got_rows = index_store.concat_rows(opened)
    assert sorted(got_rows.tolist()) == list(range(250))
    got = np.concatenate([np.asarray(emb, dtype=np.float32) for emb, _ in opened])
    assert np.allclose(got, vectors[got_rows], atol=1e-3)  # float16 precision
    for shard in shards:
        assert safe_files.expected_sha256(tmp_path / shard["file"]) == safe_files.sha256_file(
            tmp_path / shard["file"]
        )


def test_damaged_files_names_changed_and_truncated_shards(tmp_path):
    writer = index_store.ShardWriter(tmp_path, shard_rows=40)
    writer.add(unit_vectors(100), np.arange(100))
    shards = writer.close()
    manifest = {"version": index_store.FORMAT_VERSION, "count": 100, "dim": 32, "shards": shards}
    flipped = tmp_path / shards[0]["file"]
    data = bytearray(flipped.read_bytes())
    data[-5] ^= 0xFF
    flipped.write_bytes(bytes(data))
    truncated = tmp_path / shards[2]["file"]
    truncated.write_bytes(truncated.read_bytes()[:100])
    problems = index_store.damaged_files(tmp_path, manifest)
    assert set(problems) == {shards[0]["file"], shards[2]["file"]}
    assert "sha256" in problems[shards[0]["file"]]
    # Without hashing, a truncated file is still caught by its .npy header and size.
    assert shards[2]["file"] in index_store.damaged_files(tmp_path, manifest, full=False)


def test_manifest_without_checksum_or_fields_is_damaged(tmp_path):
    (tmp_path / index_store.MANIFEST).write_text(json.dumps({"count": 1}))
    with pytest.raises(safe_files.DamagedFile, match="checksum"):
        index_store.read_manifest(tmp_path)
    safe_files.write_json(tmp_path / index_store.MANIFEST, {"count": 1})
    with pytest.raises(safe_files.DamagedFile, match="fields"):
        index_store.read_manifest(tmp_path)


# ---------------------------------------------------------------------------------------------------
# Exact and approximate search


def test_exact_search_over_chunked_shards_matches_brute_force():
    vectors = unit_vectors(1_000)
    queries = unit_vectors(20, seed=5)
    shards = [
        (vectors[i : i + 300].astype(np.float16), np.arange(i, min(i + 300, 1_000)))
        for i in range(0, 1_000, 300)
    ]
    scores, rows = index_store.ExactSearch(shards, chunk_rows=128).search(queries, 5)
    truth = brute_force(vectors.astype(np.float16).astype(np.float32), queries, 5)
    assert index_store.recall_at_k(rows, truth) == 1.0
    assert np.all(np.diff(scores, axis=1) <= 0)  # best first


def test_faiss_ivf_agrees_with_exact_search():
    vectors = unit_vectors(8_000, dim=32, clusters=40)
    queries = unit_vectors(200, dim=32, clusters=40, seed=9)
    order = np.random.default_rng(2).permutation(8_000)  # shards hold rows in build order
    shards = [
        (vectors[order[i : i + 3_000]].astype(np.float16), order[i : i + 3_000])
        for i in range(0, 8_000, 3_000)
    ]
    params = index_store.AnnParams.for_size(8_000)
    assert params.nlist == int(2 * np.sqrt(8_000)) and params.nprobe == 32
    index, rows = index_store.build_ann(shards, params)
    _, exact_rows = index_store.ExactSearch(shards).search(queries, 3)
    _, ann_rows = index_store.AnnSearch(index, rows).search(queries, 3)
    assert index_store.recall_at_k(ann_rows, exact_rows) >= 0.95


def test_faiss_file_round_trips_through_its_checksum(tmp_path):
    vectors = unit_vectors(2_000)
    shards = [(vectors.astype(np.float16), np.arange(2_000))]
    index, rows = index_store.build_ann(shards, index_store.AnnParams.for_size(2_000))
    entry = index_store.write_ann(tmp_path, index)
    assert safe_files.expected_sha256(tmp_path / entry["file"]) is not None
    again = index_store.read_ann(tmp_path, entry)
    queries = unit_vectors(10, seed=3)
    assert np.array_equal(
        index_store.AnnSearch(again, rows).search(queries, 3)[1],
        index_store.AnnSearch(index, rows).search(queries, 3)[1],
    )


def test_index_options_are_validated():
    with pytest.raises(ConfigError, match="index_actors"):
        ToolsConfig(index_actors=-1)
    with pytest.raises(ConfigError, match="ann_min_paragraphs"):
        ToolsConfig(ann_min_paragraphs=0)


# ---------------------------------------------------------------------------------------------------
# Building, and rebuilding what is damaged (real model, 24 paragraphs, in this process)


@pytest.fixture(scope="module")
def model():
    return load_model(default_model_path())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    with gzip.open(SAMPLE, "rt", encoding="utf-8") as f:
        lines = f.readlines()[:24]
    path = tmp_path_factory.mktemp("corpus") / "small.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def build(corpus: Path, cache: Path, model, **options) -> object:
    opts = IndexOptions(shard_rows=10, batch_size=8, **options)
    return ensure_index(corpus, default_model_path().resolve(), cache, opts, model=model, use_ray=False)


def test_build_logs_an_estimate_then_reuses_the_index(corpus, tmp_path, model, caplog):
    with caplog.at_level(logging.INFO, logger="nat_ray.tools.search.index_build"):
        info = build(corpus, tmp_path, model)
    assert info.encoded == 24 and [s["count"] for s in info.manifest["shards"]] == [10, 10, 4]
    text = caplog.text
    assert "building the search index of 24 paragraphs" in text and "about " in text
    assert "paragraphs/s" in text and "ETA" in text
    assert build(corpus, tmp_path, model).encoded == 0


def test_damaged_shard_is_named_set_aside_and_rebuilt(corpus, tmp_path, model, caplog):
    info = build(corpus, tmp_path, model)
    index = LocalSearchIndex(corpus, cache_dir=tmp_path, model=model, shard_rows=10)
    before = index.search("Henry Roth", k=3)
    shard = info.folder / info.manifest["shards"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:-64])  # truncated
    with caplog.at_level(logging.WARNING, logger="nat_ray.tools.search.index_build"):
        again = LocalSearchIndex(corpus, cache_dir=tmp_path, model=model, shard_rows=10).load()
    assert shard.name in caplog.text and "damaged" in caplog.text
    assert (info.folder / (shard.name + ".damaged")).is_file()
    assert again.num_encoded == 10  # only the damaged shard was embedded again
    assert index_store.damaged_files(info.folder, index_store.read_manifest(info.folder)) == {}
    assert again.search("Henry Roth", k=3) == before


def test_damaged_faiss_file_is_rebuilt_without_embedding(corpus, tmp_path, model, caplog):
    info = build(corpus, tmp_path, model, ann_min_paragraphs=1)
    assert info.manifest["ann"]["file"] == index_store.ANN_FILE
    ann = info.folder / index_store.ANN_FILE
    data = bytearray(ann.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ann.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="nat_ray.tools.search.index_build"):
        repaired = build(corpus, tmp_path, model, ann_min_paragraphs=1)
    assert index_store.ANN_FILE in caplog.text
    assert repaired.encoded == 0 and repaired.repaired == (index_store.ANN_FILE,)
    assert (info.folder / (index_store.ANN_FILE + ".damaged")).is_file()
    searcher = LocalSearchIndex(corpus, cache_dir=tmp_path, model=model, ann_min_paragraphs=1).load()
    assert searcher.approximate and searcher.num_encoded == 0
    assert len(searcher.search("Henry Roth", k=3)) == 3


def test_damaged_manifest_means_a_full_rebuild(corpus, tmp_path, model, caplog):
    info = build(corpus, tmp_path, model)
    (info.folder / index_store.MANIFEST).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="nat_ray.tools.search.index_build"):
        again = build(corpus, tmp_path, model)
    assert "manifest" in caplog.text
    assert again.encoded == 24
    assert info.folder.with_name(info.folder.name + ".damaged").is_dir()


def test_progress_logs_at_the_first_vectors_and_prices_the_eta_in_characters(monkeypatch, caplog):
    import nat_ray.tools.search.index_build as search_index

    clock = iter([100.0, 110.0, 111.0])  # start, the first batch 10 s later, the second 1 s after it
    monkeypatch.setattr(search_index.time, "perf_counter", lambda: next(clock))
    progress = search_index.Progress(total=4, what="embedding", chars=1000)
    with caplog.at_level(logging.INFO, logger="nat_ray.tools.search.index_build"):
        progress.update(1, 500)  # the longest paragraph first: half of the characters in 10 s
        progress.update(1, 250)  # within PROGRESS_EVERY_S of the first line: not logged
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    # By paragraphs, 3 of 4 left at 10 s each would be 30 s; by characters half is left: 10 s.
    assert "1/4 paragraphs" in lines[0] and lines[0].endswith("ETA 10s"), lines


def test_progress_prices_the_first_eta_at_the_workers_pace_not_their_start_up(monkeypatch, caplog):
    import nat_ray.tools.search.index_build as search_index

    clock = iter([100.0, 140.0])  # the first vectors 40 s after the start: 30 s of it start-up
    monkeypatch.setattr(search_index.time, "perf_counter", lambda: next(clock))
    progress = search_index.Progress(total=4, what="embedding", chars=1000, workers=2)
    with caplog.at_level(logging.INFO, logger="nat_ray.tools.search.index_build"):
        progress.update(1, 250, busy_s=10.0)  # one worker's 10 s of encoding: a quarter of the corpus
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.endswith("ETA 15s"), line  # 3 quarters left, 10 s each, 2 workers


def test_index_names_a_missing_corpus_before_ray_starts(tmp_path, monkeypatch, capsys):
    import ray

    from nat_ray.cli import main

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray must not start for a missing corpus"))
    assert main(["index", "--corpus", str(tmp_path / "none.jsonl")]) == 2
    assert f"tools.search_corpus: {tmp_path / 'none.jsonl'} does not exist" in capsys.readouterr().err
