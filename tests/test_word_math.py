"""The default task: its generator is seeded, its shipped files are what it makes, its teacher is real."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from nat_ray.tasks.task_file import load_task_file

TASK_DIR = Path(__file__).resolve().parent.parent / "examples" / "word_math"


@pytest.fixture(scope="module")
def generate():
    spec = importlib.util.spec_from_file_location("word_math_generate", TASK_DIR / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def regenerated(generate, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("word_math")
    return out, generate.write(out)


def test_the_shipped_files_are_what_the_seeded_generator_makes(regenerated):
    out, _ = regenerated
    for split in ("train", "dev", "test"):
        assert (out / f"{split}.jsonl").read_text() == (TASK_DIR / "data" / f"{split}.jsonl").read_text()
    fresh = pq.read_table(out / "teacher.parquet").to_pylist()
    shipped = pq.read_table(TASK_DIR / "data" / "teacher.parquet").to_pylist()
    assert fresh == shipped


def test_splits_share_no_question_and_test_is_big_enough_for_intervals():
    splits = {
        s: [json.loads(line) for line in (TASK_DIR / "data" / f"{s}.jsonl").read_text().splitlines()]
        for s in ("train", "dev", "test")
    }
    texts = {s: {r["question"] for r in rows} for s, rows in splits.items()}
    assert len(texts["test"]) >= 100 and len(texts["dev"]) >= 100
    assert (
        not texts["train"] & texts["test"]
        and not texts["train"] & texts["dev"]
        and not texts["dev"] & texts["test"]
    )


def test_the_teacher_ran_the_real_loop_and_its_verdicts_are_the_tasks_scorer(regenerated):
    out, summary = regenerated
    task = load_task_file(TASK_DIR / "task.yaml")
    rows = pq.read_table(out / "teacher.parquet").to_pylist()
    assert len(rows) == summary["questions"]["train"] and summary["positives"] == sum(
        r["correct_robust"] for r in rows
    )
    mistakes = sum(v for k, v in summary["teacher"].items() if k != "right")
    assert summary["teacher"]["right"] == summary["positives"] and 0.2 < mistakes / len(rows) < 0.5
    apply = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    for row in rows:
        assert row["correct_robust"] == task.score(row["answer"], row["gold"]).correct_robust
        for i, turn in enumerate(row["trajectory"]):
            if "calculate[" in turn["content"]:  # the real calculator answered it
                a, op, b = turn["content"].split("calculate[")[1].rstrip("]").split()
                assert row["trajectory"][i + 1]["content"] == f"Observation: {apply[op](int(a), int(b))}"
