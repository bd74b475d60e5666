"""From scored trajectories to NAT training examples (spec §3.5, §4).

A trajectory row carries the question, the agent's turns and its verdict. A *variant* decides
which rows are used and how each one's question turn is worded:

- ``wo_neg``: positives only, one plain prompt;
- ``nut``: positives and negatives with the *same* plain prompt;
- ``nat``: positives get the "correct" prompt, negatives the "incorrect" one;
- ``nat_k`` / ``nat_3``: negatives graded by F1 into k classes (HotpotQA);
- ``nat_failure`` (beyond the paper): one marker per kind of failure (:func:`failure_kind`: wrong
  answer, turn cap, unparseable action, tool error), the same "correct" prompt at inference;
- Table 4 ablations (marker wording) and ``cot_nat`` / ``cot_nut`` (chain of thought, Table 7).

A user's task (family ``custom``) gets its prompt rebuilt from its task file (:func:`row_task`):
``wo_neg``, ``nut``, ``nat``, ``nat_failure`` and the Table 4 ablations work with any scorer;
``nat_k``, ``nat_3`` and ``nat_soft`` grade by F1, so they need a scorer that returns a float for
every answer; the chain-of-thought variants have no custom form.

Selection is explicit and seeded (spec §8 #12): positives one per question, negatives without
empty trajectories and exact duplicates. The column names of the trajectory Parquet files are
the constants below, so rollout, import and training agree on them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from nat_ray.core.prompts import CUSTOM, build_messages, get_template
from nat_ray.core.scoring import nat_class
from nat_ray.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Trajectory Parquet columns (one row per trajectory).
TRAJECTORY_ID = "trajectory_id"
TASK = "task"
FAMILY = "family"
QUESTION_ID = "question_id"
QUESTION = "question"
GOLD = "gold"
TEMPERATURE = "temperature"
SAMPLE_INDEX = "sample_index"
SEED = "seed"
PROMPT = "prompt"  # JSON list of the messages before the agent's first turn
TRAJECTORY = "trajectory"  # JSON list of the agent's turns: assistant actions and observations
TURNS = "turns"
ANSWER = "answer"
FINISHED = "finished"
CORRECT_PAPER = "correct_paper"
CORRECT_ROBUST = "correct_robust"
F1 = "f1"
NAT_CLASS = "nat_class"
FAILURE_REASON = "failure_reason"
PROMPT_TOKENS = "prompt_tokens"
COMPLETION_TOKENS = "completion_tokens"
MODEL = "model"
ENGINE = "engine"
CONFIG_HASH = "config_hash"
STARTED_AT = "started_at"
ENDED_AT = "ended_at"
# Lineage (schema version 2): which task file and tool versions made the row.
TASK_SOURCE = "task_source"  # the task file's path (None in version-1 files)
TASK_HASH = "task_hash"  # sha256 of the task file's bytes, 16 hex digits
TOOL_VERSIONS = "tool_versions"  # JSON text of {tool name: version}
# Token-exact turns (schema version 3): per agent turn, the ids the engine read and sampled.
TURN_PROMPT_IDS = "turn_prompt_ids"  # list<list<int32>>; None without engine ids (HTTP, imported)
TURN_COMPLETION_IDS = "turn_completion_ids"  # list<list<int32>>, parallel to TURN_PROMPT_IDS
TOKEN_DRIFT = "token_drift"  # int: turns the next prompt did not continue token for token; None: unchecked

LABEL_MODES = ("paper", "robust")
EPISODE_FINISHED = "Observation: Episode finished"


@dataclass(frozen=True)
class Variant:
    """A training-data recipe: whether negatives are used, and the prompt template that marks them."""

    name: str
    negatives: bool
    template: str
    description: str


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant("wo_neg", False, "zero-shot", "positives only (the paper's w/o-Neg baseline)"),
        Variant("nut", True, "zero-shot", "positives and negatives, one prompt for both (NUT)"),
        Variant("nat", True, "zero-shot-target-aware", "negative-aware: correct/incorrect prompts (NAT)"),
        Variant(
            "nat_k", True, "zero-shot-target-aware-four-class", "four F1 classes (the paper's NAT-2, QA)"
        ),
        Variant("nat_3", True, "zero-shot-target-aware-three-class", "three F1 classes (QA)"),
        Variant(
            "nat_failure",
            True,
            "zero-shot-target-aware-failure",
            "failure-aware NAT: one marker per kind of failure (beyond the paper)",
        ),
        Variant("nat_soft", True, "zero-shot-target-aware-soft", "correct prompt for F1 > 0.2 (QA)"),
        Variant(
            "nat_prefix_correct",
            True,
            "zero-shot-target-aware-prefix-correct",
            "Table 4: [Correct]/[Incorrect]",
        ),
        Variant("nat_good_bad", True, "zero-shot-target-aware-prefix-good", "Table 4: [Good]/[Bad]"),
        Variant("nat_ab", True, "zero-shot-target-aware-prefix-AB", "Table 4: [A]/[B]"),
        Variant("nat_random", True, "zero-shot-target-aware-random-sentence", "Table 4: random sentences"),
        Variant(
            "nat_inverse", True, "zero-shot-target-aware-prefix-correct-inverse", "Table 4: swapped markers"
        ),
        Variant("cot_nut", True, "cot-zero-shot", "chain of thought, one prompt (Table 7 NUT)"),
        Variant(
            "cot_nat", True, "cot-zero-shot-target-aware", "chain of thought, negative-aware (Table 7 NAT)"
        ),
    ]
}


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ConfigError(f"unknown data variant {name!r}; choose one of {sorted(VARIANTS)}") from None


def is_positive(row: dict, label_mode: str = "robust") -> bool:
    """The row's verdict under ``label_mode`` (``paper`` = the NAT repo's exact rule)."""
    if label_mode not in LABEL_MODES:
        raise ConfigError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
    return bool(row[CORRECT_PAPER if label_mode == "paper" else CORRECT_ROBUST])


def trajectory_class(row: dict, scheme: str, label_mode: str = "robust") -> str:
    """The prompt class of one trajectory under a template's scheme."""
    if scheme == "none":
        return "correct"
    if scheme == "binary":
        return "correct" if is_positive(row, label_mode) else "incorrect"
    if scheme == "failure":
        return "correct" if is_positive(row, label_mode) else failure_kind(row)
    f1 = row.get(F1)
    if f1 is None:
        raise DataError(
            f"template scheme {scheme!r} grades by F1, but trajectory {row.get(TRAJECTORY_ID)} has none"
        )
    if scheme == "soft":
        return "correct" if f1 > 0.2 else "incorrect"
    return nat_class(float(f1), scheme)


def failure_kind(row: dict) -> str:
    """How a negative failed, from its stored ``failure_reason`` and ``finished`` (:data:`FAILURE_KINDS`).

    An episode that ran out of turns or of context never answered (``turn_cap``); one that finished
    answered wrongly (``wrong_answer``); an engine error, or a row that records neither (imported
    text), is of no known kind (``incorrect``, NAT's own marker).
    """
    reason = row.get(FAILURE_REASON)
    if reason in _KIND_OF_REASON:
        return _KIND_OF_REASON[reason]
    if reason is None and row.get(FINISHED):
        return "wrong_answer"
    return "incorrect"


# nat_ray.core.react's failure reasons, spelled out: importing react would pull in every tool.
_KIND_OF_REASON = {
    "parse_error": "unparseable",
    "turn_cap": "turn_cap",
    "context_overflow": "turn_cap",
    "tool_error": "tool_error",
}


def agent_turns(row: dict) -> list[dict]:
    """The agent's turns, without the environment's closing ``Episode finished`` (spec §8 #13)."""
    turns = list(row[TRAJECTORY])
    if turns and turns[-1]["role"] == "user" and turns[-1]["content"].strip() == EPISODE_FINISHED:
        turns.pop()
    return turns


POSITIVE, NEGATIVE = "positive", "negative"  # a trajectory's status when it is kept
DROP_REASONS = ("empty", "duplicate_positive", "duplicate_negative", "unfinished", "zero_f1", "unlabelled")
UNLABELLED = "unlabelled"  # the nat_class of a served episode nobody has labelled: never a negative


@dataclass(frozen=True)
class Selection:
    """Which trajectories a variant trains on, and what was dropped and why (for the run log)."""

    positives: list[dict]
    negatives: list[dict]
    dropped: dict[str, int]


def select_trajectories(
    rows: Iterable[dict],
    num_positives: int | None,
    num_negatives: int | None,
    seed: int = 42,
    label_mode: str = "robust",
    drop_unfinished_negatives: bool = False,
    drop_zero_f1_negatives: bool = False,
) -> Selection:
    """Seeded, logged choice of positives and negatives.

    Positives: one per question (the first in a stable order), then a seeded sample of
    ``num_positives``. Negatives: empty trajectories and exact duplicates dropped, optionally the
    unfinished ones and (HotpotQA, spec §3.5) those with F1 = 0, then a seeded sample. ``None``
    takes all.

    Raises:
        DataError: more positives or negatives asked for than exist.
    """
    dropped = dict.fromkeys(DROP_REASONS, 0)
    positives: list[dict] = []
    negatives: list[dict] = []
    ordered = sorted(rows, key=lambda r: (str(r[QUESTION_ID]), str(r[TRAJECTORY_ID])))
    for _, group in itertools.groupby(ordered, key=lambda r: str(r[QUESTION_ID])):
        group = list(group)
        features = [trajectory_features(r, label_mode) for r in group]
        for row, status in zip(
            group, select_in_question(features, drop_unfinished_negatives, drop_zero_f1_negatives)
        ):
            if status == POSITIVE:
                positives.append(row)
            elif status == NEGATIVE:
                negatives.append(row)
            else:
                dropped[status] += 1
    rng = random.Random(seed)
    return Selection(
        sample_rows(positives, num_positives, rng, "positives"),
        sample_rows(negatives, num_negatives, rng, "negatives"),
        dropped,
    )


def trajectory_features(row: dict, label_mode: str) -> dict:
    """What selection needs of one trajectory row: ids, verdict, drop flags, a key of its turns."""
    turns = agent_turns(row)
    f1 = row.get(F1)
    return {
        TRAJECTORY_ID: str(row[TRAJECTORY_ID]),
        QUESTION_ID: str(row[QUESTION_ID]),
        "positive": is_positive(row, label_mode),
        "empty": not any(t["role"] == "assistant" for t in turns),
        # A null `finished` counts as unfinished.
        "unfinished": not row.get(FINISHED, True),
        "zero_f1": f1 is not None and float(f1) == 0.0,
        "unlabelled": row.get(NAT_CLASS) == UNLABELLED,
        # Exact duplicates of a question's negatives share this key (sha256 of the turns).
        "turns_key": hashlib.sha256(
            json.dumps([(t["role"], t["content"]) for t in turns]).encode()
        ).hexdigest(),
    }


def select_in_question(
    features: Sequence[dict], drop_unfinished_negatives: bool, drop_zero_f1_negatives: bool
) -> list[str]:
    """Each trajectory's status within its question: positive, negative, or a drop reason.

    The rules of :func:`select_trajectories`, one question at a time (and the streamed
    preparation's, :mod:`nat_ray.train.prepare`): in trajectory-id order, empty ones are dropped,
    the first positive is kept, and negatives are cleaned (optionally unfinished and F1 = 0 ones)
    and deduplicated by their turns.

    Args:
        features: :func:`trajectory_features` of one question's trajectories, any order.

    Returns:
        One status per input, in input order.
    """
    status = [""] * len(features)
    seen_positive, seen_turns = False, set()
    for i in sorted(range(len(features)), key=lambda i: features[i][TRAJECTORY_ID]):
        f = features[i]
        if f.get("unlabelled"):  # captured traffic without gold or feedback: its verdict is unknown
            status[i] = UNLABELLED
        elif f["empty"]:
            status[i] = "empty"
        elif f["positive"]:
            status[i] = "duplicate_positive" if seen_positive else POSITIVE
            seen_positive = True
        elif drop_unfinished_negatives and f["unfinished"]:
            status[i] = "unfinished"
        elif drop_zero_f1_negatives and f["zero_f1"]:
            status[i] = "zero_f1"
        elif f["turns_key"] in seen_turns:
            status[i] = "duplicate_negative"
        else:
            seen_turns.add(f["turns_key"])
            status[i] = NEGATIVE
    return status


def sample_rows(rows: Sequence, n: int | None, rng: random.Random, what: str) -> list:
    """``n`` of ``rows`` drawn with ``rng`` (all when ``n`` is None): the one seeded draw of the
    selection, which the streamed preparation repeats on row positions.

    Raises:
        DataError: fewer rows than ``n``.
    """
    if n is None:
        return rows
    if n > len(rows):
        raise DataError(f"asked for {n} {what} but the data has only {len(rows)} (after cleaning)")
    return rng.sample(rows, n)


@dataclass(frozen=True)
class ChatExample:
    """One training conversation. The first ``prompt_messages`` turns are prompt: never supervised.

    ``turn_prompt_ids`` / ``turn_completion_ids``: the engine's ids of each agent turn when the row
    has them (self-collected with vLLM); training then builds the example from them
    (:func:`nat_ray.core.masks.tokenize_from_ids`) instead of re-tokenising the text.
    """

    messages: list[dict]
    prompt_messages: int
    trajectory_id: str
    klass: str
    turn_prompt_ids: list[list[int]] | None = None
    turn_completion_ids: list[list[int]] | None = None


def row_task(row: dict):
    """The task of a custom-task row, for its prompt: its task file, found as well as this machine can.

    The registered task of the row's name when its file hash matches (or the row has none); else
    the task file at ``task_source``; else the registered task of that name, with a warning (the
    file changed since the row was made: the prompt is rebuilt from the file as it is now).

    Raises:
        DataError: neither the name is registered nor the task file exists here.
    """
    return _row_task(row.get(TASK), row.get(TASK_SOURCE), row.get(TASK_HASH))


@lru_cache(maxsize=256)
def _row_task(name: str | None, source: str | None, digest: str | None):
    from nat_ray.tasks import TASKS, load_task_file  # lazily: the tasks import their plug-ins

    registered = TASKS.get(str(name).lower()) if name else None
    if registered is not None and (digest is None or registered.source_hash == digest):
        return registered
    if source and Path(source).is_file():
        task = load_task_file(source)
        if digest is not None and task.source_hash != digest:
            log.warning(
                "task file %s changed since rows of %r were made (hash %s, now %s)",
                source,
                name,
                digest,
                task.source_hash,
            )
        return task
    if registered is not None:
        log.warning(
            "rows of task %r were made with task file %s (hash %s); using the registered %s (hash %s)",
            name,
            source,
            digest,
            registered.source,
            registered.source_hash,
        )
        return registered
    raise DataError(
        f"cannot rebuild the prompt of task {name!r}: its task file {source} does not exist here and no "
        "task of that name is registered (register it with tasks_dir, or train where the file is)"
    )


def build_example(row: dict, variant: Variant | str, label_mode: str = "robust") -> ChatExample:
    """One training conversation: the variant's prompt for this row's class, then the agent's turns.

    A built-in family's prompt is the paper's; a custom task's (``family == "custom"``) is rebuilt
    from its task file (:func:`row_task`): instruction and markers.
    """
    variant = get_variant(variant) if isinstance(variant, str) else variant
    family = row[FAMILY]
    template = get_template(family, variant.template)
    klass = trajectory_class(row, template.scheme, label_mode)
    if family == CUSTOM:
        prompt = row_task(row).build_messages(row[QUESTION], variant.template, klass, shots=0)
    else:
        prompt = build_messages(family, row[QUESTION], variant.template, klass, shots=0)
    return ChatExample(
        prompt + agent_turns(row),
        len(prompt),
        str(row[TRAJECTORY_ID]),
        klass,
        row.get(TURN_PROMPT_IDS),
        row.get(TURN_COMPLETION_IDS),
    )


def build_examples(
    rows: Sequence[dict],
    variant: Variant | str,
    num_positives: int | None = None,
    num_negatives: int | None = None,
    seed: int = 42,
    label_mode: str = "robust",
    drop_unfinished_negatives: bool = False,
    drop_zero_f1_negatives: bool = False,
) -> tuple[list[ChatExample], Selection]:
    """Select rows for ``variant`` and turn them into chat examples (positives first, as NAT does).

    Raises:
        DataError: the variant needs negatives but none remain, or no positives exist.
    """
    variant = get_variant(variant) if isinstance(variant, str) else variant
    selection = select_trajectories(
        rows,
        num_positives,
        num_negatives if variant.negatives else 0,
        seed,
        label_mode,
        drop_unfinished_negatives,
        drop_zero_f1_negatives,
    )
    if not selection.positives:
        raise DataError(f"variant {variant.name!r} found no positive trajectories to train on")
    if variant.negatives and not selection.negatives:
        raise DataError(f"variant {variant.name!r} needs negative trajectories, but the data has none")
    examples = [build_example(r, variant, label_mode) for r in selection.positives + selection.negatives]
    log.info(
        "%s: %d positives + %d negatives (dropped %s)",
        variant.name,
        len(selection.positives),
        len(selection.negatives),
        {k: v for k, v in selection.dropped.items() if v},
    )
    return examples, selection
