"""The ReAct parser and the batched stepper, driven by a scripted engine (the engine is the only
part replaced here; the real vLLM engine runs in tests/integration)."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nat_ray.core.react import (
    CONTEXT_OVERFLOW,
    PARSE_ERROR,
    TOOL_ERROR,
    TURN_CAP,
    Action,
    Episode,
    Generation,
    LocalTools,
    Sampling,
    Stepper,
    clean_output,
    parse_action,
)
from nat_ray.errors import ActionParseError, ToolError

TOOLS = ("calculate", "search")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Thought: easy.\nAction: calculate[2 * 1]", Action("calculate", "2 * 1")),
        ("Thought: done\n\nAction: finish[18]", Action("finish", "18")),
        ("Action: finish[No]", Action("finish", "No")),
        ("Thought: x\nAction: Finish[ 18 ]", Action("finish", " 18 ")),  # raw argument kept for paper scoring
        ("Thought: x\nAction: search[Scott [director] films]", Action("search", "Scott [director] films")),
        ("Thought: x\nAction: calculate[(2+3)*[4]]\nObservation: 20", Action("calculate", "(2+3)*[4]")),
        ("Thought: a\nAction: finish[4] and then some text", Action("finish", "4")),
        ("Thought: a\nAction: search[a]\nAction: finish[b]", Action("search", "a")),  # first action wins
        ("Thought: a\n**Action:** finish[5]", None),
        ("Thought: a\nAction 1: finish[5]", Action("finish", "5")),
        ("Thought: a\nAction: finish[a [b]", Action("finish", "a [b")),  # unbalanced: last ] on the line
        ("Thought: a\nAction: finish[]", Action("finish", "")),
    ],
)
def test_parse_action(text, expected):
    if expected is None:
        with pytest.raises(ActionParseError):
            parse_action(text, TOOLS)
    else:
        assert parse_action(text, TOOLS) == expected


@pytest.mark.parametrize(
    "text, reason",
    [
        ("Thought: I think the answer is 4.", "no 'Action:' line"),
        ("Action: [4]", "no tool name"),
        ("Action: browse[cats]", "unknown tool"),
        ("Action: finish 4", "no opening bracket"),
        ("Action: finish[4", "no closing bracket"),
        ("", "no 'Action:' line"),
    ],
)
def test_parse_action_errors_say_why(text, reason):
    with pytest.raises(ActionParseError) as info:
        parse_action(text, TOOLS)
    assert reason in info.value.reason
    assert isinstance(info.value, ValueError)


def test_parse_action_any_tool_when_unrestricted():
    assert parse_action("Action: browse[cats]") == Action("browse", "cats")


def test_non_text_is_a_parse_error():
    with pytest.raises(ActionParseError):
        parse_action(None)  # type: ignore[arg-type]


_ARG = st.text(alphabet=string.ascii_letters + string.digits + " +-*/().,$%?'", max_size=40)


@given(
    prefix=st.text(max_size=60).filter(lambda s: "Action" not in s and "action" not in s.lower()),
    arg=_ARG,
    name=st.sampled_from(["calculate", "search", "finish"]),
    tail=st.text(max_size=40),
)
def test_parse_action_fuzz_roundtrip(prefix, arg, name, tail):
    """Any thought, any bracket-free argument, any trailing text: the argument comes back verbatim."""
    text = f"{prefix}\nAction: {name}[{arg}]{tail}"
    assert parse_action(text, TOOLS) == Action(name, arg)


@given(st.text(max_size=300))
def test_parse_action_fuzz_never_crashes(text):
    """Arbitrary model output either parses or raises ActionParseError, nothing else."""
    try:
        action = parse_action(text, TOOLS)
    except ActionParseError as err:
        assert err.reason
    else:
        assert action.name in {*TOOLS, "finish"}


def test_clean_output_drops_hallucinated_observation():
    assert (
        clean_output("  Thought: x\nAction: search[a]\nObservation: fake\n")
        == "Thought: x\nAction: search[a]"
    )


class ScriptedEngine:
    """Plays back fixed outputs per episode id, and records every batch it was asked for."""

    def __init__(self, scripts: dict[str, list[str | Generation]]):
        self.scripts = {k: list(v) for k, v in scripts.items()}
        self.batches: list[list[str]] = []

    def generate(self, conversations, sampling):
        self.batches.append([c[0]["content"] for c in conversations])
        out = []
        for conv in conversations:
            ep_id = conv[0]["content"]
            item = self.scripts[ep_id].pop(0)
            out.append(item if isinstance(item, Generation) else Generation(item, 10, 5))
        return out


def _episode(ep_id: str, max_turns: int = 7, seed: int | None = None) -> Episode:
    return Episode(ep_id, [{"role": "user", "content": ep_id}], TOOLS, Sampling(seed=seed), max_turns)


_ANSWERS = {"2 * 3": "6", "1+1": "2", "1": "1"}


def _calc_only(arg: str) -> str:
    return _ANSWERS[arg]


def test_stepper_batches_all_open_episodes_and_records_failures():
    engine = ScriptedEngine(
        {
            "a": ["Thought: t\nAction: calculate[2 * 3]", "Thought: got 6\nAction: finish[6]"],
            "b": ["I do not know the format."],
            "c": ["Action: calculate[1+1]"] * 3,
            "d": [Generation("", 5000, 0, finish_reason=CONTEXT_OVERFLOW, error="too long")],
        }
    )
    eps = [_episode("a"), _episode("b"), _episode("c", max_turns=3), _episode("d")]
    done_order = []
    stepper = Stepper(
        engine, LocalTools({"calculate": _calc_only, "search": _calc_only}), on_done=done_order.append
    )
    result = stepper.run(eps)
    a, b, c, d = result
    assert a.finished and a.answer == "6" and a.turns == 2
    assert a.trajectory() == [
        {"role": "assistant", "content": "Thought: t\nAction: calculate[2 * 3]"},
        {"role": "user", "content": "Observation: 6"},
        {"role": "assistant", "content": "Thought: got 6\nAction: finish[6]"},
    ]
    assert b.failure_reason == PARSE_ERROR and "no 'Action:' line" in b.steps[0].error
    assert c.failure_reason == TURN_CAP and c.turns == 3
    assert d.failure_reason == CONTEXT_OVERFLOW
    # Turn 1 sends all four episodes in one batch; later turns only those still open.
    assert [len(batch) for batch in engine.batches] == [4, 2, 1]
    assert stepper.open == 0
    assert {e.id for e in done_order} == {"a", "b", "c", "d"}
    assert a.prompt_tokens == 20 and a.completion_tokens == 10


def test_tool_backend_failure_becomes_observation_or_ends_episode():
    def broken(_: str) -> str:
        raise ToolError("search service unreachable")

    script = {"x": ["Action: search[cats]", "Action: finish[dunno]"]}
    ep = Stepper(ScriptedEngine(script), LocalTools({"search": broken, "calculate": broken})).run(
        [_episode("x")]
    )[0]
    assert ep.finished and ep.steps[0].observation.startswith("Error:") and "unreachable" in ep.steps[0].error

    ep = Stepper(
        ScriptedEngine(script), LocalTools({"search": broken, "calculate": broken}), stop_on_tool_error=True
    ).run([_episode("x")])[0]
    assert ep.failure_reason == TOOL_ERROR and ep.turns == 1


def test_episodes_can_join_between_steps():
    engine = ScriptedEngine({"a": ["Action: calculate[1]", "Action: finish[1]"], "b": ["Action: finish[2]"]})
    stepper = Stepper(engine, LocalTools({"calculate": _calc_only}))
    a, b = _episode("a"), _episode("b")
    stepper.add(a)
    stepper.step()
    stepper.add(b)
    ended = stepper.step()
    assert {e.id for e in ended} == {"a", "b"} and a.answer == "1" and b.answer == "2"


def test_per_turn_seeds_are_deterministic_and_distinct():
    ep = _episode("s", seed=7)
    first = ep.next_sampling().seed
    assert first == _episode("s", seed=7).next_sampling().seed
    ep.steps.append(object())  # type: ignore[arg-type]
    assert ep.next_sampling().seed != first
    assert _episode("t", seed=None).next_sampling().seed is None


class SlowSearchTools:
    """A runner whose `search` answers only after `delay` collect rounds; `calculate` answers at once."""

    def __init__(self, delay: int):
        self.delay = delay
        self.pending: dict[object, list] = {}

    def submit(self, call):
        handle = object()
        self.pending[handle] = [self.delay if call.name == "search" else 0, call]
        return handle

    def collect(self, handles, block):
        done = []
        for h in handles:
            entry = self.pending[h]
            if entry[0] <= 0 or (block and all(self.pending[x][0] > 0 for x in handles)):
                done.append((h, ToolResultFor(entry[1])))
                del self.pending[h]
            else:
                entry[0] -= 1
        return done


def ToolResultFor(call):  # noqa: N802 - reads like a constructor in the test
    from nat_ray.core.react import ToolResult

    return ToolResult(f"result of {call.argument}")


def test_a_slow_tool_does_not_stall_other_episodes():
    engine = ScriptedEngine(
        {
            "slow": ["Action: search[slow thing]", "Action: finish[s]"],
            "fast": [
                "Action: calculate[1]",
                "Action: calculate[2]",
                "Action: calculate[3]",
                "Action: finish[f]",
            ],
        }
    )
    stepper = Stepper(engine, SlowSearchTools(delay=2))
    slow, fast = stepper.run([_episode("slow"), _episode("fast")])
    assert slow.answer == "s" and fast.answer == "f"
    # While "slow" waited on its search, "fast" kept generating alone.
    assert engine.batches[0] == ["slow", "fast"]
    assert engine.batches[1:3] == [["fast"], ["fast"]]
    assert slow.steps[0].observation == "result of slow thing"


class StreamingScript:
    """A streaming engine double: each episode's output takes `polls[id]` polls to finish."""

    def __init__(self, scripts, polls):
        self.scripts = {k: list(v) for k, v in scripts.items()}
        self.polls = polls
        self.running: dict[str, list] = {}
        self.finished_order: list[str] = []
        self.n = 0

    def submit(self, conversation, sampling):
        self.n += 1
        rid = f"r{self.n}"
        ep_id = conversation[0]["content"]
        self.running[rid] = [self.polls[ep_id], ep_id]
        return rid

    def poll(self):
        done = []
        for rid, entry in list(self.running.items()):
            entry[0] -= 1
            if entry[0] <= 0:
                del self.running[rid]
                self.finished_order.append(entry[1])
                done.append((rid, Generation(self.scripts[entry[1]].pop(0), 3, 2)))
        return done


def test_streaming_engine_lets_short_turns_run_ahead_of_long_ones():
    from nat_ray.core.react import StreamingEngine

    engine = StreamingScript(
        {
            "long": ["Action: finish[L]"],
            "short": ["Action: calculate[1]", "Action: calculate[2]", "Action: finish[S]"],
        },
        polls={"long": 5, "short": 1},
    )
    assert isinstance(engine, StreamingEngine)
    stepper = Stepper(engine, LocalTools({"calculate": lambda a: a}))
    long_ep, short_ep = stepper.run([_episode("long"), _episode("short")])
    assert long_ep.answer == "L" and short_ep.answer == "S" and short_ep.turns == 3
    # All three of "short"'s turns finished while "long" was still generating its first.
    assert engine.finished_order == ["short", "short", "short", "long"]
    assert stepper.open == 0
