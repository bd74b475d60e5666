"""The ReAct agent loop: action parsing and the one batched stepper every stage uses.

The NAT repo runs one episode at a time and re-encodes the whole prompt per turn (spec §8 #1).
Here :class:`Stepper` advances *all* open episodes together: one batched generate call for every
episode that is waiting for the model, then every tool call of that turn at once, then the
observations are appended. Rollout, serving and evaluation all drive this class; only the engine
(vLLM in-process, an HTTP teacher, a Serve handle) and the tool runner differ.

A malformed action is data, not an exception: the step records why, and the episode ends with a
failure reason, exactly as the paper counts it (never finished = wrong).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from nat_ray.errors import ActionParseError
from nat_ray.tools import FINISH, REGISTRY, ToolFn
from nat_ray.tools.guard import GuardedTool, default_limits

log = logging.getLogger(__name__)

MAX_TURNS = 7  # the NAT repo's chain(max_depth=6): at most 7 model calls per episode (spec §3.2)
STOP = ("\nObservation:",)  # the model must not write the environment's turns (spec §8 #5)

# Failure reasons recorded on an episode that did not finish.
PARSE_ERROR = "parse_error"
TURN_CAP = "turn_cap"
TOOL_ERROR = "tool_error"
CONTEXT_OVERFLOW = "context_overflow"
GENERATION_ERROR = "generation_error"
FAILURE_REASONS = (PARSE_ERROR, TURN_CAP, TOOL_ERROR, CONTEXT_OVERFLOW, GENERATION_ERROR)

_ACTION_LINE = re.compile(r"(?:^|\n)[ \t*>#-]*Action[ \t]*(?:\d+[ \t]*)?:[ \t]*", re.IGNORECASE)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Action:
    """One parsed ``Action: name[argument]``. ``argument`` is kept verbatim (paper scoring needs it raw)."""

    name: str
    argument: str


def parse_action(text: str, tools: Collection[str] | None = None) -> Action:
    """Parse the first ``Action: name[argument]`` in a model turn.

    The argument runs to the bracket that balances the opening one, so ``calculate[(2+3)*[4]]``
    keeps its inner brackets; text after the action (a hallucinated observation, say) is ignored.
    If the brackets never balance, the last ``]`` on the action's line closes it. Names are
    case-insensitive (``Finish``, ``Search``), unlike the NAT repo's (spec §8 #4).

    Args:
        text: the model's raw output for one turn.
        tools: tool names allowed besides ``finish``; ``None`` accepts any name.

    Raises:
        ActionParseError: no ``Action:`` line, no tool name, unknown tool, or no brackets.
    """
    if not isinstance(text, str):
        raise ActionParseError(f"model output is {type(text).__name__}, not text")
    match = _ACTION_LINE.search(text)
    if match is None:
        raise ActionParseError("no 'Action:' line", text)
    rest = text[match.end() :]
    name_match = _NAME.match(rest)
    if name_match is None:
        raise ActionParseError("no tool name after 'Action:'", text)
    name = name_match.group(0).lower()
    allowed = None if tools is None else {t.lower() for t in tools} | {FINISH}
    if allowed is not None and name not in allowed:
        raise ActionParseError(f"unknown tool {name!r}; expected one of {sorted(allowed)}", text)
    after = rest[name_match.end() :].lstrip(" \t")
    if not after.startswith("["):
        raise ActionParseError(f"no opening bracket after {name!r}; write {name}[...]", text)
    depth = 0
    for i, ch in enumerate(after):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth == 0:
                return Action(name, after[1:i])
    line = after.split("\n", 1)[0]
    close = line.rfind("]")
    if close <= 0:
        raise ActionParseError(f"no closing bracket in {name}[...]", text)
    return Action(name, line[1:close])


@dataclass(frozen=True)
class Sampling:
    """Decoding settings of one model call. Engines translate this to their own parameters."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = STOP


@dataclass(frozen=True)
class Generation:
    """One engine answer. ``finish_reason`` is ``stop``/``length``, or ``context_overflow``/``error``.

    ``prompt_ids`` / ``completion_ids`` are the token ids the engine actually read and sampled, kept
    so training can learn the very tokens that were sampled instead of a re-tokenisation of ``text``
    (see :mod:`nat_ray.core.masks`). Engines that only see text (HTTP, Serve) leave them empty.
    """

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    error: str | None = None
    prompt_ids: tuple[int, ...] = ()
    completion_ids: tuple[int, ...] = ()


class ChatEngine(Protocol):
    """Anything that turns many chat conversations into one assistant turn each, in one batch."""

    def generate(self, conversations: Sequence[list[dict]], sampling: Sequence[Sampling]) -> list[Generation]:
        """Return one :class:`Generation` per conversation, in order; never raise for one bad prompt."""
        ...

    def close(self) -> None:
        """Release the engine (processes, sessions, memory)."""
        ...


@runtime_checkable
class StreamingEngine(Protocol):
    """An engine that takes requests one by one and hands back each as soon as it is done.

    With it the stepper never waits for the slowest generation of a turn: an episode whose turn
    ended goes on to its tool call and its next turn while the others are still generating,
    which keeps the engine's continuous batch full (see :class:`Stepper`).
    """

    def submit(self, conversation: list[dict], sampling: Sampling) -> str:
        """Start one generation; return its request id."""
        ...

    def poll(self) -> list[tuple[str, Generation]]:
        """Advance the engine (one scheduler step) and return the generations that finished."""
        ...


@dataclass(frozen=True)
class ToolCall:
    name: str
    argument: str


@dataclass(frozen=True)
class ToolResult:
    observation: str
    error: str | None = None  # set when the tool's backend failed (not for bad model input)


class ToolRunner(Protocol):
    """Runs tool calls asynchronously, so episodes waiting on a tool never hold up the others.

    ``submit`` starts a call and returns a handle; ``collect`` returns the ``(handle, result)``
    pairs of calls that have finished, waiting for at least one only when ``block`` is true.
    """

    def submit(self, call: ToolCall) -> object: ...

    def collect(self, handles: Sequence[object], block: bool) -> list[tuple[object, ToolResult]]: ...


def call_tool(fn: ToolFn, call: ToolCall) -> ToolResult:
    """Run one tool call under the tool contract (:mod:`nat_ray.tools.guard`).

    A timeout, an exception, a non-string or a too-long answer becomes an ``Error:`` observation
    (or a cut one) with ``error`` set; a too-long argument is refused before the call. ``fn`` is a
    registry entry, or a bare function, held to this process's configured limits.
    """
    guarded = fn if isinstance(fn, GuardedTool) else GuardedTool(call.name, fn, default_limits())
    observation, error = guarded.run(call.argument)
    return ToolResult(observation, error=error)


class _Done:
    """Handle of a call that already ran (local tools finish inside ``submit``)."""

    __slots__ = ("result",)

    def __init__(self, result: ToolResult) -> None:
        self.result = result


class LocalTools:
    """Runs tools in this process at submit time. The Ray stages swap in actor-backed runners."""

    def __init__(self, registry: dict[str, ToolFn] | None = None) -> None:
        self.registry = REGISTRY if registry is None else registry

    def submit(self, call: ToolCall) -> _Done:
        fn = self.registry.get(call.name)
        if fn is None:  # a task names a tool this process was not configured with
            return _Done(
                ToolResult(f"Error: no {call.name} tool here.", error=f"{call.name} is not registered")
            )
        return _Done(call_tool(fn, call))

    def collect(self, handles: Sequence[object], block: bool) -> list[tuple[object, ToolResult]]:
        return [(h, h.result) for h in handles]  # type: ignore[attr-defined]


@dataclass
class Step:
    """One agent turn: what the model wrote, what it asked for, what it was told."""

    text: str
    action: Action | None = None
    observation: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_ids: list[int] = field(default_factory=list)  # empty: the engine gave no ids
    completion_ids: list[int] = field(default_factory=list)


@dataclass
class Episode:
    """One question being answered. ``prompt`` holds the turns before the agent's first action."""

    id: str
    prompt: list[dict]
    tools: tuple[str, ...]
    sampling: Sampling = field(default_factory=Sampling)
    max_turns: int = MAX_TURNS
    steps: list[Step] = field(default_factory=list)
    answer: str | None = None
    finished: bool = False
    failure_reason: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.finished or self.failure_reason is not None

    @property
    def turns(self) -> int:
        return len(self.steps)

    @property
    def prompt_tokens(self) -> int:
        return sum(s.prompt_tokens for s in self.steps)

    @property
    def completion_tokens(self) -> int:
        return sum(s.completion_tokens for s in self.steps)

    def trajectory(self) -> list[dict]:
        """The agent's part only: assistant turns and their observations (the NAT file layout)."""
        turns: list[dict] = []
        for step in self.steps:
            turns.append({"role": "assistant", "content": step.text})
            if step.observation is not None:
                turns.append({"role": "user", "content": f"Observation: {step.observation}"})
        return turns

    def turn_token_ids(self) -> tuple[list[list[int]], list[list[int]]] | None:
        """Each turn's prompt and completion token ids, or None when the engine gave none at all."""
        if not any(step.completion_ids or step.prompt_ids for step in self.steps):
            return None
        return [list(s.prompt_ids) for s in self.steps], [list(s.completion_ids) for s in self.steps]

    def conversation(self) -> list[dict]:
        """Prompt plus trajectory: what the model sees before its next turn."""
        return self.prompt + self.trajectory()

    def next_sampling(self) -> Sampling:
        """This turn's decoding settings: a per-turn seed so a re-run gives the same episode."""
        if self.sampling.seed is None:
            return self.sampling
        digest = hashlib.blake2b(f"{self.sampling.seed}:{self.id}:{self.turns}".encode(), digest_size=4)
        return Sampling(**{**self.sampling.__dict__, "seed": int.from_bytes(digest.digest(), "little")})


def clean_output(text: str) -> str:
    """Trim a model turn: drop a hallucinated observation and surrounding whitespace."""
    for stop in STOP:
        cut = text.find(stop)
        if cut != -1:
            text = text[:cut]
    return text.strip()


class Stepper:
    """Advances many episodes: generate for all that are ready, parse, start tools, observe.

    Episodes waiting for a tool result sit out the next generate call instead of stalling it, and
    new episodes can join between steps (the serving ingress adds requests as they arrive; rollout
    keeps its engine's batch full). With a :class:`StreamingEngine` (in-process vLLM) a step is one
    engine scheduler step: each episode moves on the moment its own generation ends, instead of
    the whole turn waiting for its longest generation.

    Args:
        engine: batched chat engine.
        tools: tool runner; :class:`LocalTools` by default.
        stop_on_tool_error: end an episode whose tool backend failed (the NAT repo's behaviour)
            instead of showing the error as an observation and going on.
        on_done: called with each episode as it ends (rollout writes it out at once).
    """

    def __init__(
        self,
        engine: ChatEngine,
        tools: ToolRunner | None = None,
        *,
        stop_on_tool_error: bool = False,
        on_done: Callable[[Episode], None] | None = None,
    ) -> None:
        self.engine = engine
        self.tools = tools if tools is not None else LocalTools()
        self.stop_on_tool_error = stop_on_tool_error
        self.on_done = on_done
        self.ready: list[Episode] = []
        self.waiting: dict[object, tuple[Episode, Step]] = {}
        self.generating: dict[str, Episode] = {}
        self.streaming = isinstance(engine, StreamingEngine)

    @property
    def open(self) -> int:
        """Episodes not yet ended: generating, ready to generate, or waiting for a tool."""
        return len(self.ready) + len(self.waiting) + len(self.generating)

    def add(self, episodes: Episode | Sequence[Episode]) -> None:
        for ep in [episodes] if isinstance(episodes, Episode) else episodes:
            if not ep.done:
                self.ready.append(ep)

    def step(self) -> list[Episode]:
        """Collect finished tool calls, then generate once for every ready episode.

        Returns:
            The episodes that ended during this step.
        """
        ended: list[Episode] = []
        if self.waiting:
            idle = not self.ready and not self.generating
            for handle, result in self.tools.collect(list(self.waiting), block=idle):
                ep, step = self.waiting.pop(handle)
                step.observation = result.observation
                if result.error is not None:
                    step.error = f"tool error: {result.error}"
                    if self.stop_on_tool_error:
                        ep.failure_reason = TOOL_ERROR
                self._after_turn(ep, ended)
        if self.streaming:
            self._stream_step(ended)
            return ended
        batch, self.ready = self.ready, []
        if not batch:
            return ended
        generations = self.engine.generate(
            [ep.conversation() for ep in batch], [ep.next_sampling() for ep in batch]
        )
        if len(generations) != len(batch):
            raise RuntimeError(
                f"engine returned {len(generations)} generations for {len(batch)} conversations"
            )
        for ep, gen in zip(batch, generations):
            call = self._consume(ep, gen)
            if call is not None:
                self.waiting[self.tools.submit(call)] = (ep, ep.steps[-1])
            else:
                self._after_turn(ep, ended)
        return ended

    def _stream_step(self, ended: list[Episode]) -> None:
        for ep in self.ready:
            self.generating[self.engine.submit(ep.conversation(), ep.next_sampling())] = ep
        self.ready = []
        if not self.generating:
            return
        for request_id, gen in self.engine.poll():
            ep = self.generating.pop(request_id)
            call = self._consume(ep, gen)
            if call is not None:
                self.waiting[self.tools.submit(call)] = (ep, ep.steps[-1])
            else:
                self._after_turn(ep, ended)

    def _after_turn(self, ep: Episode, ended: list[Episode]) -> None:
        if not ep.done and ep.turns >= ep.max_turns:
            ep.failure_reason = TURN_CAP
        if ep.done:
            ended.append(ep)
            if self.on_done is not None:
                self.on_done(ep)
        else:
            self.ready.append(ep)

    def _consume(self, ep: Episode, gen: Generation) -> ToolCall | None:
        """Record one generation on its episode; return the tool call it asks for, if any."""
        if gen.finish_reason in (CONTEXT_OVERFLOW, "error"):
            ep.failure_reason = (
                CONTEXT_OVERFLOW if gen.finish_reason == CONTEXT_OVERFLOW else GENERATION_ERROR
            )
            ep.steps.append(
                Step(
                    gen.text,
                    error=gen.error or gen.finish_reason,
                    prompt_tokens=gen.prompt_tokens,
                    prompt_ids=list(gen.prompt_ids),
                )
            )
            return None
        step = Step(
            clean_output(gen.text),
            prompt_tokens=gen.prompt_tokens,
            completion_tokens=gen.completion_tokens,
            prompt_ids=list(gen.prompt_ids),
            completion_ids=list(gen.completion_ids),
        )
        ep.steps.append(step)
        try:
            step.action = parse_action(step.text, ep.tools)
        except ActionParseError as err:
            step.error = f"unparseable action: {err.reason}"
            ep.failure_reason = PARSE_ERROR
            return None
        if step.action.name == FINISH:
            ep.answer = step.action.argument
            ep.finished = True
            return None
        return ToolCall(step.action.name, step.action.argument)

    def run_refilling(self, episodes: Iterable[Episode], max_open: int) -> Iterator[list[Episode]]:
        """Step until ``episodes`` have all ended, admitting new ones as others end.

        Keeps ``max_open`` episodes open (the engine's batch full) instead of draining a batch to
        its longest episode. ``episodes`` is read lazily, one at a time as room opens.

        Yields:
            The episodes that ended in each step (often none).
        """
        pending = iter(episodes)
        exhausted = False
        while True:
            while not exhausted and self.open < max_open:
                episode = next(pending, None)
                exhausted = episode is None
                if episode is not None:
                    self.add(episode)
            if not self.open:
                return
            yield self.step()

    def run(self, episodes: Sequence[Episode] = ()) -> list[Episode]:
        """Add ``episodes`` and step until every open episode has ended; return them in input order."""
        self.add(episodes)
        while self.open:
            self.step()
        return list(episodes)
