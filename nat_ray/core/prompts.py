"""ReAct prompts and NAT's negative-aware question markers (spec §3.3, §4.1–4.2).

Every conversation has the paper's layout: a user turn with the task instruction, the assistant's
acknowledgement, then a user turn with the *question prompt*. The NAT marker lives only in that
question prompt: positives get the "correct" string, negatives the "incorrect" one (or one of k
graded strings for NAT-k), and inference always uses the correct one. The agent's trajectory follows.

Templates are data (:data:`TEMPLATES`), keyed by the NAT repo's names so a run config says exactly
which one it trained with and the same name picks the inference prompt.

A user's own task (family ``"custom"``, see :mod:`nat_ray.tasks.task_file`) has the same layout with
its own parts: the instruction turn is the task's ``instruction`` *verbatim* (nothing is added, so it
must itself name the actions, ``finish[answer]`` included), the optional one-shot demonstration is the
task's ``demonstrations`` file, and the NAT templates that mark correct and incorrect trajectories
(``zero-shot-target-aware``, ``-soft``, ``-inverse``) use the task's :class:`Markers`, by default the
paper's QA markers. Every other template keeps its own wording (the Table 4 ablations, NAT-k's graded
markers); the chain-of-thought templates have no custom variant.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from nat_ray.errors import ConfigError

Message = dict[str, str]

FAMILIES = ("math", "hotpotqa", "strategyqa")
# A user's task file: instruction, demonstration and markers come from the task (see the module docstring).
CUSTOM = "custom"
ALL_FAMILIES = (*FAMILIES, CUSTOM)

ACK = "I've understood your instruction, start please."

_MATH_INSTRUCTION = (
    "Solve a math problem with interleaving Thought, Action, Observation steps. Thought can reason about "
    "the current situation, and Action can be two types:\n"
    "(1) calculate[expression], which calculates the expression and returns the answer.\n"
    "(2) finish[answer], which returns the answer and finishes the task."
)
_QA_INSTRUCTION = (
    "Solve a question answering task with interleaving Thought, Action, Observation steps. Thought can "
    "reason about the current situation, and Action can be two types: \n"
    "(1) search[query], which searches a query on google and returns a short snippet containing the "
    "answer. Note that sometimes the snippet does not contain the answer, and some alternative search "
    "might be needed.\n"
    "(2) finish[answer], which returns the answer and finishes the task."
)
_QA_EXTENSION = (
    " You need to generate a sequence of Thought and Action steps to solve the question. Note that the "
    "steps could be correct or incorrect. You need to follow the instruction strictly."
)
_YES_NO = " Remember you should answer Yes or No."

# family -> instruction variant -> text. "extended" is the QA target-aware templates' longer instruction.
INSTRUCTIONS: dict[str, dict[str, str]] = {
    "math": {"plain": _MATH_INSTRUCTION, "extended": _MATH_INSTRUCTION},
    "hotpotqa": {"plain": _QA_INSTRUCTION, "extended": _QA_INSTRUCTION + _QA_EXTENSION},
    "strategyqa": {"plain": _QA_INSTRUCTION + _YES_NO, "extended": _QA_INSTRUCTION + _QA_EXTENSION + _YES_NO},
}

_MATH_CORRECT = (
    "Question: {question}. Generate a sequence of Thought and Action steps to solve the problem correctly."
)
_MATH_INCORRECT = "Question: {question}. Generate a sequence of Thought and Action steps. But incorrectly solve the problem."
_QA_CORRECT = "Question: {question}. Generate a sequence of Thought and Action steps to solve the question **correctly**."
_QA_INCORRECT = "Question: {question}. Generate a sequence of Thought and Action steps. But **incorrectly** solve the question."


@dataclass(frozen=True)
class Template:
    """How the question turn is worded for each trajectory class.

    Attributes:
        name: the NAT repo's template key.
        scheme: how a trajectory picks its class: ``"none"`` (one prompt for all: w/o-Neg, NUT),
            ``"binary"`` (correct / incorrect by the task's verdict), ``"failure"`` (correct, or the
            kind of failure: :data:`FAILURE_KINDS`), or an F1 scheme of
            :data:`nat_ray.core.scoring.NAT_CLASS_SCHEMES` (``"three-class"``, ``"four-class"``, ``"soft"``).
        prompts: class id -> format string with ``{question}``.
        instruction: ``"plain"``, ``"extended"``, or ``None`` for CoT templates without instruction turns.
        inference_class: the class whose prompt is used at inference (always the "correct" one).
        families: the task families that have this template.
        marker_classes: custom tasks only: class id -> which of the task's :class:`Markers`
            (``"correct"`` / ``"incorrect"``) words that class's question turn; ``None``: the template's
            own ``prompts``.
    """

    name: str
    scheme: str
    prompts: dict[str, str]
    instruction: str | None = "plain"
    inference_class: str = "correct"
    families: tuple[str, ...] = ALL_FAMILIES
    marker_classes: dict[str, str] | None = None

    def question_prompt(self, question: str, klass: str | None = None) -> str:
        """The question turn for ``klass`` (default: the inference class). ``question`` is kept verbatim."""
        klass = self.inference_class if klass is None else klass
        if klass not in self.prompts:
            raise ConfigError(
                f"template {self.name!r} has no class {klass!r}; its classes are {sorted(self.prompts)}"
            )
        # str.replace, not str.format: a question may itself contain braces.
        return self.prompts[klass].replace("{question}", question)

    def with_markers(self, markers: Markers) -> Template:
        """This template with a custom task's markers in place of its marked classes' prompts."""
        if self.marker_classes is None:
            return self
        chosen = {"correct": markers.correct, "incorrect": markers.incorrect}
        prompts = {**self.prompts, **{k: chosen[m] for k, m in self.marker_classes.items()}}
        return dataclasses.replace(self, prompts=prompts)


@dataclass(frozen=True)
class Markers:
    """A custom task's NAT markers: the question turn of correct and of incorrect trajectories.

    Each is a format string with ``{question}`` (see :func:`marker_prompt` for the short form).
    """

    correct: str
    incorrect: str


def marker_prompt(marker: str) -> str:
    """A task file's marker as a question-turn format string.

    A marker holding ``{question}`` is the whole question turn; a marker without it is appended to
    ``"Question: {question}. "`` (``"Solve it correctly."`` -> ``"Question: {question}. Solve it correctly."``).
    """
    return marker if "{question}" in marker else f"Question: {{question}}. {marker}"


# The paper's QA markers: a custom task's default.
DEFAULT_MARKERS = Markers(_QA_CORRECT, _QA_INCORRECT)


def _binary(correct: str, incorrect: str) -> dict[str, str]:
    return {"correct": correct, "incorrect": incorrect}


def _same(prompt: str) -> dict[str, str]:
    return {"correct": prompt, "incorrect": prompt}


# Failure-aware NAT (beyond the paper): a negative's question turn names how it failed, so the model
# can tell a wrong answer from a run that never answered, an action it could not write, or a tool
# that broke; "incorrect" is for failures of no known kind. Inference still asks for "correct".
FAILURE_KINDS = ("wrong_answer", "turn_cap", "unparseable", "tool_error", "incorrect")
_FAILURE_ENDINGS = {
    "wrong_answer": "finish with a wrong answer",
    "turn_cap": "never reach a final answer",
    "unparseable": "write an action that cannot be parsed",
    "tool_error": "stop at a tool error",
}


def _failure_prompts(correct: str, incorrect: str, bold: bool) -> dict[str, str]:
    head = "Question: {question}. Generate a sequence of Thought and Action steps. But "
    mark = "**{}**." if bold else "{}."
    prompts = {kind: head + mark.format(ending) for kind, ending in _FAILURE_ENDINGS.items()}
    return {"correct": correct, **prompts, "incorrect": incorrect}


_MATH_ONLY = ("math",)
_QA_ONLY = ("hotpotqa", "strategyqa")
_QA_AND_CUSTOM = (*_QA_ONLY, CUSTOM)
_ALL = ALL_FAMILIES
_MARKED = {"correct": "correct", "incorrect": "incorrect"}

_TEMPLATE_LIST = [
    # One prompt for every trajectory: w/o-Neg and NUT.
    Template("zero-shot", "none", _same("Question: {question}"), families=_ALL),
    # NAT. Math uses plain strings; the QA families the bold ones and the extended instruction.
    Template(
        "zero-shot-target-aware", "binary", _binary(_MATH_CORRECT, _MATH_INCORRECT), families=_MATH_ONLY
    ),
    Template(
        "zero-shot-target-aware",
        "binary",
        _binary(_QA_CORRECT, _QA_INCORRECT),
        instruction="extended",
        families=_QA_ONLY,
    ),
    # Custom tasks: their own markers (the paper's QA ones by default) and their own instruction.
    Template(
        "zero-shot-target-aware",
        "binary",
        _binary(_QA_CORRECT, _QA_INCORRECT),
        families=(CUSTOM,),
        marker_classes=_MARKED,
    ),
    Template(
        "zero-shot-target-aware-2",
        "binary",
        _binary(
            _MATH_CORRECT.replace("correctly.", "**correctly**."),
            _MATH_INCORRECT.replace("incorrectly", "**incorrectly**"),
        ),
        families=_MATH_ONLY,
    ),
    Template(
        "zero-shot-target-aware-2",
        "binary",
        _binary(_QA_CORRECT.replace("**", ""), _QA_INCORRECT.replace("**", "")),
        families=_QA_ONLY,
    ),
    # Table 4 ablations: the marker's wording should not matter, only that the classes differ.
    Template(
        "zero-shot-target-aware-prefix-correct",
        "binary",
        _binary("[Correct] Question: {question}.", "[Incorrect] Question: {question}."),
    ),
    Template(
        "zero-shot-target-aware-prefix-good",
        "binary",
        _binary("[Good] Question: {question}.", "[Bad] Question: {question}."),
    ),
    Template(
        "zero-shot-target-aware-good",
        "binary",
        _binary("Question: {question}. [Good]", "Question: {question}. [Bad]"),
    ),
    Template(
        "zero-shot-target-aware-prefix-AB",
        "binary",
        _binary("[A] Question: {question}.", "[B] Question: {question}."),
    ),
    Template(
        "zero-shot-target-aware-prefix-laptop",
        "binary",
        _binary("[Laptop] Question: {question}.", "[Screen] Question: {question}."),
    ),
    Template(
        "zero-shot-target-aware-meaningless",
        "binary",
        _binary("[1] Question: {question}.", "[2] Question: {question}."),
    ),
    Template(
        "zero-shot-target-aware-random-sentence",
        "binary",
        _binary(
            "Question: {question}. The lighthouse keeper painted the railings green every spring.",
            "Question: {question}. A heron stood in the shallow water until the tide turned.",
        ),
    ),
    Template(
        "zero-shot-target-aware-prefix-correct-inverse",
        "binary",
        _binary("[Incorrect] Question: {question}.", "[Correct] Question: {question}."),
    ),
    # Graded classes by F1 (NAT-k, HotpotQA). Class ids are nat_ray.core.scoring's.
    Template(
        "zero-shot-target-aware-four-class",
        "four-class",
        {
            "totally_incorrect": "[Totally Incorrect] Question: {question}.",
            "mostly_incorrect": "[Mostly Incorrect] Question: {question}.",
            "mostly_correct": "[Mostly Correct] Question: {question}.",
            "correct": "[Correct] Question: {question}.",
        },
        families=_QA_AND_CUSTOM,
    ),
    Template(
        "zero-shot-target-aware-three-class",
        "three-class",
        {
            "incorrect": "[Incorrect] Question: {question}.",
            "partially_correct": "[Partially Correct] Question: {question}.",
            "correct": "[Correct] Question: {question}.",
        },
        families=_QA_AND_CUSTOM,
    ),
    Template(
        "zero-shot-target-aware-soft",
        "soft",
        _binary(_QA_CORRECT, _QA_INCORRECT),
        instruction="extended",
        families=_QA_AND_CUSTOM,
        marker_classes=_MARKED,
    ),
    Template(
        "zero-shot-target-aware-inverse",
        "binary",
        _binary(_QA_INCORRECT, _QA_CORRECT),
        instruction="extended",
        families=_QA_AND_CUSTOM,
        marker_classes={"correct": "incorrect", "incorrect": "correct"},
    ),
    # Failure-aware NAT: NAT's prompts, with one marker per kind of failure (FAILURE_KINDS).
    Template(
        "zero-shot-target-aware-failure",
        "failure",
        _failure_prompts(_MATH_CORRECT, _MATH_INCORRECT, bold=False),
        families=_MATH_ONLY,
    ),
    Template(
        "zero-shot-target-aware-failure",
        "failure",
        _failure_prompts(_QA_CORRECT, _QA_INCORRECT, bold=True),
        instruction="extended",
        families=_QA_ONLY,
    ),
    Template(
        "zero-shot-target-aware-failure",
        "failure",
        _failure_prompts(_QA_CORRECT, _QA_INCORRECT, bold=True),
        families=(CUSTOM,),
        marker_classes=_MARKED,
    ),
    # Chain-of-thought variants (Table 7): no instruction turns, no tools.
    Template(
        "cot-zero-shot",
        "none",
        _same("Answer the question: {question}"),
        instruction=None,
        families=_MATH_ONLY,
    ),
    Template(
        "cot-zero-shot-target-aware",
        "binary",
        _binary(
            "Question: {question}. Please solve the problem correctly.",
            "Question: {question}. Generate steps that incorrectly solve the problem.",
        ),
        instruction=None,
        families=_MATH_ONLY,
    ),
]

TEMPLATES: dict[tuple[str, str], Template] = {
    (family, t.name): t for t in _TEMPLATE_LIST for family in t.families
}

INFERENCE_DEFAULT = "zero-shot-target-aware"


def get_template(family: str, name: str) -> Template:
    """The template ``name`` for a task family; a clear ConfigError lists the valid names."""
    if family not in ALL_FAMILIES:
        raise ConfigError(f"unknown task family {family!r}; expected one of {ALL_FAMILIES}")
    try:
        return TEMPLATES[(family, name)]
    except KeyError:
        names = sorted(n for f, n in TEMPLATES if f == family)
        raise ConfigError(f"no template {name!r} for {family} tasks; choose one of {names}") from None


# One-shot demonstrations for models that were never tuned on the format (teachers, the base
# model). They are ours, not the paper's, and are never part of NAT training examples.
@dataclass(frozen=True)
class Demo:
    question: str
    turns: tuple[tuple[str, str | None], ...] = field(default_factory=tuple)  # (assistant, observation)


DEMOS: dict[str, Demo] = {
    "math": Demo(
        "A baker fills 4 trays with 12 muffins each and sells 30 muffins. How many muffins are left?",
        (
            ("Thought: First I find how many muffins the baker made.\nAction: calculate[4 * 12]", "48"),
            ("Thought: Then I subtract the muffins that were sold.\nAction: calculate[48 - 30]", "18"),
            ("Thought: 18 muffins are left, so I can finish.\nAction: finish[18]", None),
        ),
    ),
    "hotpotqa": Demo(
        "Which river flows through the capital of the country where the Eiffel Tower stands?",
        (
            (
                "Thought: I need the country of the Eiffel Tower first.\nAction: search[Eiffel Tower]",
                " #1: Eiffel Tower: The Eiffel Tower is a wrought-iron lattice tower in Paris, France."
                " #2: Paris: Paris is the capital and largest city of France."
                " #3: Gustave Eiffel: Gustave Eiffel was a French civil engineer.",
            ),
            (
                "Thought: The tower is in Paris, the capital of France. I need the river of Paris.\n"
                "Action: search[river through Paris]",
                " #1: Seine: The Seine is a river in northern France that flows through Paris."
                " #2: Paris: Paris lies on the banks of the Seine."
                " #3: Loire: The Loire is the longest river in France.",
            ),
            ("Thought: The Seine flows through Paris.\nAction: finish[Seine]", None),
        ),
    ),
    "strategyqa": Demo(
        "Could a penguin walk from Antarctica to the North Pole without swimming?",
        (
            (
                "Thought: I need to know whether land connects Antarctica to the North Pole.\n"
                "Action: search[Is Antarctica connected by land to other continents?]",
                " #1: Antarctica: Antarctica is surrounded by the Southern Ocean and is not connected by land"
                " to any other continent. #2: Drake Passage: The Drake Passage separates South America from"
                " Antarctica. #3: North Pole: The North Pole lies in the middle of the Arctic Ocean.",
            ),
            (
                "Thought: Antarctica is separated from other continents by ocean, and the North Pole is in an"
                " ocean, so the walk is impossible.\nAction: finish[No]",
                None,
            ),
        ),
    ),
}


def build_messages(
    family: str,
    question: str,
    template: str = INFERENCE_DEFAULT,
    klass: str | None = None,
    shots: int = 0,
    *,
    instruction: str | None = None,
    demo: Demo | None = None,
    markers: Markers | None = None,
) -> list[Message]:
    """The prompt turns of one episode, before the agent's first action.

    Args:
        family: ``"math"``, ``"hotpotqa"``, ``"strategyqa"`` or ``"custom"`` (a user's task file:
            then ``instruction`` is required and ``demo`` / ``markers`` are the task's).
        question: the raw question, inserted verbatim.
        template: a :data:`TEMPLATES` name; it picks the instruction and the question wording.
        klass: the trajectory class whose marker to use (training); ``None`` = inference ("correct").
        shots: 0 (the paper's zero-shot NAT format) or 1 (adds the demonstration, for untuned models).
        instruction: custom tasks: the instruction turn, verbatim.
        demo: custom tasks: the one-shot demonstration (``None``: the task has none, so ``shots``
            must be 0).
        markers: custom tasks: the question turns of correct / incorrect trajectories
            (``None``: :data:`DEFAULT_MARKERS`, the paper's QA markers).

    Returns:
        OpenAI-style messages: instruction, acknowledgement, [demonstration], question prompt.

    Raises:
        ConfigError: unknown family, template or class; ``shots`` not 0 or 1; a custom task without
            an instruction, or asked for a demonstration it does not have; custom parts given for a
            built-in family.
    """
    tmpl = get_template(family, template)
    if shots not in (0, 1):
        raise ConfigError(f"shots must be 0 or 1, got {shots}")
    if family == CUSTOM:
        if instruction is None:
            raise ConfigError("a custom task needs its instruction to build a prompt")
        if shots and demo is None:
            raise ConfigError(
                "agent.shots=1 needs a demonstration, but this task has none: add a `demonstrations` "
                "file to the task file or set agent.shots=0"
            )
        tmpl = tmpl.with_markers(markers or DEFAULT_MARKERS)
    else:
        if instruction is not None or demo is not None or markers is not None:
            raise ConfigError(
                f"the {family} family has the paper's own instruction, demonstration and markers"
            )
        instruction = INSTRUCTIONS[family][tmpl.instruction] if tmpl.instruction is not None else None
        demo = DEMOS[family]
    messages: list[Message] = []
    if tmpl.instruction is not None:
        messages += [
            {"role": "user", "content": instruction},
            {"role": "assistant", "content": ACK},
        ]
    if shots:
        messages.append({"role": "user", "content": tmpl.question_prompt(demo.question)})
        for action, observation in demo.turns:
            messages.append({"role": "assistant", "content": action})
            if observation is not None:
                messages.append({"role": "user", "content": f"Observation: {observation}"})
    if shots and messages[-1]["role"] == "assistant":
        # Two user turns in a row confuse chat templates: close the demo like the environment does.
        messages.append({"role": "user", "content": "Observation: Episode finished"})
        messages.append({"role": "assistant", "content": "Ready for the next question."})
    messages.append({"role": "user", "content": tmpl.question_prompt(question, klass)})
    return messages
