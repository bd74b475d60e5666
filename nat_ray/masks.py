"""Loss masks from tokenizer offsets: loss falls only on the agent's own turns.

The NAT repo tokenizes each segment separately, which can insert boundary tokens that never occur
at inference (spec §4.4, §8 #13). Here the conversation is rendered once with the model's chat
template, tokenized once with a fast tokenizer, and the mask comes from character offsets: a token
carries loss when it overlaps an assistant turn's content or the end-of-turn marker after it.
So the training ids of every prompt prefix equal the ids the engine sees at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100  # label value the loss skips (PyTorch's cross-entropy default)


def render_text(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_spans(tokenizer, messages: list[dict], first: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` and find the character span of each assistant turn from index ``first`` on.

    Assistant turns before ``first`` belong to the prompt (NAT's acknowledgement turn) and get no span.

    A span starts where the assistant's content starts (after the template's generation prompt)
    and ends after the template's end-of-turn marker, so the model also learns to stop.

    Raises:
        ValueError: the chat template does not render prefixes consistently (the mask would be wrong).
    """
    text = render_text(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < first:
            continue
        head = render_text(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = render_text(tokenizer, messages[: i + 1])
        if not (text.startswith(head) and text.startswith(upto) and len(head) <= len(upto)):
            raise ValueError(
                "the chat template does not render conversation prefixes as prefixes of the whole"
            )
        spans.append((len(head), len(upto.rstrip())))
    return text, spans


@dataclass(frozen=True)
class TokenizedExample:
    """One training sequence. ``labels[i]`` is ``input_ids[i]`` where loss applies, else ``IGNORE_INDEX``."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def num_loss_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def tokenize_example(
    tokenizer, messages: list[dict], max_length: int | None = None, prompt_messages: int = 0
) -> TokenizedExample:
    """Token ids and labels of a whole conversation, loss on the assistant turns after the prompt.

    Args:
        tokenizer: a fast tokenizer with a chat template.
        messages: the prompt turns followed by the agent's turns.
        max_length: keep at most this many tokens.
        prompt_messages: how many leading messages are prompt (never supervised, even if assistant).

    Over-long examples keep their head (the prompt and first turns), as the NAT repo does; the
    caller decides whether to keep or drop them from ``truncated``.
    """
    text, spans = assistant_spans(tokenizer, messages, prompt_messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    span_iter = iter(spans)
    span = next(span_iter, None)
    for t, (start, end) in enumerate(enc["offset_mapping"]):
        while span is not None and start >= span[1]:
            span = next(span_iter, None)
        if span is not None and end > span[0] and start < span[1]:
            labels[t] = ids[t]
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return TokenizedExample(ids, labels, truncated)
