"""Regenerate the search corpus subset shipped with the package.

The full HotpotQA paragraph corpus (10,785 paragraphs) lives in ``shared/data`` and is not shipped.
This script keeps only the paragraphs whose titles appear in the ``context`` of the first 60 dev
questions (the same 60 questions shipped as ``nat_ray/data/hotpotqa/dev_sample.jsonl``), so a fresh
machine can still answer those questions with ``search[...]``.

The output is deterministic: records keep the corpus order and fields (``id``, ``title``, ``text``),
and the gzip header carries no file name and a zero timestamp.

Usage::

    python scripts/make_corpus_sample.py [--data-dir shared/data] [--out nat_ray/data/...] [-n 60]

The data is HotpotQA / Wikipedia text under CC BY-SA 4.0 (see ``nat_ray/data/LICENSES.md``).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import logging
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
DEFAULT_OUT = REPO_ROOT / "nat_ray" / "data" / "hotpotqa" / "corpus_sample.jsonl.gz"
QUESTIONS_FILE = "hotpotqa/dev_distractor_1100.jsonl.gz"
CORPUS_FILE = "hotpotqa/corpus.jsonl.gz"

log = logging.getLogger("make_corpus_sample")


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def context_titles(questions: list[dict]) -> set[str]:
    """Titles of every context paragraph (gold and distractor) of ``questions``."""
    return {paragraph["title"] for q in questions for paragraph in q["context"]}


def write_jsonl_gz(path: Path, records: list[dict]) -> None:
    """Write ``records`` as gzip JSON Lines with a reproducible header (no name, mtime 0)."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as gz:
        for record in records:
            line = json.dumps(
                {"id": record["id"], "title": record["title"], "text": record["text"]}, ensure_ascii=False
            )
            gz.write(line.encode("utf-8") + b"\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="the shared data folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the .jsonl.gz file to write")
    parser.add_argument("-n", "--num-questions", type=int, default=60, help="leading dev questions to cover")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    questions = read_jsonl_gz(args.data_dir / QUESTIONS_FILE)[: args.num_questions]
    titles = context_titles(questions)
    corpus = read_jsonl_gz(args.data_dir / CORPUS_FILE)
    sample = [record for record in corpus if record["title"] in titles]
    missing = titles - {record["title"] for record in sample}
    if missing:
        raise SystemExit(f"{len(missing)} context titles are not in {CORPUS_FILE}: {sorted(missing)[:5]}")

    write_jsonl_gz(args.out, sample)
    log.info(
        "wrote %d paragraphs for %d questions to %s (%d bytes)",
        len(sample),
        len(questions),
        args.out,
        args.out.stat().st_size,
    )


if __name__ == "__main__":
    main()
