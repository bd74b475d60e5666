"""Building the search index: the corpus embedded by an actor pool over every CPU (or GPU) of the cluster.

``nat-ray index`` runs :func:`main_index`; a rollout's driver runs :func:`ensure_index` before it
starts its search actors, and a search backend that finds no index builds it itself the same way,
so the build happens once, with a logged estimate and an ETA, not silently inside one tool actor.

The corpus is sorted by length (batches of similar paragraphs pad less), cut into blocks, and
embedded with Ray Data ``map_batches`` over :class:`_Embedder` actors, each loading the
sentence-transformers model once and computing on as many torch threads as it reserves CPUs. The
driver receives the float16 vectors as they come and writes a shard each time one is full
(:class:`nat_ray.tools.search.index_store.ShardWriter`), then the FAISS index when the corpus is large enough,
then the manifest, whose presence marks the index complete. Without a running Ray (or for a small
corpus, where starting actors costs more than it saves) the same build runs in this process.

A damaged shard (its sha256 no longer matches, or it is truncated) is named in a warning, set aside
and re-embedded from its rows; a damaged FAISS file is rebuilt from the shards; a damaged manifest
or rows file means a full rebuild. A file lock keeps two processes from building one index at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nat_ray import paths, safe_files
from nat_ray.errors import ConfigError
from nat_ray.ray_runtime import init_ray
from nat_ray.safe_files import DamagedFile
from nat_ray.tools.search import index_store

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from nat_ray.config import NatRayConfig, ToolsConfig

log = logging.getLogger(__name__)

# Below this many paragraphs the build stays in the calling process: actors would take longer to start.
RAY_MIN_PARAGRAPHS = 2_000
# Each actor gets at least this many tasks: the last ones (the shortest paragraphs) even out the finish.
TASKS_PER_ACTOR = 4
SAMPLE_ROWS = 48  # paragraphs encoded up front to estimate the build's duration
PROGRESS_EVERY_S = 5.0
HASH_ALL_BYTES = 1 << 30


@dataclass(frozen=True)
class IndexOptions:
    """How an index is built (the ``tools.index_*`` and ``tools.ann_min_paragraphs`` fields)."""

    ann_min_paragraphs: int = 200_000
    shard_rows: int = 50_000
    batch_size: int = 256
    actors: int = 0

    @staticmethod
    def from_tools(tools: ToolsConfig) -> IndexOptions:
        return IndexOptions(
            ann_min_paragraphs=tools.ann_min_paragraphs,
            shard_rows=tools.index_shard_rows,
            batch_size=tools.index_batch_size,
            actors=tools.index_actors,
        )


@dataclass
class IndexInfo:
    """One index on disk, and what :func:`ensure_index` had to do for it.

    Attributes:
        folder: ``<cache>/search/<key>``.
        manifest: the parsed manifest.
        encoded: paragraphs embedded by this call (0: the index was already there and sound).
        repaired: files that were damaged, set aside and rebuilt by this call.
    """

    folder: Path
    manifest: dict[str, Any]
    encoded: int = 0
    repaired: tuple[str, ...] = ()


def index_folder(
    corpus_path: Path, model_path: Path, cache_root: Path | None = None
) -> tuple[Path, str, str]:
    """``(folder, corpus sha256, model fingerprint)`` of the index of ``corpus_path`` by ``model_path``."""
    corpus_sha = index_store.file_sha256(corpus_path)
    fingerprint = index_store.model_fingerprint(model_path)
    root = (cache_root or paths.cache_dir()) / "search"
    return root / index_store.index_key(corpus_sha, fingerprint), corpus_sha, fingerprint


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """One builder per index across processes (serve replicas, a driver and its actors)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_index(
    corpus_path: Path,
    model_path: Path,
    cache_root: Path | None = None,
    options: IndexOptions = IndexOptions(),
    *,
    records: Sequence[dict[str, Any]] | None = None,
    model: SentenceTransformer | None = None,
    use_ray: bool | None = None,
    rebuild: bool = False,
    full_check: bool = False,
) -> IndexInfo:
    """The sound index of ``corpus_path`` embedded by ``model_path``: found, repaired or built.

    Args:
        records: the corpus, when the caller has read it already.
        model: a loaded model for an in-process build or repair (else loaded when needed).
        use_ray: build with Ray Data actors; ``None`` = when this is a Ray driver (not an actor)
            and the corpus has at least :data:`RAY_MIN_PARAGRAPHS` paragraphs. Otherwise the build
            runs here, on as many torch threads as the machine has cores.
        rebuild: set an existing index aside and build it again.
        full_check: hash every file even when the index is larger than :data:`HASH_ALL_BYTES`.

    Raises:
        DataError, ModelError: the corpus or the model cannot be read.
    """
    folder, corpus_sha, fingerprint = index_folder(corpus_path, model_path, cache_root)
    with _build_lock(folder):
        if rebuild and folder.exists():
            log.warning("rebuilding the search index %s; the old one is set aside", folder)
            safe_files.set_aside(folder)
        info = _check(folder, full_check)
        if info is not None and not info.repaired:
            return info
        records = records if records is not None else index_store.read_corpus(corpus_path)
        texts = [index_store.passage_text(r) for r in records]
        if info is not None:
            return _repair(info, texts, model_path, model, options)
        if use_ray is None:
            use_ray = _in_ray_driver() and len(texts) >= RAY_MIN_PARAGRAPHS
        manifest = {
            "version": index_store.FORMAT_VERSION,
            "corpus": str(corpus_path),
            "corpus_sha256": corpus_sha,
            "model": str(model_path),
            "model_fingerprint": fingerprint,
        }
        encoded = _build(folder, texts, model_path, model, options, use_ray, manifest)
        return IndexInfo(folder, index_store.read_manifest(folder), encoded=encoded)


def _in_ray_driver() -> bool:
    """Ray is up and this is not an actor: a tool actor or Serve replica builds in place, since the
    actor pool it would start could wait forever for CPUs its own stage's engines hold."""
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is None


def _check(folder: Path, full_check: bool = False) -> IndexInfo | None:
    """The index as found (its damaged files still in place, listed in ``repaired``), or None: build it."""
    try:
        manifest = index_store.read_manifest(folder)
    except FileNotFoundError:
        return None
    except DamagedFile as err:
        log.warning(
            "search index manifest is damaged (%s); set aside as %s, rebuilding",
            err.why,
            safe_files.set_aside(folder),
        )
        return None
    if manifest.get("version") != index_store.FORMAT_VERSION:
        log.warning(
            "search index %s has format %s, not %s; rebuilding",
            folder,
            manifest.get("version"),
            index_store.FORMAT_VERSION,
        )
        safe_files.set_aside(folder)
        return None
    # Hashing a multi-GB index in every search process would take seconds each: above HASH_ALL_BYTES
    # only sizes and .npy headers are checked (a truncated copy is still caught); `nat-ray index` hashes all.
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    damaged = index_store.damaged_files(folder, manifest, full=full_check or size <= HASH_ALL_BYTES)
    for name, why in damaged.items():
        log.warning(
            "search index file %s is damaged (%s); setting it aside and rebuilding it", folder / name, why
        )
    if any(name.endswith(".rows.npy") for name in damaged):
        log.warning("a rows file of %s is damaged: the whole index is rebuilt", folder)
        safe_files.set_aside(folder)
        return None
    return IndexInfo(folder, manifest, repaired=tuple(damaged))


def _repair(
    info: IndexInfo,
    texts: Sequence[str],
    model_path: Path,
    model: SentenceTransformer | None,
    options: IndexOptions,
) -> IndexInfo:
    """Re-embed each damaged shard from its rows file and rebuild a damaged FAISS file, in this process."""
    folder, manifest = info.folder, info.manifest
    encoded = 0
    for number, shard in enumerate(manifest["shards"]):
        if shard["file"] not in info.repaired:
            continue
        safe_files.set_aside(folder / shard["file"])
        rows = np.load(folder / shard["rows_file"], allow_pickle=False)
        model = model or _load_local_model(model_path)
        vectors = _encode(model, [texts[r] for r in rows], options.batch_size)
        index_store.write_shard(folder, number, vectors, rows)
        encoded += len(rows)
    ann = manifest.get("ann")
    if ann and ann["file"] in info.repaired:
        safe_files.set_aside(folder / ann["file"])
        manifest["ann"] = _write_ann(folder, manifest)
    index_store.write_manifest(folder, manifest)
    return IndexInfo(folder, index_store.read_manifest(folder), encoded=encoded, repaired=info.repaired)


def _load_local_model(model_path: Path) -> SentenceTransformer:
    return index_store.load_model(model_path)


def _encode(model: SentenceTransformer, texts: Sequence[str], batch_size: int) -> np.ndarray:
    vectors = model.encode(
        list(texts),
        batch_size=min(batch_size, 64),
        convert_to_numpy=True,
        normalize_embeddings=True,
        show_progress_bar=False,
    )
    return np.asarray(vectors, dtype=np.float16)


def _write_ann(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    shards = index_store.open_shards(folder, manifest)
    params = index_store.AnnParams.for_size(manifest["count"])
    log.info(
        "building the approximate (FAISS IVF%d) search index over %d paragraphs",
        params.nlist,
        manifest["count"],
    )
    index, _ = index_store.build_ann(shards, params)
    entry = index_store.write_ann(folder, index)
    log.info("built the FAISS index in %.1f s", time.perf_counter() - started)
    return entry


class Progress:
    """Log lines with paragraphs/s and an ETA: at the first vectors, then every :data:`PROGRESS_EVERY_S` seconds.

    The ETA is priced in characters when ``chars`` are given: the corpus is embedded longest
    first, so paragraphs/s early on would overstate what is left. With ``workers``, updates say
    how many seconds the workers spent encoding (``busy_s``), so the first line's ETA is the
    workers' own rate, not one that counts their start-up and model load.
    """

    def __init__(self, total: int, what: str, chars: int | None = None, workers: int = 0) -> None:
        self.total, self.what, self.done = total, what, 0
        self.total_chars, self.done_chars = chars, 0
        self.workers, self.busy_s = workers, 0.0
        self.started = self.last = time.perf_counter()
        self.logged = False

    def update(self, n: int, chars: int | None = None, busy_s: float | None = None) -> None:
        self.done += n
        self.done_chars += chars or 0
        self.busy_s += busy_s or 0.0
        now = time.perf_counter()
        if not self.logged or now - self.last >= PROGRESS_EVERY_S or self.done >= self.total:
            self.last, self.logged = now, True
            rate = self.done / max(now - self.started, 1e-9)
            if self.total_chars and self.done_chars:
                left = (self.total_chars - self.done_chars) / self.done_chars
            else:
                left = (self.total - self.done) / self.done if self.done else float("inf")
            if self.workers and self.busy_s > 0:  # the work left at the workers' measured pace
                eta = left * self.busy_s / self.workers
            else:
                eta = left * (now - self.started)
            log.info(
                "%s: %d/%d paragraphs (%.0f%%), %.1f paragraphs/s, ETA %s",
                self.what, self.done, self.total, 100 * self.done / self.total, rate, _duration(eta),
            )  # fmt: skip

    @property
    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.started, 1e-9)


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown"
    minutes, secs = divmod(int(seconds + 0.5), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _workers(options: IndexOptions) -> tuple[int, int, int]:
    """``(actors, CPUs each, GPUs each)`` for the build: one actor per GPU, else one per CPU."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return (options.actors or gpus), 0, 1
    cpus = int(resources.get("CPU", 1))
    alive = [node for node in ray.nodes() if node.get("Alive")]
    if len(alive) <= 1:  # a local Ray may advertise more logical CPUs than the machine has cores
        cpus = min(cpus, os.cpu_count() or 1)
    return (options.actors or max(1, cpus)), 1, 0


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _estimate(
    texts: Sequence[str], order: np.ndarray, model_path: Path, threads: int, model=None
) -> tuple[float, int]:
    """``(paragraphs/s, sample size)`` of one worker on ``threads`` torch threads, from a short batch across the lengths."""
    model = model or _load_local_model(model_path)
    sample = min(SAMPLE_ROWS, max(4, len(order) // 10))  # a small corpus is not embedded twice over
    picks = order[np.linspace(0, len(order) - 1, min(sample, len(order))).astype(int)]
    with _torch_threads(threads):
        _encode(model, [texts[i] for i in picks[:4]], 64)  # the first call pays for lazy setup
        started = time.perf_counter()
        _encode(model, [texts[i] for i in picks], 64)
        return len(picks) / max(time.perf_counter() - started, 1e-9), len(picks)


def _build(
    folder: Path,
    texts: Sequence[str],
    model_path: Path,
    model: SentenceTransformer | None,
    options: IndexOptions,
    use_ray: bool,
    manifest: dict[str, Any],
) -> int:
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    order = index_store.length_order(texts)
    if use_ray:
        # No estimate measured here: it would load the model into the driver (imports, weights and
        # a sample batch: ~10 s of a 2-core machine's build) for a figure the actors' first vectors
        # give anyway; the first progress line carries the ETA.
        actors, cpus, gpus = _workers(options)
        where = f"{actors} Ray Data actor(s) ({'1 GPU' if gpus else f'{cpus} CPU'} each)"
        log.info(
            "building the search index of %d paragraphs (%s) with %s on %s, written to %s; "
            "the ETA follows once the actors' first vectors are back",
            len(texts), manifest["corpus"], model_path.name, where, folder,
        )  # fmt: skip
    else:
        model = model or _load_local_model(model_path)
        threads = os.cpu_count() or 1  # a tool actor has 1 (Ray's OMP_NUM_THREADS for num_cpus=0)
        per_worker, sample = _estimate(texts, order, model_path, threads, model)
        log.info(
            "building the search index of %d paragraphs (%s) with %s in this process (%d threads): about %s "
            "(measured %.1f paragraphs/s on %d paragraphs); written to %s",
            len(texts), manifest["corpus"], model_path.name, threads,
            _duration(len(texts) / per_worker), per_worker, sample, folder,
        )  # fmt: skip
    writer = index_store.ShardWriter(folder, options.shard_rows)
    progress = Progress(
        len(texts), "embedding the search corpus", sum(len(t) for t in texts), actors if use_ray else 0
    )
    if use_ray:
        _embed_with_ray(texts, order, model_path, options, (actors, cpus, gpus), writer, progress)
    else:
        with _torch_threads(threads):
            for start in range(0, len(order), options.batch_size):
                rows = order[start : start + options.batch_size]
                writer.add(_encode(model, [texts[r] for r in rows], options.batch_size), rows)
                progress.update(len(rows), sum(len(texts[r]) for r in rows))
    shards = writer.close()
    dim = int(np.load(folder / shards[0]["file"], mmap_mode="r").shape[1])
    manifest.update(count=writer.count, dim=dim, shards=shards, ann=None)
    manifest["embed_seconds"] = round(time.perf_counter() - started, 2)
    manifest["paragraphs_per_s"] = round(progress.rate, 2)
    if writer.count >= options.ann_min_paragraphs:
        manifest["ann"] = _write_ann(folder, manifest)
    index_store.write_manifest(folder, manifest)
    log.info(
        "search index ready: %d paragraphs in %d shard(s), %s search, %.1f s (%s)",
        writer.count, len(shards), "approximate" if manifest["ann"] else "exact",
        time.perf_counter() - started, folder,
    )  # fmt: skip
    return writer.count


class _Embedder:
    """A Ray Data actor: loads the model once, embeds batches on as many threads as it has CPUs."""

    def __init__(self, model_path: str, threads: int, batch_size: int, device: str) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.model = _load_local_model(Path(model_path))
        if device != "cpu":
            self.model.to(device)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        vectors = _encode(self.model, [str(t) for t in batch["text"]], self.batch_size)
        seconds = time.perf_counter() - started  # spread over the rows: a block's rows sum to it
        return {
            "row": batch["row"],
            "embedding": vectors,
            "encode_s": np.full(len(vectors), seconds / len(vectors)),
        }


def _embed_with_ray(
    texts: Sequence[str],
    order: np.ndarray,
    model_path: Path,
    options: IndexOptions,
    workers: tuple[int, int, int],
    writer: index_store.ShardWriter,
    progress: Progress,
) -> None:
    import pyarrow as pa
    import ray

    actors, cpus, gpus = workers
    # A task is one block (Ray Data bundles blocks up to batch_size): with 1,024-row blocks, 1,500
    # paragraphs were one actor's 1,024 and the other's 476, and the first vectors came back at the end.
    per_task = max(16, min(options.batch_size, -(-len(order) // (actors * TASKS_PER_ACTOR))))
    blocks = [
        pa.table({"row": order[s : s + per_task], "text": [texts[r] for r in order[s : s + per_task]]})
        for s in range(0, len(order), per_task)
    ]
    # A dataset keeps the context it was made in: Ray Data's own progress off before it is made
    # (the driver logs its own progress lines).
    ctx = ray.data.DataContext.get_current()
    shown, ctx.enable_progress_bars = ctx.enable_progress_bars, False
    try:
        ds = ray.data.from_arrow(blocks).map_batches(
            _Embedder,
            fn_constructor_kwargs={
                "model_path": str(model_path),
                "threads": cpus,
                "batch_size": options.batch_size,
                "device": "cuda" if gpus else "cpu",
            },
            batch_size=per_task,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cpus,
            num_gpus=gpus,
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            writer.add(batch["embedding"], batch["row"])
            chars = sum(len(texts[r]) for r in batch["row"])
            progress.update(len(batch["row"]), chars, float(batch["encode_s"].sum()))
    finally:
        ctx.enable_progress_bars = shown


def ensure_index_for(
    tools: ToolsConfig, rebuild: bool = False, use_ray: bool | None = None, full_check: bool = False
) -> IndexInfo | None:
    """:func:`ensure_index` for the ``tools`` section's local corpus and model (None for the HTTP backend)."""
    if tools.search_backend != "local":
        return None
    corpus = (
        Path(tools.search_corpus).expanduser() if tools.search_corpus else index_store.default_corpus_path()
    )
    model = Path(tools.search_model).expanduser() if tools.search_model else index_store.default_model_path()
    return ensure_index(
        corpus,
        model.resolve(),
        options=IndexOptions.from_tools(tools),
        use_ray=use_ray,
        rebuild=rebuild,
        full_check=full_check,
    )


def main_index(cfg: NatRayConfig, rebuild: bool = False) -> int:
    """``nat-ray index``: build (or check) the local search index with Ray Data; print where it is."""

    if cfg.tools.search_backend != "local":
        raise ConfigError("nat-ray index builds the local search index; tools.search_backend is 'http'")
    corpus = cfg.tools.search_corpus
    if corpus and not Path(corpus).expanduser().is_file():  # before Ray starts
        raise ConfigError(f"tools.search_corpus: {corpus} does not exist")
    init_ray(1)
    info = ensure_index_for(cfg.tools, rebuild=rebuild, use_ray=True, full_check=True)
    manifest = info.manifest
    state = "built" if info.encoded else "already built and sound"
    print(
        f"search index {state}: {manifest['count']} paragraphs, {len(manifest['shards'])} shard(s), "
        f"{'approximate (FAISS)' if manifest.get('ann') else 'exact'} search -> {info.folder}"
    )
    return 0
