"""Token-exact turns on the real vLLM CPU engine: the ids a turn was sampled as are the ids it is trained on."""

from __future__ import annotations

import pytest
from test_token_exact import check_token_exact  # tests/test_token_exact.py

from nat_ray.agent import new_episode
from nat_ray.config import AgentConfig
from nat_ray.core import nat_data, records
from nat_ray.core.masks import FROM_IDS, IGNORE_INDEX, tokenize_example
from nat_ray.core.react import LocalTools, Stepper
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
                vllm_engine.tokenizer,  # counts the episode's token drift
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


def test_a_real_multi_turn_rollout_has_no_token_drift(sampled_rows):
    """Each turn's next prompt continues with exactly the ids the turn sampled (cut at the stop)."""
    multi = [r for r in sampled_rows if r[nat_data.TURNS] >= 2]
    assert multi, "no multi-turn episode to check"
    assert all(r[nat_data.TOKEN_DRIFT] is not None for r in sampled_rows)
    assert sum(r[nat_data.TOKEN_DRIFT] for r in sampled_rows) == 0


def test_a_model_trained_on_its_own_turns_replays_them_token_for_token(
    sampled_rows, embedded_path, tokenizer, tmp_path
):
    """Train on two of the model's own multi-turn trajectories until the loss is near zero;
    greedy decoding with the inference prompt must then give back every trained turn, id for id,
    and every prompt it is asked with must be a prefix of the sequence it was trained on."""
    import torch

    from nat_ray.config import EngineConfig, TrainConfig
    from nat_ray.core.masks import prompt_divergence, sampled_content_length
    from nat_ray.engines.hf_engine import HFEngine
    from nat_ray.train.data import pad_token_id
    from nat_ray.train.packing import collate, single_rows
    from nat_ray.train.step import build_model, cosine_schedule, train_step

    # The two shortest: every full step here costs ~4 s per 250 tokens on two cores.
    multi = [r for r in sampled_rows if r[nat_data.TURNS] >= 2]
    rows = sorted(multi, key=lambda r: sum(map(len, r[nat_data.TURN_COMPLETION_IDS])))[:2]
    assert rows, "no multi-turn episode to learn"
    # Each as a positive: its question turn is then the inference prompt ("correctly").
    positives = [{**r, nat_data.CORRECT_ROBUST: True, nat_data.CORRECT_PAPER: True} for r in rows]
    examples = [nat_data.build_example(r, "nat") for r in positives]
    tokenized = tokenize_examples(examples, embedded_path, None)
    assert token_sources(tokenized)[FROM_IDS] == len(rows)
    cfg = TrainConfig(packing=False, precision="fp32", learning_rate=2e-4)
    model = build_model(cfg, embedded_path, gpu=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    scheduler = cosine_schedule(optimizer, 0, 10_000)  # flat over these few steps
    batch = [collate(single_rows(tokenized), pad_token_id(tokenizer), packed=False)]
    for _ in range(80):
        loss = train_step(model, optimizer, scheduler, batch, torch.device("cpu")).loss
        if loss < 0.005:
            break
    assert loss < 0.02
    trained_dir = tmp_path / "memorized"
    model.save_pretrained(trained_dir)
    tokenizer.save_pretrained(trained_dir)

    engine = HFEngine(EngineConfig(model=str(trained_dir), backend="hf", max_model_len=2048))
    task = get_task("gsm8k")
    agent = AgentConfig(task="gsm8k", shots=0, temperature=0.0, max_turns=3, max_new_tokens=80)
    episodes = [new_episode(task, r[nat_data.QUESTION], agent, r[nat_data.TRAJECTORY_ID]) for r in rows]
    Stepper(engine, LocalTools()).run(episodes)

    def kept(ids, text):
        return list(ids)[: sampled_content_length(tokenizer, list(ids), text)]

    for row, ep, tok in zip(rows, episodes, tokenized):
        texts = [m["content"] for m in row[nat_data.TRAJECTORY] if m["role"] == "assistant"]
        trained = [kept(ids, text) for ids, text in zip(row[nat_data.TURN_COMPLETION_IDS], texts)]
        replayed = [kept(step.completion_ids, step.text) for step in ep.steps]
        assert replayed == trained
        assert all(prompt_divergence(tok.input_ids, step.prompt_ids) is None for step in ep.steps)
