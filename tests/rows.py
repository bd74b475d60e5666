"""Scored trajectory rows made by hand, shared by the training tests (unit and integration)."""

from __future__ import annotations

from nat_ray import nat_data as nd


def math_row(i: int, correct: bool) -> dict:
    """A hand-made scored GSM8K-style trajectory row (the rest of the schema is left null)."""
    product = (i + 2) * (i + 3)
    answer = product if correct else product + 1
    return {
        nd.TRAJECTORY_ID: f"t{i}-{correct}",
        nd.TASK: "gsm8k",
        nd.FAMILY: "math",
        nd.QUESTION_ID: f"q{i}",
        nd.QUESTION: f"A shop sells {i + 2} boxes of {i + 3} pens. How many pens?",
        nd.GOLD: str(product),
        nd.TRAJECTORY: [
            {
                "role": "assistant",
                "content": f"Thought: boxes times pens.\nAction: calculate[{i + 2}*{i + 3}]",
            },
            {"role": "user", "content": f"Observation: {product}"},
            {"role": "assistant", "content": f"Thought: done.\nAction: finish[{answer}]"},
            {"role": "user", "content": "Observation: Episode finished"},
        ],
        nd.PROMPT: [],
        nd.CORRECT_PAPER: correct,
        nd.CORRECT_ROBUST: correct,
        nd.FINISHED: True,
        nd.TURNS: 2,
    }
