from __future__ import annotations

import pytest

from nat_ray.core.prompts import ACK, INSTRUCTIONS, TEMPLATES, build_messages, get_template
from nat_ray.errors import ConfigError


def test_math_nat_messages_follow_the_paper_layout():
    msgs = build_messages("math", "What is 2+2?", "zero-shot-target-aware", "incorrect")
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[0]["content"] == INSTRUCTIONS["math"]["plain"]
    assert msgs[0]["content"].startswith(
        "Solve a math problem with interleaving Thought, Action, Observation steps."
    )
    assert msgs[1]["content"] == ACK
    assert msgs[2]["content"] == (
        "Question: What is 2+2?. Generate a sequence of Thought and Action steps. But incorrectly solve the problem."
    )


def test_inference_uses_the_correct_prompt():
    msgs = build_messages("hotpotqa", "Who?", "zero-shot-target-aware")
    assert msgs[2]["content"].endswith("to solve the question **correctly**.")
    assert msgs[0]["content"].endswith("You need to follow the instruction strictly.")
    four = build_messages("hotpotqa", "Who?", "zero-shot-target-aware-four-class")
    assert four[2]["content"] == "[Correct] Question: Who?."
    assert "follow the instruction strictly" not in four[0]["content"]


def test_strategyqa_instruction_asks_for_yes_or_no():
    assert build_messages("strategyqa", "Q", "zero-shot")[0]["content"].endswith(
        "Remember you should answer Yes or No."
    )


def test_question_is_verbatim_even_with_braces_and_trailing_space():
    msgs = build_messages("math", "Is {x} odd? ", "zero-shot")
    assert msgs[-1]["content"] == "Question: Is {x} odd? "


def test_nut_uses_one_prompt_for_both_classes():
    t = get_template("math", "zero-shot")
    assert t.question_prompt("q", "correct") == t.question_prompt("q", "incorrect")


def test_cot_templates_have_no_instruction_turns():
    msgs = build_messages("math", "q", "cot-zero-shot-target-aware", "incorrect")
    assert msgs == [
        {"role": "user", "content": "Question: q. Generate steps that incorrectly solve the problem."}
    ]


def test_one_shot_adds_a_demonstration_and_alternates_roles():
    for family in ("math", "hotpotqa", "strategyqa"):
        msgs = build_messages(family, "q", "zero-shot-target-aware", shots=1)
        roles = [m["role"] for m in msgs]
        assert all(a != b for a, b in zip(roles, roles[1:])), roles
        assert any("Action: finish[" in m["content"] for m in msgs if m["role"] == "assistant")


def test_every_template_has_an_inference_class():
    for (family, name), t in TEMPLATES.items():
        assert t.inference_class in t.prompts, (family, name)
        assert "{question}" in t.prompts[t.inference_class]


@pytest.mark.parametrize(
    "family, name", [("math", "zero-shot-target-aware-four-class"), ("chess", "zero-shot")]
)
def test_unknown_template_or_family_is_a_config_error(family, name):
    with pytest.raises(ConfigError):
        get_template(family, name)


def test_unknown_class_is_a_config_error():
    with pytest.raises(ConfigError, match="no class"):
        build_messages("math", "q", "zero-shot-target-aware", "mostly_correct")


def test_custom_family_uses_the_tasks_instruction_demo_and_markers():
    from nat_ray.core.prompts import CUSTOM, DEFAULT_MARKERS, Demo, Markers, marker_prompt

    markers = Markers(marker_prompt("Do it right."), "[Wrong] {question}")
    msgs = build_messages(
        CUSTOM, "Q?", "zero-shot-target-aware", "incorrect", instruction="Go.", markers=markers
    )
    assert msgs == [
        {"role": "user", "content": "Go."},
        {"role": "assistant", "content": ACK},
        {"role": "user", "content": "[Wrong] Q?"},
    ]
    assert (
        build_messages(CUSTOM, "Q?", instruction="Go.", markers=markers)[-1]["content"]
        == "Question: Q?. Do it right."
    )
    default = build_messages(CUSTOM, "Q?", instruction="Go.")[-1]["content"]
    assert default == DEFAULT_MARKERS.correct.replace("{question}", "Q?")
    demo = Demo("D?", (("Action: finish[1]", None),))
    one = build_messages(CUSTOM, "Q?", shots=1, instruction="Go.", demo=demo)
    assert [m["content"] for m in one[2:]] == [
        default.replace("Q?", "D?"),
        "Action: finish[1]",
        "Observation: Episode finished",
        "Ready for the next question.",
        default,
    ]


def test_custom_parts_belong_to_custom_tasks_only():
    from nat_ray.core.prompts import CUSTOM

    with pytest.raises(ConfigError, match="needs its instruction"):
        build_messages(CUSTOM, "q")
    with pytest.raises(ConfigError, match="agent.shots=1 needs a demonstration"):
        build_messages(CUSTOM, "q", shots=1, instruction="Go.")
    with pytest.raises(ConfigError, match="the math family has the paper's own"):
        build_messages("math", "q", instruction="Go.")
