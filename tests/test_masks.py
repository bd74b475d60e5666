"""Loss masks on the embedded model's real tokenizer and chat template."""

from __future__ import annotations

from nat_ray.core.masks import IGNORE_INDEX, assistant_spans, tokenize_example
from nat_ray.core.prompts import build_messages
from nat_ray.engines.vllm_engine import render_prompt_ids

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


def _engine_turns(tokenizer, sampled_texts: list[str]) -> tuple[list[list[int]], list[list[int]], list[str]]:
    """What the agent loop and engine store for a two-turn episode: each turn's prompt ids rendered
    from the stored (stripped) texts, and the ids the engine sampled, run through the stop string."""
    from nat_ray.core.react import clean_output

    conversation = _prompt("zero-shot-target-aware", None)
    prompts, completions, texts = [], [], []
    for i, sampled in enumerate(sampled_texts):
        prompts.append(render_prompt_ids(tokenizer, conversation))
        completions.append(tokenizer(sampled + "\nObservation:", add_special_tokens=False)["input_ids"])
        texts.append(clean_output(sampled))
        conversation = conversation + [{"role": "assistant", "content": texts[-1]}]
        if i + 1 < len(sampled_texts):
            conversation = conversation + [{"role": "user", "content": f"Observation: {36 + i}"}]
    return prompts, completions, texts


def test_no_drift_when_every_prompt_continues_with_the_sampled_ids(tokenizer):
    from nat_ray.core.masks import turn_drift

    prompts, completions, texts = _engine_turns(tokenizer, [TURNS[0]["content"], TURNS[2]["content"]])
    assert turn_drift(tokenizer, prompts, completions, texts) == 0


def test_drift_is_counted_where_the_rendered_text_is_not_what_was_sampled(tokenizer):
    """A turn sampled with a leading space is stored stripped: the next prompt no longer holds the
    ids the model wrote, which the check must catch (and a one-turn episode has nothing to drift)."""
    from nat_ray.core.masks import turn_drift

    prompts, completions, texts = _engine_turns(
        tokenizer, [" " + TURNS[0]["content"], TURNS[2]["content"], "Action: finish[1]"]
    )
    assert turn_drift(tokenizer, prompts, completions, texts) == 1
    assert turn_drift(tokenizer, prompts[:1], completions[:1], texts[:1]) == 0
    garbled = [
        completions[0],
        tokenizer("something else", add_special_tokens=False)["input_ids"],
        completions[2],
    ]
    assert turn_drift(tokenizer, prompts, garbled, texts) == 2  # ids that are not the text count too


def test_the_prompt_check_catches_an_inference_prompt_that_is_not_the_training_sequence(tokenizer):
    from nat_ray.core.masks import prompt_divergence

    trained = tokenize_example(tokenizer, _prompt(klass="correct") + TURNS, prompt_messages=3).input_ids
    # Asked as trained: the first turn's prompt and the second's (after the observation) are prefixes.
    assert prompt_divergence(trained, render_prompt_ids(tokenizer, _prompt(klass="correct"))) is None
    assert (
        prompt_divergence(trained, render_prompt_ids(tokenizer, _prompt(klass="correct") + TURNS[:2])) is None
    )
    # One altered marker, or another template, and the prompt leaves the sequence at the question turn.
    for other in (_prompt(klass="incorrect"), _prompt("zero-shot", None)):
        at = prompt_divergence(trained, render_prompt_ids(tokenizer, other))
        assert at is not None and 0 < at < len(render_prompt_ids(tokenizer, other))
