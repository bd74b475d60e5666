"""Make the word-math task's data: questions per split and a teacher's trajectories, all seeded.

Why a generated task: the default model (SmolLM2-135M) cannot add or multiply two-digit numbers in
its head, and at one shot it already writes well-formed ReAct turns, so what it can learn here is the
task itself: read which operation the words ask for and hand the two numbers to ``calculate``.

Why a teacher: the tiny model alone almost never solves a question (about 2 %), so NAT would have no
positives. The paper took its trajectories from GPT-3.5; here a scripted teacher plays that part. It
answers every training question through the real agent loop (the real calculator gives the
observations, the task's scorer gives the verdict), and like GPT-3.5 it is not always right: about
one answer in three goes wrong in one of the ways a model goes wrong (the wrong operation, finishing
with a number from the question, a slip when copying the result). Those are NAT's teacher negatives;
the rollout adds the model's own.

    python examples/word_math/generate.py            # rewrites data/*.jsonl and data/teacher.parquet

Same seed, same files (the test ``test_word_math`` checks the shipped files match).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 23
SIZES = {"train": 600, "dev": 100, "test": 200}
TEACHER_ERROR_RATE = 0.35

NAMES = [
    "Mia", "Leo", "Ava", "Sam", "Zoe", "Ben", "Ivy", "Max", "Lily", "Omar",
    "Nina", "Ravi", "Emma", "Jack", "Sara", "Tom", "Lena", "Hugo", "Ana", "Noah",
]  # fmt: skip
THINGS = [
    "apples", "shells", "stickers", "marbles", "books", "coins", "pencils", "cards",
    "stamps", "cookies", "buttons", "beads", "flowers", "eggs", "toy cars", "balloons",
]  # fmt: skip
CONTAINERS = ["boxes", "bags", "jars", "baskets", "packs", "crates"]

# operation -> question templates ({n} name, {t} things, {c} containers, {a} {b} the numbers)
TEMPLATES: dict[str, list[str]] = {
    "add": [
        "{n} has {a} {t}. {n} finds {b} more. How many {t} does {n} have now?",
        "{n} had {a} {t} and got {b} more as a gift. How many {t} does {n} have in all?",
        "There are {a} {t} in one room and {b} {t} in another. How many {t} are there altogether?",
    ],
    "sub": [
        "{n} had {a} {t} and gave away {b}. How many {t} are left?",
        "{n} has {a} {t}. {n} loses {b} of them. How many {t} does {n} have now?",
        "A shop had {a} {t} and sold {b}. How many {t} does the shop still have?",
    ],
    "mul": [
        "{n} buys {a} {c} with {b} {t} in each. How many {t} does {n} buy?",
        "There are {a} {c} and each holds {b} {t}. How many {t} are there in total?",
        "{n} fills {a} {c} with {b} {t} each. How many {t} does {n} use?",
    ],
}
SYMBOL = {"add": "+", "sub": "-", "mul": "*"}
VERB = {"add": "add", "sub": "subtract", "mul": "multiply"}


def _numbers(op: str, rng: random.Random) -> tuple[int, int]:
    if op == "add":
        return rng.randint(12, 89), rng.randint(12, 89)
    if op == "sub":
        a = rng.randint(40, 99)
        return a, rng.randint(11, a - 11)
    return rng.randint(3, 9), rng.randint(12, 49)


def _answer(op: str, a: int, b: int) -> int:
    return {"add": a + b, "sub": a - b, "mul": a * b}[op]


def make_questions(seed: int = SEED, sizes: dict[str, int] = SIZES) -> dict[str, list[dict]]:
    """split -> records ``{id, question, answer, op, a, b}``; no question text is in two splits."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for split, size in sizes.items():
        rows: list[dict] = []
        while len(rows) < size:
            op = rng.choice(sorted(TEMPLATES))
            a, b = _numbers(op, rng)
            text = rng.choice(TEMPLATES[op]).format(
                n=rng.choice(NAMES), t=rng.choice(THINGS), c=rng.choice(CONTAINERS), a=a, b=b
            )
            if text in seen:
                continue
            seen.add(text)
            rows.append(
                {
                    "id": f"wm-{split}-{len(rows)}",
                    "question": text,
                    "answer": str(_answer(op, a, b)),
                    "op": op,
                    "a": a,
                    "b": b,
                }
            )
        splits[split] = rows
    return splits


def teacher_turns(record: dict, rng: random.Random) -> tuple[list[str], str]:
    """The teacher's turns for one question, and the kind of answer it gives (``right`` or a mistake)."""
    op, a, b = record["op"], record["a"], record["b"]
    kind = "right"
    if rng.random() < TEACHER_ERROR_RATE:
        kind = rng.choice(["wrong_operation", "question_number", "slip"])
    if kind == "question_number":
        return [f"Thought: The answer is in the question.\nAction: finish[{rng.choice([a, b])}]"], kind
    used = op
    if kind == "wrong_operation":
        used = rng.choice([o for o in SYMBOL if o != op])
    result = _answer(used, a, b)
    final = result + rng.choice([-10, -1, 1, 10]) if kind == "slip" else result
    return [
        f"Thought: I need to {VERB[used]} {a} and {b}.\nAction: calculate[{a} {SYMBOL[used]} {b}]",
        f"Thought: The answer is {result}.\nAction: finish[{final}]",
    ], kind


class ScriptedTeacher:
    """A :class:`nat_ray.core.react.ChatEngine` that answers each question with its scripted turns."""

    def __init__(self, scripts: dict[str, list[str]]) -> None:
        self.scripts = scripts

    def _script(self, conversation: list[dict]) -> list[str]:
        question_turn = next(m["content"] for m in reversed(conversation) if "Question: " in m["content"])
        return next(turns for q, turns in self.scripts.items() if f"Question: {q}" in question_turn)

    def generate(self, conversations: Sequence[list[dict]], sampling: Sequence) -> list:
        from nat_ray.core.react import Generation

        out = []
        for conversation in conversations:
            done = sum(m["role"] == "assistant" for m in conversation) - 1  # the acknowledgement
            text = self._script(conversation)[done]
            out.append(Generation(text=text, prompt_tokens=0, completion_tokens=len(text.split())))
        return out

    def close(self) -> None:
        pass


def teacher_rows(records: list[dict], seed: int = SEED) -> tuple[list[dict], dict[str, int]]:
    """One teacher trajectory per record, run through the real agent loop, calculator and scorer."""
    from nat_ray.agent import new_episode
    from nat_ray.config import AgentConfig
    from nat_ray.core import records as rows_of
    from nat_ray.core.react import LocalTools, Stepper
    from nat_ray.tasks.task_file import load_task_file
    from nat_ray.tools import TOOL_VERSIONS

    task = load_task_file(HERE / "task.yaml")
    rng = random.Random(seed + 1)
    scripts, kinds = {}, {}
    for record in records:
        scripts[record["question"]], kinds[record["id"]] = teacher_turns(record, rng)
    agent = AgentConfig(template="zero-shot-target-aware", shots=0, max_turns=5, temperature=0.0)
    by_id = {r["id"]: r for r in records}
    episodes = [new_episode(task, r["question"], agent, f"teacher-{r['id']}") for r in records]
    episodes = Stepper(ScriptedTeacher(scripts), LocalTools()).run(episodes)
    rows = []
    for ep in episodes:
        record = by_id[ep.id.removeprefix("teacher-")]
        rows.append(
            rows_of.episode_row(
                ep,
                task=task.name,
                family=task.family,
                question_id=record["id"],
                question=record["question"],
                gold=record["answer"],
                score=task.score(ep.answer, record["answer"]),
                temperature=0.0,
                sample_index=0,
                seed=seed,
                model="scripted-teacher",
                engine="scripted",
                config_hash=rows_of.config_hash({"seed": seed, "error_rate": TEACHER_ERROR_RATE}),
                started_at="2026-12-06T00:00:00.000+00:00",
                ended_at="2026-12-06T00:00:00.000+00:00",
                **{
                    **task.lineage(TOOL_VERSIONS),
                    # Where the task file is in a checkout, not on the machine that made the file.
                    "task_source": str((HERE / "task.yaml").relative_to(HERE.parents[1])),
                },
            )
        )
    counts: dict[str, int] = {}
    for kind in kinds.values():
        counts[kind] = counts.get(kind, 0) + 1
    return rows, counts


def write(out_dir: Path = HERE / "data", seed: int = SEED) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nat_ray.core import records as rows_of

    out_dir.mkdir(parents=True, exist_ok=True)
    splits = make_questions(seed)
    for split, rows in splits.items():
        lines = [json.dumps({k: r[k] for k in ("id", "question", "answer")}) for r in rows]
        (out_dir / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    rows, kinds = teacher_rows(splits["train"], seed)
    table = pa.Table.from_pylist(rows, schema=rows_of.arrow_schema())
    pq.write_table(table, out_dir / "teacher.parquet")
    positives = sum(r["correct_robust"] for r in rows)
    return {"questions": {s: len(r) for s, r in splits.items()}, "teacher": kinds, "positives": positives}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=HERE / "data")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    print(json.dumps(write(args.out_dir, args.seed), indent=2))


if __name__ == "__main__":
    main()
