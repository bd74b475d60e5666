"""Token-exact turns on the real vLLM CPU engine: the ids a turn was sampled as are the ids it is trained on."""

from __future__ import annotations

import pytest
from test_token_exact import check_token_exact  # tests/test_token_exact.py

from nat_ray import nat_data, records
from nat_ray.agent import new_episode
from nat_ray.config import AgentConfig
from nat_ray.masks import FROM_IDS, IGNORE_INDEX, tokenize_example
from nat_ray.react import LocalTools, Stepper
from nat_ray.tasks import get_task
from nat_ray.train.data import token_sources, tokenize_examples

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sampled_rows(vllm_engine, embedded_path, tmp_path_factory):
    """Six real GSM8K episodes on vLLM, written to Parquet and read back."""
    task = get_task("gsm8k")
    questions = task.load("test", limit=6)
    cfg = AgentConfig(task="gsm8k", temperature=0.8, max_turns=3, max_new_tokens=80, seed=5)
    episodes = [new_episode(task, q.question, cfg, f"q{q.id}") for q in questions]
    Stepper(vllm_engine, LocalTools()).run(episodes)
    rows = []
    for q, ep in zip(questions, episodes):
        rows.append(
            records.episode_row(
                ep,
                task=task.name,
                family=task.family,
                question_id=q.id,
                question=q.question,
                gold=q.gold,
                score=task.score(ep.answer, q),
                temperature=0.8,
                sample_index=0,
                seed=5,
                model=embedded_path,
                engine="vllm",
                config_hash="c",
                started_at=records.now_iso(),
            )
        )
    folder = tmp_path_factory.mktemp("token-exact")
    records.write_rows(rows, folder / "part-0.parquet")
    return records.read_rows(folder)


def _examples(rows):
    """Every row under the marker of its own verdict (NAT), the incorrect one, and its failure kind's."""
    examples = [nat_data.build_example(r, "nat") for r in rows]
    examples += [nat_data.build_example({**r, nat_data.CORRECT_ROBUST: False}, "nat") for r in rows]
    return examples + [nat_data.build_example(r, "nat_failure") for r in rows]


def test_sampled_ids_are_the_trained_ids(sampled_rows, embedded_path, tokenizer):
    back = sampled_rows
    assert all(len(r[nat_data.TURN_COMPLETION_IDS]) == r[nat_data.TURNS] for r in back)
    by_id = {r[nat_data.TRAJECTORY_ID]: r for r in back}
    examples = _examples(back)
    tokenized = tokenize_examples(examples, embedded_path, None)
    assert token_sources(tokenized)[FROM_IDS] == len(examples)  # no example fell back to its text
    turns = drift = 0
    for ex, tok in zip(examples, tokenized):
        turns += check_token_exact(tokenizer, ex, tok, by_id[ex.trajectory_id])
        text = tokenize_example(tokenizer, ex.messages, None, ex.prompt_messages)
        drift += [t for t in text.labels if t != IGNORE_INDEX] != [t for t in tok.labels if t != IGNORE_INDEX]
    assert turns >= 2 * len(back)
    print(f"{turns} turns checked; {drift} of {len(examples)} examples re-tokenise differently from the text")


def test_ray_data_builds_the_same_token_exact_examples(sampled_rows, embedded_path, local_ray, monkeypatch):
    from nat_ray.train import data

    examples = _examples(sampled_rows)
    local = data.tokenize_examples(examples, embedded_path, None)
    monkeypatch.setattr(data, "RAY_DATA_MIN_EXAMPLES", 0)
    assert data.tokenize_examples(examples, embedded_path, None) == local
