"""Benchmark of how each stage's cost grows with its work (issue 19), one section per stage.

Run from the repository root (about 30 minutes on the 2-core CPU machine, 5 more the first time,
when ``ann_real`` embeds the full corpus into the nat_ray cache; it starts Ray and vLLM, so on a
shared machine under the integration lock)::

    .venv/bin/python benchmarks/scale.py                   # every section
    .venv/bin/python benchmarks/scale.py --only ann        # one section; the others' results are kept
    .venv/bin/python benchmarks/scale.py --quick           # small sizes: a smoke run of the machinery

Writes ``benchmarks/results/scale.json`` (each section's figures under ``sections``, with its own
``seconds`` and ``date``; the headline figures at the top level; ``seconds`` = the sum of the
sections' wall clocks, the whole benchmark) and ``benchmarks/results/scale.png`` (a panel per
section). A section is a function in :data:`SECTIONS` returning its figures, plus a plot function.

Sections:

- ``index_build``: paragraphs/s of the Ray Data build (:func:`nat_ray.tools.search.index_build.ensure_index`,
  an actor pool over every core, float16 shards written) over the build before it: one Ray actor
  with ``num_cpus=1`` loading the model and embedding the same paragraphs in one ``encode`` call,
  as ``ToolActor.warm_up`` did (``index_build_speedup``); and over the build without Ray, in this
  process on torch threads over every core (``ensure_index(use_ray=False)``, run first, before Ray
  starts): ``index_build_over_in_process`` (goal >= 0.9: what the actor pool loses to the best
  one node can do). Same corpus (the first ``--paragraphs`` of the HotpotQA corpus in
  ``shared/data`` when present, else the shipped sample), same machine, one run each, wall clock
  from the start of each build (imports or actor start, and model load, included) to its last vector.
- ``ann``: recall@3 of the FAISS IVF index (:class:`nat_ray.tools.search.index_store.AnnParams`) against exact
  search, and single-query latency p50/p99, at 10k, 100k and 1M synthetic 384-d normalized vectors
  in clusters (embedding 1M real paragraphs would take a day here), float16 as the shards store them.
- ``ann_real``: ``ann_recall_at_3_real``, recall@3 of the same IVF settings (``AnnParams.for_size``:
  IVF207 with nprobe 32 at 10,785 paragraphs; built although the tool itself searches a corpus
  below ``ann_min_paragraphs`` exactly) against exact search on the REAL embeddings of the full
  HotpotQA corpus (the search tool's float16 shards from the nat_ray cache, built there once when
  missing), queried with the 1,100 HotpotQA dev questions it was built from, embedded as the tool
  embeds a query; recall at a few other nprobe beside it. None, with a reason, without the full
  corpus in ``shared/data``.
- ``data_prep`` (``scale_data.py``): the streamed training-data preparation at 1k, 10k and 100k
  synthetic trajectories, seconds per row, the driver's peak RSS and the CPU seconds of the driver
  and its local Ray; ``data_prep_flatness``, ``data_prep_marginal_flatness`` (ms per added row
  1k->10k over 10k->100k).
- ``rollout_curve`` (``scale_stages.py``): the rollout stage on 32, 128 and 512 trajectories on one
  engine actor kept up across sizes, seconds per trajectory and the peak RSS of the driver and of
  the engine actor; ``rollout_time_flatness``, ``rollout_rss_flatness``,
  ``rollout_marginal_flatness`` (seconds per added trajectory 32->128 over 128->512) and
  ``engine_rss_flatness`` (the engine's peak RSS at 128 over at 512).
- ``headline_fractions`` (``scale_stages.py``): each stage as a fraction of this machine's limit,
  measured side by side: rollout tokens/s / raw vLLM on the same prompts, the served agent at 32
  clients / the engine's own batch-32 ceiling, Ray Train + DeepSpeed tokens/s / the bare step.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/scale.py` from the repo root
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import scale_data  # noqa: E402 - beside this script: training data preparation at 1k-100k rows
import scale_stages  # noqa: E402 - beside this script: the rollout curve and the fractions of the limit
from machine_info import machine  # noqa: E402 - beside this script

from nat_ray.paths import find_data_file  # noqa: E402
from nat_ray.tools.search import index_store  # noqa: E402
from nat_ray.tools.search.tool import CORPUS_FILES, default_model_path  # noqa: E402

log = logging.getLogger("benchmarks.scale")

RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
PLOT = RESULTS.with_suffix(".png")
DIM = 384
ANN_SIZES = (10_000, 100_000, 1_000_000)
QUERIES = 200
REAL_QUERY_SPLIT = "dev"  # hotpotqa dev_distractor_1100: the questions the corpus was built from
REAL_NPROBES = (1, 4, 8, 16, 32, 64)
TARGETS = {
    "index_build_speedup": 1.7,
    "index_build_over_in_process": 0.9,
    "ann_recall_at_3": 0.95,
    "ann_recall_at_3_real": 0.95,
    "ann_p50_ms_at_1m": 20.0,
    "rollout_time_flatness": 0.83,
    "rollout_rss_flatness": 0.77,
    "rollout_marginal_flatness": 0.8,
    "engine_rss_flatness": 0.8,
    "data_prep_flatness": 0.77,
    "data_prep_marginal_flatness": 0.8,
    "whole_benchmark_minutes": 40,
}


# ---------------------------------------------------------------------------------------------------
# index_build


def _subset_corpus(paragraphs: int, folder: Path) -> tuple[Path, str]:
    source = find_data_file(*CORPUS_FILES)
    with gzip.open(source, "rt", encoding="utf-8") as f:
        lines = [line for _, line in zip(range(paragraphs), f, strict=False)]
    path = folder / "corpus.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    return path, str(source)


def _one_actor_build(corpus: Path, model_path: Path) -> float:
    """Seconds for the old way: one ``num_cpus=1`` actor loads the model and embeds everything."""
    import ray

    @ray.remote(num_cpus=1)
    class OldSearchActor:
        def build(self, corpus_path: str, model: str) -> int:
            from nat_ray.tools.search.tool import load_model, read_corpus

            records = read_corpus(Path(corpus_path))
            vectors = load_model(Path(model)).encode(
                [index_store.passage_text(r) for r in records],
                batch_size=64,
                convert_to_numpy=True,
                normalize_embeddings=True,
            )
            return len(vectors)

    started = time.perf_counter()
    actor = OldSearchActor.remote()
    ray.get(actor.build.remote(str(corpus), str(model_path)))
    seconds = time.perf_counter() - started
    ray.kill(actor)
    return seconds


def _in_process_build(corpus: Path, model_path: Path, cache: Path) -> float:
    """Seconds for the build without Ray: this process imports sentence-transformers, loads the model
    and embeds every paragraph on torch threads over all cores (``ensure_index(use_ray=False)``, the
    path a small corpus or a process without Ray takes: the same length order, batches and shards)."""
    from nat_ray.tools.search.index_build import IndexOptions, ensure_index

    started = time.perf_counter()
    ensure_index(corpus, model_path, cache, IndexOptions(), use_ray=False)
    return time.perf_counter() - started


def index_build(args: argparse.Namespace) -> dict:
    import ray

    from nat_ray.tools.search.index_build import IndexOptions, ensure_index

    model_path = default_model_path().resolve()
    with tempfile.TemporaryDirectory() as scratch:
        corpus, source = _subset_corpus(args.paragraphs, Path(scratch))
        n = sum(1 for _ in corpus.open(encoding="utf-8"))
        # In this process first, before Ray starts (no Ray process competes for the cores), imports
        # included as the actors' are: torch is not yet imported when this section runs first.
        torch_imported = "torch" in sys.modules
        log.info("index_build: %d paragraphs of %s; the in-process build first", n, source)
        local_s = _in_process_build(corpus, model_path, Path(scratch) / "cache_in_process")
        log.info("in process: %.1f s (%.1f paragraphs/s)", local_s, n / local_s)
        os.environ.setdefault(
            "RAY_worker_niceness", "0"
        )  # the Ray arms' workers at the driver's priority, as init_ray does
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
        try:
            old_s = _one_actor_build(corpus, model_path)
            log.info("one actor: %.1f s (%.1f paragraphs/s)", old_s, n / old_s)
            started = time.perf_counter()
            info = ensure_index(corpus, model_path, Path(scratch) / "cache", IndexOptions(), use_ray=True)
            new_s = time.perf_counter() - started
            log.info("Ray Data: %.1f s (%.1f paragraphs/s)", new_s, n / new_s)
            embed_rate = info.manifest["paragraphs_per_s"]
        finally:
            ray.shutdown()
    return {
        "corpus": source,
        "paragraphs": n,
        "one_actor_seconds": round(old_s, 2),
        "one_actor_paragraphs_per_s": round(n / old_s, 2),
        "ray_data_seconds": round(new_s, 2),
        "ray_data_paragraphs_per_s": round(n / new_s, 2),
        "ray_data_embedding_only_paragraphs_per_s": embed_rate,
        "ray_data_actors": min(int(os.cpu_count() or 1), n),
        "index_build_speedup": round(old_s / new_s, 3),
        "in_process_seconds": round(local_s, 2),
        "in_process_paragraphs_per_s": round(n / local_s, 2),
        "in_process_threads": os.cpu_count() or 1,
        "in_process_torch_already_imported": torch_imported,
        "index_build_over_in_process": round(local_s / new_s, 3),
        "how": "three builds of the same paragraphs, one after the other, each timed from its start (imports "
        "or actor start, model load) to its last vector: in this process without Ray (ensure_index "
        "use_ray=False: torch on every core, sorted by length, batches of 64, float16 shards written, "
        "after a 52-paragraph timing sample for its ETA), then under Ray one num_cpus=1 actor (one encode "
        "call), then the Ray Data build (ensure_index use_ray=True: one actor per core); "
        "index_build_over_in_process = Ray Data paragraphs/s / in-process paragraphs/s",
    }


def plot_index_build(ax, figures: dict) -> None:
    labels = ["one actor\n(before)", "Ray Data\n(every core)"]
    rates = [figures["one_actor_paragraphs_per_s"], figures["ray_data_paragraphs_per_s"]]
    colors = ["#999999", "#1f77b4"]
    if "in_process_paragraphs_per_s" in figures:  # absent from results before it was measured
        labels.append("in process\n(every core, no Ray)")
        rates.append(figures["in_process_paragraphs_per_s"])
        colors.append("#2ca02c")
    ax.bar(labels, rates, color=colors)
    ax.set_ylabel("paragraphs / s")
    ax.set_title(
        f"search index build: {figures['index_build_speedup']:.2f}x one actor, "
        f"{figures.get('index_build_over_in_process')} of in process ({figures['paragraphs']} paragraphs)",
        fontsize=9,
    )


# ---------------------------------------------------------------------------------------------------
# ann


def clustered_vectors(
    n: int, rng: np.random.Generator, centers: np.ndarray, chunk: int = 100_000
) -> np.ndarray:
    """``n`` normalized float16 vectors around ``centers`` (neighbours share a topic, as embeddings do)."""
    parts = []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centers[rng.integers(0, len(centers), m)] + 0.7 * rng.standard_normal((m, DIM), dtype=np.float32)
        parts.append((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16))
    return np.concatenate(parts)


def _latencies_ms(
    searcher: index_store.ExactSearch | index_store.AnnSearch, queries: np.ndarray
) -> tuple[list, list]:
    """One query at a time, as the search tool asks: milliseconds each, and the rows found."""
    times, found = [], []
    for q in queries:
        started = time.perf_counter()
        found.append(searcher.search(q[None, :], 3)[1][0])
        times.append((time.perf_counter() - started) * 1e3)
    return times, found


def ann(args: argparse.Namespace) -> dict:
    rows = []
    for n in args.sizes:
        rng = np.random.default_rng(n)
        centers = rng.standard_normal((max(10, n // 100), DIM)).astype(np.float32)
        vectors = clustered_vectors(n, rng, centers)
        queries = clustered_vectors(QUERIES, rng, centers).astype(np.float32)
        shards = [(vectors, np.arange(n))]
        exact = index_store.ExactSearch(shards)
        # Exact search one query at a time costs seconds at 1M: its p50 from fewer queries there.
        exact_queries = 50 if n <= 100_000 else 10
        exact_ms, _ = _latencies_ms(exact, queries[:exact_queries])
        truth = exact.search(queries, 3)[1]
        params = index_store.AnnParams.for_size(n)
        started = time.perf_counter()
        index, ids = index_store.build_ann(shards, params)
        build_s = time.perf_counter() - started
        approx = index_store.AnnSearch(index, ids)
        ann_ms, found = _latencies_ms(approx, queries)
        row = {
            "paragraphs": n,
            "index": f"IVF{params.nlist},SQfp16 nprobe={params.nprobe}",
            "build_s": round(build_s, 1),
            "recall_at_3": round(index_store.recall_at_k(np.array(found), truth), 4),
            "p50_ms": round(float(np.percentile(ann_ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ann_ms, 99)), 3),
            "exact_p50_ms": round(float(np.percentile(exact_ms, 50)), 3),
            "exact_queries": exact_queries,
            "shards_mb": round(vectors.nbytes / 2**20, 1),
        }
        log.info("ann at %d: %s", n, row)
        rows.append(row)
        del vectors, index, approx, exact, shards
    return {"queries": QUERIES, "dim": DIM, "by_size": rows}


def plot_ann(ax, figures: dict) -> None:
    rows = figures["by_size"]
    sizes = [r["paragraphs"] for r in rows]
    ax.plot(sizes, [r["p50_ms"] for r in rows], "o-", label="FAISS p50 ms")
    ax.plot(sizes, [r["p99_ms"] for r in rows], "o--", label="FAISS p99 ms")
    ax.plot(sizes, [r["exact_p50_ms"] for r in rows], "s-", color="#999999", label="exact p50 ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("paragraphs")
    ax.set_ylabel("query latency (ms)")
    recalls = ", ".join(f"{r['recall_at_3']:.3f}" for r in rows)
    ax.set_title(f"search latency; recall@3 = {recalls}")
    ax.legend(fontsize=8)


# ---------------------------------------------------------------------------------------------------
# ann_real


def _question_vectors(model) -> tuple[np.ndarray, str]:
    """The HotpotQA dev questions (the 1,100 whose contexts make the corpus) embedded as the search tool
    embeds a query: float32, normalized."""
    from nat_ray.tasks import get_task

    questions = get_task("hotpotqa").load(REAL_QUERY_SPLIT)
    vectors = model.encode(
        [q.question for q in questions],
        batch_size=64,
        convert_to_numpy=True,
        normalize_embeddings=True,
        show_progress_bar=False,
    )
    return np.asarray(vectors, dtype=np.float32), f"hotpotqa {REAL_QUERY_SPLIT} questions"


def _ivf_recall(approx: index_store.AnnSearch, queries: np.ndarray, truth: np.ndarray) -> float:
    return round(index_store.recall_at_k(approx.search(queries, 3)[1], truth), 4)


def ann_real(args: argparse.Namespace) -> dict:
    """recall@3 of the production IVF settings on the real corpus's embeddings, IVF forced.

    The search tool itself searches a corpus this small exactly (below ``ann_min_paragraphs``);
    here :func:`index_store.build_ann` builds the IVF index that ``AnnParams.for_size`` gives the
    corpus anyway, to see its recall on real embeddings, which cluster unlike the synthetic ones.
    """
    import faiss

    from nat_ray.tools.search.index_build import ensure_index
    from nat_ray.tools.search.tool import load_model

    full = find_data_file(CORPUS_FILES[0])
    if full is None:
        return {
            "ann_recall_at_3_real": None,
            "reason": f"the full HotpotQA corpus ({CORPUS_FILES[0]}) is not in the data folders; the shipped "
            "sample is too small for an IVF index worth measuring",
        }
    model_path = default_model_path().resolve()
    model = load_model(model_path)
    # The search tool's own index of this corpus in the nat_ray cache: found, or built once here (in
    # this process, on every core) and then found by the tool and by later runs.
    started = time.perf_counter()
    info = ensure_index(full, model_path, model=model, use_ray=False)
    index_s = time.perf_counter() - started
    shards = index_store.open_shards(info.folder, info.manifest)
    n = int(info.manifest["count"])
    queries, query_source = _question_vectors(model)
    truth = index_store.ExactSearch(shards).search(queries, 3)[1]
    params = index_store.AnnParams.for_size(n)
    index, ids = index_store.build_ann(shards, params)
    ivf = faiss.extract_index_ivf(index)  # raises unless the index is an inverted file
    if ivf.nlist < 2:
        raise RuntimeError(f"AnnParams.for_size({n}) gave {ivf.nlist} list: that is a flat index, not IVF")
    approx = index_store.AnnSearch(index, ids)
    recall = _ivf_recall(approx, queries, truth)
    by_nprobe = {}
    for nprobe in REAL_NPROBES:  # the production nprobe among a few others, for the curve
        ivf.nprobe = min(nprobe, ivf.nlist)
        by_nprobe[str(ivf.nprobe)] = _ivf_recall(approx, queries, truth)
    ivf.nprobe = params.nprobe
    log.info("ann_real: %d paragraphs, IVF%d nprobe=%d: recall@3 %s", n, ivf.nlist, params.nprobe, recall)
    return {
        "ann_recall_at_3_real": recall,
        "corpus": str(full),
        "paragraphs": n,
        "index": f"IVF{ivf.nlist},SQfp16 nprobe={params.nprobe}",
        "nlist": int(ivf.nlist),
        "nprobe": params.nprobe,
        "train_rows": params.train_rows,
        "share_of_lists_probed": round(params.nprobe / ivf.nlist, 4),
        "queries": len(queries),
        "query_source": query_source + " (the questions whose context paragraphs make the corpus), "
        "embedded by the search model as the tool embeds a query",
        "truth": "exact inner-product search over the same float16 shards (index_store.ExactSearch)",
        "embeddings": "the search tool's float16 shards of this corpus in the nat_ray cache, "
        + ("found there" if info.encoded == 0 else f"embedded now ({info.encoded} paragraphs)"),
        "index_seconds": round(index_s, 1),
        "recall_at_3_by_nprobe": by_nprobe,
        "note": "production searches a corpus below tools.ann_min_paragraphs (200,000) exactly; the IVF "
        "index here is built with AnnParams.for_size regardless, to measure its recall on real vectors",
    }


def plot_ann_real(ax, figures: dict) -> None:
    by_nprobe = figures.get("recall_at_3_by_nprobe")
    if not by_nprobe:
        ax.set_title("IVF recall@3 on the real corpus: not measured (no full corpus here)", fontsize=9)
        ax.set_axis_off()
        return
    probes = [int(k) for k in by_nprobe]
    ax.plot(probes, list(by_nprobe.values()), "o-")
    ax.axvline(figures["nprobe"], color="#999999", linestyle="--", linewidth=1, label="production nprobe")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"nprobe (of {figures['nlist']} lists)")
    ax.set_ylabel("recall@3 vs exact")
    ax.set_title(
        f"IVF on {figures['paragraphs']} real HotpotQA paragraphs: recall@3 {figures['ann_recall_at_3_real']}",
        fontsize=9,
    )
    ax.legend(fontsize=8)


SECTIONS: dict[str, tuple[Callable[[argparse.Namespace], dict], Callable]] = {
    "index_build": (index_build, plot_index_build),
    "ann": (ann, plot_ann),
    "ann_real": (ann_real, plot_ann_real),
    "data_prep": (scale_data.data_prep, scale_data.plot_data_prep),
    "rollout_curve": (scale_stages.rollout_curve, scale_stages.plot_rollout_curve),
    "headline_fractions": (scale_stages.headline_fractions, scale_stages.plot_headline_fractions),
}


def headline(sections: dict) -> dict:
    """The issue's figures at the top level, from whichever sections have run."""
    top = {}
    if "index_build" in sections:
        top["index_build_speedup"] = sections["index_build"]["index_build_speedup"]
        top["index_build_over_in_process"] = sections["index_build"].get("index_build_over_in_process")
    if "ann_real" in sections:
        top["ann_recall_at_3_real"] = sections["ann_real"]["ann_recall_at_3_real"]
    if "ann" in sections:
        largest = max(sections["ann"]["by_size"], key=lambda r: r["paragraphs"])
        top.update(
            ann_recall_at_3=largest["recall_at_3"],
            ann_p50_ms=largest["p50_ms"],
            ann_at_paragraphs=largest["paragraphs"],
        )
    if "data_prep" in sections:
        for key in ("data_prep_flatness", "data_prep_marginal_flatness"):
            top[key] = sections["data_prep"].get(key)
    if "rollout_curve" in sections:
        for key in (
            "rollout_time_flatness",
            "rollout_rss_flatness",
            "rollout_marginal_flatness",
            "engine_rss_flatness",
        ):
            top[key] = sections["rollout_curve"].get(key)
    if "headline_fractions" in sections:
        for key in (
            "rollout_fraction_of_raw_vllm",
            "serve_fraction_of_batch32_ceiling",
            "train_fraction_of_bare_step",
        ):
            top[key] = sections["headline_fractions"][key]
    return top


def plot(sections: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name in SECTIONS if name in sections]
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        SECTIONS[name][1](ax, sections[name])
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to run")
    parser.add_argument("--paragraphs", type=int, default=4_000, help="corpus paragraphs for index_build")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes for the rollout curve and the fractions (a smoke run of the machinery)",
    )
    parser.add_argument(
        "--sizes", default=",".join(map(str, ANN_SIZES)), help="comma-separated corpus sizes for ann"
    )
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    sections = dict(previous.get("sections", {}))
    started = time.perf_counter()
    for name in args.only.split(","):
        if name not in SECTIONS:
            parser.error(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
        t0 = time.perf_counter()
        sections[name] = SECTIONS[name][0](args)
        sections[name]["seconds"] = round(time.perf_counter() - t0, 1)
        sections[name]["date"] = datetime.now().isoformat(timespec="seconds")
    result = {
        **headline(sections),
        "targets": TARGETS,
        "sections": sections,
        # The whole benchmark: every section's own wall clock (start-ups included), whichever run
        # measured it; this run's share beside it.
        "seconds": round(sum(sec.get("seconds", 0.0) for sec in sections.values()), 1),
        "this_run_seconds": round(time.perf_counter() - started, 1),
        "this_run_sections": args.only.split(","),
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": machine(("torch", "ray", "faiss-cpu", "sentence-transformers")),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    plot(sections)
    print(json.dumps({k: v for k, v in result.items() if k not in ("sections", "machine")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
