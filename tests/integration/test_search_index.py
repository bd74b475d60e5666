"""The search index built by Ray Data actors, then answered from memory-mapped shards in another process.

Real local Ray, real MiniLM model, 240 paragraphs of the shipped HotpotQA sample (the Ray Data
build of `nat-ray index`); about a minute on 2 cores.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from nat_ray.paths import PACKAGE_DATA_DIR
from nat_ray.tools.search import index_store

pytestmark = pytest.mark.integration

SAMPLE = PACKAGE_DATA_DIR / "hotpotqa" / "corpus_sample.jsonl.gz"
PARAGRAPHS = 240


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    with gzip.open(SAMPLE, "rt", encoding="utf-8") as f:
        lines = f.readlines()[:PARAGRAPHS]
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def test_nat_ray_index_builds_with_ray_data_and_actors_search_the_shards(
    local_ray, corpus, tmp_path, monkeypatch, caplog, capsys
):
    import ray

    from nat_ray.cli import main

    monkeypatch.setenv("NAT_RAY_CACHE", str(tmp_path))  # read by the driver, which writes every shard
    with caplog.at_level(logging.INFO, logger="nat_ray.tools.search.index_build"):
        code = main(["index", "--corpus", str(corpus), "--set", "tools.index_shard_rows=100"])
    assert code == 0
    out = capsys.readouterr().out
    assert f"search index built: {PARAGRAPHS} paragraphs, 3 shard(s), exact search" in out
    assert "Ray Data actor(s)" in caplog.text and "ETA" in caplog.text
    (folder,) = [p for p in (tmp_path / "search").iterdir() if p.is_dir()]
    manifest = index_store.read_manifest(folder)
    assert manifest["count"] == PARAGRAPHS and index_store.damaged_files(folder, manifest) == {}
    rows = index_store.concat_rows(index_store.open_shards(folder, manifest))
    assert sorted(rows.tolist()) == list(range(PARAGRAPHS))  # every paragraph once, from several actors

    @ray.remote(num_cpus=0)
    def search_in_a_worker(corpus_path: str, cache: str, query: str) -> dict:
        from nat_ray.tools.search.tool import configure_search, search

        index = configure_search(corpus_path=corpus_path, cache_dir=Path(cache))
        observation = search(query)
        return {
            "observation": observation,
            "encoded": index.num_encoded,
            "memmapped": all(isinstance(emb, np.memmap) for emb, _ in index._searcher.shards),
        }

    first_title = json.loads(corpus.read_text(encoding="utf-8").splitlines()[7])["title"]
    got = ray.get(search_in_a_worker.remote(str(corpus), str(tmp_path), first_title))
    assert got["encoded"] == 0 and got["memmapped"]
    assert got["observation"].startswith(f" #1: {first_title}: ")
    assert " #3: " in got["observation"]

    # Run again: the sound index is kept, nothing is embedded.
    assert main(["index", "--corpus", str(corpus), "--set", "tools.index_shard_rows=100"]) == 0
    assert "already built and sound" in capsys.readouterr().out
