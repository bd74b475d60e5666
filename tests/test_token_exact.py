"""Token-exact turns: training learns the very ids each turn was sampled as (real tokenizer and template).

The engine here is a scripted stand-in for vLLM that samples its text one character per token, a
tokenisation the tokenizer itself would never produce, and returns ids the way vLLM does: past
the text through the stop string, or through the end-of-sequence token. The same check runs on
real vLLM episodes in ``tests/integration/test_token_exact.py``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence

import pyarrow as pa
import pytest

from nat_ray.core import nat_data, records
from nat_ray.core.masks import (
    FROM_IDS,
    FROM_TEXT,
    FROM_TEXT_FALLBACK,
    IGNORE_INDEX,
    chat_ids,
    end_of_turn_ids,
    sampled_content_length,
    tokenize_chat,
    tokenize_example,
)
from nat_ray.core.prompts import build_messages
from nat_ray.core.react import Episode, Generation, Sampling, Stepper
from nat_ray.core.scoring import Score
from nat_ray.train.data import token_sources, tokenize_batch, tokenize_examples

QUESTION = "A farmer has 3 pens with 12 hens each. How many hens?"


def check_token_exact(tokenizer, example: nat_data.ChatExample, tokenized, row: dict) -> int:
    """Assert that ``tokenized`` trains on the row's sampled ids and its stored context; return the turns.

    Independent of how :mod:`nat_ray.core.masks` builds it: the example is cut into runs of labelled
    and unlabelled ids, and each run is compared with the ids stored in the row.
    """
    prompts = row[nat_data.TURN_PROMPT_IDS]
    completions = row[nat_data.TURN_COMPLETION_IDS]
    assert tokenized.source == FROM_IDS
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(tokenized.input_ids, tokenized.labels):
        labelled = label != IGNORE_INDEX
        assert not labelled or label == token
        if not runs or runs[-1][0] != labelled:
            runs.append((labelled, []))
        runs[-1][1].append(token)
    # The training prompt (with its NAT marker) is rendered afresh; after the marker it ends like
    # the stored first prompt: the question turn's end and the generation prompt.
    prefix = chat_ids(tokenizer, example.messages[: example.prompt_messages])
    assert runs[0] == (False, prefix)
    common = 0
    while common < min(len(prefix), len(prompts[0])) and prefix[-1 - common] == prompts[0][-1 - common]:
        common += 1
    assert tokenizer.decode(prefix[len(prefix) - common :]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    if example.klass == "correct":  # same marker as at inference: the whole question turn matches
        assert example.messages[example.prompt_messages - 1]["content"] in tokenizer.decode(
            prefix[len(prefix) - common :]
        )
    end = list(end_of_turn_ids(tokenizer))
    labelled_runs = [ids for labelled, ids in runs if labelled]
    between = [ids for labelled, ids in runs[1:] if not labelled]
    assert len(labelled_runs) == len(completions) and len(between) == len(completions) - 1
    for t, run in enumerate(labelled_runs):
        sampled = len(run) - len(end)
        # Exactly the ids the engine sampled, then the template's end-of-turn marker.
        assert run[:sampled] == list(completions[t][:sampled]) and run[sampled:] == end
        rest = tokenizer.decode(completions[t][sampled:]).strip()  # what training left out
        assert rest in ("", tokenizer.eos_token) or rest.startswith("Observation:"), rest
        if t + 1 < len(completions):
            # The context before the next turn is the stored next prompt's own ids.
            assert prompts[t + 1][: len(prompts[t])] == prompts[t]
            assert between[t] == list(prompts[t + 1][len(prompts[t + 1]) - len(between[t]) :])
            assert "Observation:" in tokenizer.decode(between[t])
    return len(completions)


class CharEngine:
    """Samples scripted turns one character per token and answers with vLLM's ids (see module docstring)."""

    def __init__(self, tokenizer, scripts: dict[str, list[str]], stop_with_eos: bool = True) -> None:
        self.tokenizer = tokenizer
        self.scripts = scripts
        self.stop_with_eos = stop_with_eos
        self.prompt_len = len(build_messages("math", "?", shots=1))

    def _ids(self, text: str) -> list[int]:
        return [i for ch in text for i in self.tokenizer(ch, add_special_tokens=False)["input_ids"]]

    def generate(self, conversations: Sequence[list[dict]], sampling: Sequence[Sampling]) -> list[Generation]:
        out = []
        for conv in conversations:
            question = conv[self.prompt_len - 1]["content"]
            text = self.scripts[next(k for k in self.scripts if k in question)][
                (len(conv) - self.prompt_len) // 2
            ]
            final = "finish[" in text
            tail = (
                [self.tokenizer.eos_token_id] if final and self.stop_with_eos else self._ids("\nObservation:")
            )
            prompt = chat_ids(self.tokenizer, conv)
            ids = self._ids(" " + text + "\n") + tail
            out.append(
                Generation(text + "\n", len(prompt), len(ids), "stop", None, tuple(prompt), tuple(ids))
            )
        return out

    def close(self) -> None:
        pass


SCRIPTS = {
    "3 pens": [
        "Thought: 3 pens of 12 hens.\nAction: calculate[3 * 12]",
        "Thought: so 36.\nAction: finish[36]",
    ],
    "7 cows": ["Thought: cows have 4 legs.\nAction: calculate[7 * 4]", "Action: finish[27]"],
    "bad": ["I do not know."],
}


def _rows(tokenizer, stop_with_eos: bool = True) -> list[dict]:
    questions = {
        "3 pens": (QUESTION, "36"),
        "7 cows": ("How many legs do 7 cows have?", "28"),
        "bad": ("bad?", "1"),
    }
    episodes = [
        Episode(key, build_messages("math", q, shots=1), ("calculate",)) for key, (q, _) in questions.items()
    ]
    Stepper(CharEngine(tokenizer, SCRIPTS, stop_with_eos)).run(episodes)
    rows = []
    for ep in episodes:
        question, gold = questions[ep.id]
        right = ep.answer == gold
        rows.append(
            records.episode_row(
                ep,
                task="gsm8k",
                family="math",
                question_id=ep.id,
                question=question,
                gold=gold,
                score=Score(right, right),
                temperature=0.0,
                sample_index=0,
                seed=0,
                model="m",
                engine="vllm",
                config_hash="c",
                started_at="2025-01-01T00:00:00.000+00:00",
            )
        )
    return rows


def _round_trip(rows: list[dict], tmp_path) -> list[dict]:
    records.write_rows(rows, tmp_path / "part.parquet")
    return records.read_rows(tmp_path / "part.parquet")


@pytest.mark.parametrize("stop_with_eos", [True, False])
def test_every_turn_trains_on_its_sampled_ids(tokenizer, tmp_path, stop_with_eos):
    rows = _round_trip(_rows(tokenizer, stop_with_eos), tmp_path)
    assert [r[nat_data.FAILURE_REASON] for r in rows] == [None, None, "parse_error"]
    examples, _ = nat_data.build_examples(rows, "nat")
    assert sorted(ex.klass for ex in examples) == ["correct", "incorrect", "incorrect"]
    by_id = {r[nat_data.TRAJECTORY_ID]: r for r in rows}
    checked = 0
    for ex in examples:
        tokenized = tokenize_chat(
            tokenizer, ex.messages, None, ex.prompt_messages, ex.turn_prompt_ids, ex.turn_completion_ids
        )
        checked += check_token_exact(tokenizer, ex, tokenized, by_id[ex.trajectory_id])
        # Re-tokenising the text would have trained on other ids for the same turns.
        text = tokenize_example(tokenizer, ex.messages, None, ex.prompt_messages)
        assert text.source == FROM_TEXT and text.input_ids != tokenized.input_ids
        assert tokenizer.decode([t for t in text.labels if t != IGNORE_INDEX]).replace(" ", "") == (
            tokenizer.decode([t for t in tokenized.labels if t != IGNORE_INDEX]).replace(" ", "")
        )
    assert checked == 5


def test_ids_reach_training_through_the_driver_and_the_ray_data_function(tokenizer, embedded_path, tmp_path):
    rows = _round_trip(_rows(tokenizer), tmp_path)
    examples, _ = nat_data.build_examples(rows, "nut")
    here = tokenize_examples(examples, embedded_path, None)
    assert token_sources(here) == {FROM_IDS: 3, FROM_TEXT: 0, FROM_TEXT_FALLBACK: 0}
    batch = pa.Table.from_pylist(
        [
            {
                "index": i,
                "messages": json.dumps(ex.messages),
                "prompt_messages": ex.prompt_messages,
                "token_ids": json.dumps([ex.turn_prompt_ids, ex.turn_completion_ids]),
            }
            for i, ex in enumerate(examples)
        ]
    )
    out = tokenize_batch(batch, embedded_path, None).to_pylist()
    assert [(r["input_ids"], r["labels"], r["source"]) for r in out] == [
        (ex.input_ids, ex.labels, ex.source) for ex in here
    ]


def test_rows_without_ids_are_tokenised_from_text(tokenizer, tmp_path):
    rows = _round_trip(_rows(tokenizer), tmp_path)
    for row in rows:
        row[nat_data.TURN_PROMPT_IDS] = row[nat_data.TURN_COMPLETION_IDS] = None
    ex = nat_data.build_examples(rows, "nat")[0][0]
    got = tokenize_chat(tokenizer, ex.messages, 64, ex.prompt_messages, None, None)
    assert got == tokenize_example(tokenizer, ex.messages, 64, ex.prompt_messages) and got.truncated


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda p, c: (p, [c[0][:5] + c[0][6:], *c[1:]]),  # ids no longer spell the stored text
        lambda p, c: (p, c[:1]),  # one id list short
        lambda p, c: ([p[0], [7, *p[1]]], c),  # the next prompt does not extend the first
        lambda p, c: ([p[0][:-1], p[1]], c),  # the first prompt lost its generation prompt
        lambda p, c: (p, [[], c[1]]),  # a turn without ids
    ],
)
def test_ids_that_do_not_fit_fall_back_to_the_text_and_are_counted(tokenizer, embedded_path, corrupt, caplog):
    row = _rows(tokenizer)[0]
    prompts, completions = corrupt(row[nat_data.TURN_PROMPT_IDS], row[nat_data.TURN_COMPLETION_IDS])
    ex = dataclasses.replace(
        nat_data.build_example(row, "nat"), turn_prompt_ids=prompts, turn_completion_ids=completions
    )
    with caplog.at_level(logging.WARNING, logger="nat_ray.train.data"):
        (got,) = tokenize_examples([ex], embedded_path, None)
    text = tokenize_example(tokenizer, ex.messages, None, ex.prompt_messages)
    assert got.source == FROM_TEXT_FALLBACK and (got.input_ids, got.labels) == (text.input_ids, text.labels)
    assert "1 of 1 examples with stored token ids did not match" in caplog.text


def test_sampled_content_length_trims_the_stop_string_and_the_end_token(tokenizer):
    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    body = ids(" Thought: x.\nAction: finish[3]")
    assert sampled_content_length(
        tokenizer, body + ids("\nObservation:"), "Thought: x.\nAction: finish[3]"
    ) == len(body)
    assert sampled_content_length(
        tokenizer, body + [tokenizer.eos_token_id], "Thought: x.\nAction: finish[3]"
    ) == len(body)
    assert sampled_content_length(tokenizer, ids("\nObservation:"), "") == 0
    assert end_of_turn_ids(tokenizer) == (tokenizer.eos_token_id,)


def test_an_observation_after_the_last_turn_is_left_out(tokenizer):
    row = _rows(tokenizer)[0]
    row[nat_data.TRAJECTORY] = [
        *row[nat_data.TRAJECTORY],
        {"role": "user", "content": "Observation: tool down"},
    ]
    ex = nat_data.build_example(row, "nat")
    got = tokenize_chat(
        tokenizer, ex.messages, None, ex.prompt_messages, ex.turn_prompt_ids, ex.turn_completion_ids
    )
    assert got.labels[-1] == got.input_ids[
        -1
    ] == tokenizer.eos_token_id and "tool down" not in tokenizer.decode(got.input_ids)


def test_the_vllm_engine_hands_over_the_ids_it_read_and_sampled():
    from types import SimpleNamespace

    from nat_ray.config import EngineConfig
    from nat_ray.core.react import CONTEXT_OVERFLOW
    from nat_ray.engines.vllm_engine import VLLMEngine, _to_generation

    out = SimpleNamespace(
        prompt_token_ids=[1, 2, 3],
        outputs=[SimpleNamespace(text="Action: finish[1]", token_ids=[7, 8, 9, 10], finish_reason="stop")],
    )
    gen = _to_generation(out)
    assert (gen.prompt_ids, gen.completion_ids) == ((1, 2, 3), (7, 8, 9, 10))
    assert (gen.prompt_tokens, gen.completion_tokens) == (3, 4)
    # A prompt too long to answer keeps its ids: training can still place the turn.
    engine = SimpleNamespace(config=EngineConfig(max_model_len=20))
    overflow = VLLMEngine._overflow(engine, list(range(10)))
    assert overflow.finish_reason == CONTEXT_OVERFLOW and overflow.prompt_ids == tuple(range(10))
    assert overflow.completion_ids == ()


def test_a_turn_that_overflowed_the_context_keeps_the_example_token_exact(tokenizer):
    row = _rows(tokenizer)[0]
    row[nat_data.TRAJECTORY][-1] = {"role": "assistant", "content": ""}  # the engine sampled nothing
    row[nat_data.TURN_COMPLETION_IDS][-1] = []
    ex = nat_data.build_example(row, "nat")
    got = tokenize_chat(
        tokenizer, ex.messages, None, ex.prompt_messages, ex.turn_prompt_ids, ex.turn_completion_ids
    )
    assert check_token_exact(tokenizer, ex, got, row) == 2
    assert got.labels[-2] == IGNORE_INDEX and got.labels[-1] == tokenizer.eos_token_id
