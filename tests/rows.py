"""Scored trajectory rows made by hand, shared by the training tests (unit and integration)."""

from __future__ import annotations

from nat_ray.core import nat_data as columns


def math_row(i: int, correct: bool) -> dict:
    """A hand-made scored GSM8K-style trajectory row (the rest of the schema is left null)."""
    product = (i + 2) * (i + 3)
    answer = product if correct else product + 1
    return {
        columns.TRAJECTORY_ID: f"t{i}-{correct}",
        columns.TASK: "gsm8k",
        columns.FAMILY: "math",
        columns.QUESTION_ID: f"q{i}",
        columns.QUESTION: f"A shop sells {i + 2} boxes of {i + 3} pens. How many pens?",
        columns.GOLD: str(product),
        columns.TRAJECTORY: [
            {
                "role": "assistant",
                "content": f"Thought: boxes times pens.\nAction: calculate[{i + 2}*{i + 3}]",
            },
            {"role": "user", "content": f"Observation: {product}"},
            {"role": "assistant", "content": f"Thought: done.\nAction: finish[{answer}]"},
            {"role": "user", "content": "Observation: Episode finished"},
        ],
        columns.PROMPT: [],
        columns.CORRECT_PAPER: correct,
        columns.CORRECT_ROBUST: correct,
        columns.FINISHED: True,
        columns.TURNS: 2,
    }
