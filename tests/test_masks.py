"""Loss masks on the embedded model's real tokenizer and chat template."""

from __future__ import annotations

from nat_ray.engines.vllm_engine import render_prompt_ids
from nat_ray.masks import IGNORE_INDEX, assistant_spans, tokenize_example
from nat_ray.prompts import build_messages

TURNS = [
    {"role": "assistant", "content": "Thought: 3 pens of 12.\nAction: calculate[3 * 12]"},
    {"role": "user", "content": "Observation: 36"},
    {"role": "assistant", "content": "Thought: done.\nAction: finish[36]"},
]


def _prompt(template="zero-shot-target-aware", klass="incorrect"):
    return build_messages("math", "A farmer has 3 pens with 12 hens each. How many hens?", template, klass)


def _example(template="zero-shot-target-aware", klass="incorrect"):
    return _prompt(template, klass) + TURNS


def test_loss_only_on_assistant_turns_and_their_end_marker(tokenizer):
    ex = tokenize_example(tokenizer, _example(), prompt_messages=len(_prompt()))
    supervised = tokenizer.decode([t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE_INDEX])
    end = tokenizer.eos_token  # <|im_end|> closes every turn in this template
    # The acknowledgement ("I've understood...") is an assistant turn of the prompt: no loss.
    assert supervised == TURNS[0]["content"] + end + TURNS[2]["content"] + end


def test_without_a_prompt_boundary_every_assistant_turn_is_supervised(tokenizer):
    ex = tokenize_example(tokenizer, _example())
    supervised = tokenizer.decode([t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE_INDEX])
    assert supervised.startswith("I've understood your instruction")


def test_masked_tokens_are_everything_else(tokenizer):
    msgs = _example()
    ex = tokenize_example(tokenizer, msgs, prompt_messages=len(_prompt()))
    masked = tokenizer.decode([t for t, label in zip(ex.input_ids, ex.labels) if label == IGNORE_INDEX])
    assert "Observation: 36" in masked and "But incorrectly solve the problem." in masked
    assert "Action: calculate[3 * 12]" not in masked and "I've understood" in masked


def test_training_prefix_equals_inference_rendering_token_for_token(tokenizer):
    """Before each agent turn, the training ids are exactly the ids the engine sends to vLLM."""
    msgs = _example(klass="correct")
    full = tokenize_example(tokenizer, msgs).input_ids
    for i, message in enumerate(msgs):
        if message["role"] == "assistant":
            prompt_ids = render_prompt_ids(tokenizer, msgs[:i])
            assert full[: len(prompt_ids)] == prompt_ids, f"prefix before message {i} differs"


def test_spans_cover_content_exactly(tokenizer):
    msgs = _example()
    text, spans = assistant_spans(tokenizer, msgs)
    assistant = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert len(spans) == len(assistant)
    for (start, end), content in zip(spans, assistant):
        assert text[start:end].startswith(content) and text[start:end].endswith(tokenizer.eos_token)


def test_truncation_keeps_the_head(tokenizer):
    ex = tokenize_example(tokenizer, _example(), max_length=20)
    assert ex.truncated and len(ex.input_ids) == 20 and len(ex.labels) == 20
    assert not tokenize_example(tokenizer, _example()).truncated
