"""Loss masks from tokenizer offsets: loss falls only on the agent's own turns.

The NAT repo tokenizes each segment separately, which can insert boundary tokens that never occur
at inference (spec §4.4, §8 #13). Here the conversation is rendered once with the model's chat
template, tokenized once with a fast tokenizer, and the mask comes from character offsets: a token
carries loss when it overlaps an assistant turn's content or the end-of-turn marker after it.
So the training ids of every prompt prefix equal the ids the engine sees at inference.

A self-collected trajectory also carries the token ids the engine read and sampled at each turn
(:mod:`nat_ray.core.records`, schema 3). :func:`tokenize_from_ids` builds its example from those ids, so
the tokens a turn is trained on are the tokens it was sampled as, even where re-tokenising the
model's text would split it differently (the drift between sampled and trained tokens). Only the
prompt is rendered afresh, since the NAT marker changes it; every id after it is a stored one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value the loss skips (PyTorch's cross-entropy default)

# Where an example's ids came from (TokenizedExample.source): the stored engine ids, the text
# (rows without ids: imported teachers, HTTP engines), or the text after the stored ids failed a check.
FROM_IDS = "ids"
FROM_TEXT = "text"
FROM_TEXT_FALLBACK = "text_fallback"


class TokenMismatch(ValueError):
    """Stored token ids that do not fit the row's text or the chat template; ``reason`` says which check."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def chat_ids(tokenizer, conversation: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a rendered conversation: what the engine sends before the model's next turn."""
    ids = tokenizer.apply_chat_template(
        conversation, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    # transformers 5 returns a BatchEncoding here; 4.x a plain list.
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


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
    source: str = FROM_TEXT

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


def tokenize_chat(
    tokenizer,
    messages: list[dict],
    max_length: int | None = None,
    prompt_messages: int = 0,
    turn_prompt_ids: Sequence[Sequence[int]] | None = None,
    turn_completion_ids: Sequence[Sequence[int]] | None = None,
) -> TokenizedExample:
    """From the stored ids when the row has them (:func:`tokenize_from_ids`), else from the text.

    A row whose ids fail a check is tokenised from its text, marked ``FROM_TEXT_FALLBACK`` so the
    caller can count and report it; it never fails training.
    """
    if turn_prompt_ids is not None and turn_completion_ids is not None:
        try:
            return tokenize_from_ids(
                tokenizer, messages, prompt_messages, turn_prompt_ids, turn_completion_ids, max_length
            )
        except TokenMismatch as err:
            log.debug("token-exact example falls back to its text: %s", err.reason)
            ex = tokenize_example(tokenizer, messages, max_length, prompt_messages)
            return TokenizedExample(ex.input_ids, ex.labels, ex.truncated, FROM_TEXT_FALLBACK)
    return tokenize_example(tokenizer, messages, max_length, prompt_messages)


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


@lru_cache(maxsize=8)
def end_of_turn_ids(tokenizer) -> tuple[int, ...]:
    """The ids the chat template closes an assistant turn with (``<|im_end|>`` for ChatML).

    They carry loss, as in :func:`tokenize_example`: the model learns to end its turn.

    Raises:
        TokenMismatch: the template does not render an assistant turn as generation prompt + content + end.
    """
    user = [{"role": "user", "content": "x"}]
    head = render_text(tokenizer, user, add_generation_prompt=True) + "y"
    whole = render_text(tokenizer, [*user, {"role": "assistant", "content": "y"}])
    end = whole[len(head) :].rstrip() if whole.startswith(head) else ""
    if not end:
        raise TokenMismatch("the chat template has no end-of-turn marker after an assistant turn")
    return tuple(tokenizer(end, add_special_tokens=False)["input_ids"])


def sampled_content_length(tokenizer, completion_ids: Sequence[int], content: str) -> int:
    """How many of a turn's sampled ids make up its stored text.

    The engine's ids run past the text: through the stop string (``\nObservation:``, whose first
    characters may share a token with the text) or the end-of-sequence token, and the stored text
    is stripped. The answer is the shortest prefix that decodes to the text up to surrounding
    whitespace, so the ids kept are exactly sampled ones and never a piece of the stop string
    beyond whitespace.

    Raises:
        TokenMismatch: no prefix of the ids decodes to the text.
    """
    target = content.strip()
    found = None
    for k in range(len(completion_ids), -1, -1):
        text = _decode(tokenizer, completion_ids[:k]).strip()
        if text == target:
            found = k
        elif found is not None or len(text) < len(target):
            break
    if found is None:
        raise TokenMismatch("the sampled completion ids do not decode to the stored turn text")
    return found


def tokenize_from_ids(
    tokenizer,
    messages: list[dict],
    prompt_messages: int,
    turn_prompt_ids: Sequence[Sequence[int]],
    turn_completion_ids: Sequence[Sequence[int]],
    max_length: int | None = None,
) -> TokenizedExample:
    """A training example built from the engine's stored ids instead of from the turns' text.

    Layout: the training prompt ``messages[:prompt_messages]`` rendered afresh (it holds the NAT
    marker, which the sampled prompt did not), then for each agent turn its sampled ids (labelled,
    trimmed to the turn's text by :func:`sampled_content_length`) and the template's end-of-turn
    ids (labelled), then the ids between this turn and the next taken from the next turn's stored
    prompt (the observation and the next generation prompt, unlabelled). An observation after the
    last turn is left out: nothing after the last labelled token teaches anything.

    Checks, each a :class:`TokenMismatch` so the caller can fall back to the text: one id list per
    agent turn; the ids after the marker (the generation prompt after the question) equal the
    stored first prompt's; each stored prompt extends the previous one; the ids between a turn's
    end and the next prompt decode to the stored text and hold the stored observation.
    """
    prompt, turns = messages[:prompt_messages], messages[prompt_messages:]
    assistant = [i for i, m in enumerate(turns) if m["role"] == "assistant"]
    if not assistant or len(assistant) != len(turn_completion_ids) or len(turn_prompt_ids) != len(assistant):
        raise TokenMismatch("the stored ids do not have one entry per agent turn")
    # A turn that overflowed the context has its prompt's ids but sampled none (its text is empty).
    if any(not ids for ids in turn_prompt_ids):
        raise TokenMismatch("a turn has no stored prompt ids")
    ids = chat_ids(tokenizer, prompt)
    after = _after_last_message(tokenizer, prompt)
    if ids[len(ids) - len(after) :] != after or list(turn_prompt_ids[0][-len(after) :]) != after:
        raise TokenMismatch("the stored first prompt does not end like the training prompt after its marker")
    labels = [IGNORE_INDEX] * len(ids)
    end = list(end_of_turn_ids(tokenizer))
    for t, i in enumerate(assistant):
        content = turns[i]["content"]
        sampled = list(turn_completion_ids[t])
        labelled = sampled[: sampled_content_length(tokenizer, sampled, content)] + end
        ids += labelled
        labels += labelled
        if t + 1 == len(assistant):
            break
        between = _between_turns(tokenizer, turn_prompt_ids[t], turn_prompt_ids[t + 1], content, end)
        observations = [m["content"] for m in turns[i + 1 : assistant[t + 1]]]
        if not all(o in _decode(tokenizer, between) for o in observations):
            raise TokenMismatch("the stored ids between two turns do not hold the observation")
        ids += between
        labels += [IGNORE_INDEX] * len(between)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return TokenizedExample(ids, labels, truncated, FROM_IDS)


def _after_last_message(tokenizer, prompt: list[dict]) -> list[int]:
    """Ids the template renders after the last prompt message's content (its end, the generation prompt)."""
    text = render_text(tokenizer, prompt, add_generation_prompt=True)
    content = prompt[-1]["content"]
    cut = text.rfind(content)
    if not content or cut < 0:
        raise TokenMismatch("the chat template does not render the question verbatim")
    after = tokenizer(text[cut + len(content) :], add_special_tokens=False)["input_ids"]
    if not after:
        raise TokenMismatch("the chat template renders nothing after the question")
    return list(after)


def _between_turns(tokenizer, prompt_ids, next_prompt_ids, content: str, end: list[int]) -> list[int]:
    """The stored ids after a turn's end-of-turn marker, up to the next turn's first sampled id.

    The next prompt is the previous prompt, the turn's text as the template renders it, the
    end-of-turn marker, the observation and the generation prompt.
    """
    prompt_ids, next_prompt_ids = list(prompt_ids), list(next_prompt_ids)
    if next_prompt_ids[: len(prompt_ids)] != prompt_ids:
        raise TokenMismatch("a stored prompt does not extend the previous turn's prompt")
    for j in range(len(prompt_ids), len(next_prompt_ids) - len(end) + 1):
        if next_prompt_ids[j : j + len(end)] == end:
            if _decode(tokenizer, next_prompt_ids[len(prompt_ids) : j]).strip() != content.strip():
                break
            return next_prompt_ids[j + len(end) :]
    raise TokenMismatch("a stored prompt does not render the previous turn's text before its end marker")


def turn_drift(
    tokenizer,
    turn_prompt_ids: Sequence[Sequence[int]],
    turn_completion_ids: Sequence[Sequence[int]],
    texts: Sequence[str],
) -> int:
    """How many turns the engine did not see again as it sampled them (re-tokenisation drift).

    Turn t+1's prompt should begin with turn t's prompt and then the ids turn t sampled, cut where
    the engine cut the turn (:func:`sampled_content_length`: the stop string and the end of sequence
    dropped, the stored text kept). When it does not, the next turn was conditioned on other tokens
    than the model wrote (the agent loop re-renders each turn's text), and training on the sampled
    ids would teach a context inference never shows. A turn whose ids do not decode to its text
    counts as drift too.
    """
    drift = 0
    for t in range(len(turn_prompt_ids) - 1):
        prompt, sampled, following = (
            list(turn_prompt_ids[t]),
            list(turn_completion_ids[t]),
            turn_prompt_ids[t + 1],
        )
        try:
            kept = sampled[: sampled_content_length(tokenizer, sampled, texts[t])]
        except TokenMismatch:
            drift += 1
            continue
        expected = prompt + kept
        drift += list(following[: len(expected)]) != expected
    return drift


def prompt_divergence(sequence_ids: Sequence[int], prompt_ids: Sequence[int]) -> int | None:
    """Where an inference prompt leaves the training sequence: the first differing position, or
    ``None`` when the prompt is a prefix of it (the model is asked exactly as it was trained).

    One changed marker word or template line moves the model off the sequences it learned; this is
    the check that catches it without retraining anything.
    """
    for i, token in enumerate(prompt_ids):
        if i >= len(sequence_ids) or sequence_ids[i] != token:
            return i
    return None
