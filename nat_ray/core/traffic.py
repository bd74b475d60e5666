"""Served traffic as a round's training data: each captured episode labelled, or left out.

A captured episode (:mod:`nat_ray.serve.capture`) is labelled by the first of: a person's feedback
(``POST /v1/feedback``: its score, and its answer as the gold), the gold answer the request carried
(already scored by the task's scorer when it was served), its task's judge (a model grading by a
rubric, :mod:`nat_ray.experiment.judge`), or nothing (left out and counted: a verdict nobody gave must
not become a negative). Feedback scores follow the plug-in scorer's convention: a
float in [0, 1] where 1.0 means correct, kept as the row's F1 where the task grades by F1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from nat_ray.core import nat_data as columns
from nat_ray.core.records import verdict_class
from nat_ray.core.scoring import Score

LABELS = ("feedback", "gold", "judge", "unlabelled")
F1_FAMILIES = ("hotpotqa", "custom")  # the families whose rows carry an F1 (NAT-k grades by it)


def with_feedback(row: dict, feedback: Mapping) -> dict:
    """``row`` relabelled by one feedback entry (``{"score", "answer"?}``)."""
    score = float(feedback["score"])
    correct = score >= 1.0
    f1 = score if row[columns.FAMILY] in F1_FAMILIES else None
    verdict = Score(correct_paper=correct, correct_robust=correct, f1=f1)
    new = dict(row)
    new[columns.CORRECT_PAPER] = new[columns.CORRECT_ROBUST] = correct
    new[columns.F1] = f1
    new[columns.NAT_CLASS] = verdict_class(row[columns.FAMILY], verdict)
    if feedback.get("answer"):
        new[columns.GOLD] = str(feedback["answer"])
    return new


def label_traffic(
    rows: Iterable[dict],
    feedback: Mapping[str, Mapping],
    used: set[str] = frozenset(),
    judge: Callable[[list[dict]], Mapping[str, Mapping]] | None = None,
) -> tuple[list[dict], dict[str, int]]:
    """The labelled rows among ``rows`` not in ``used`` (episode ids earlier rounds trained on), in
    their order; ``judge`` is called once with the new rows neither feedback nor gold labels and returns
    its verdicts (``{episode_id: {"score"}}``).

    Returns:
        ``(rows, counts)``; counts: ``episodes`` (all captured), ``earlier`` (used by earlier rounds),
        ``new``, and per label (:data:`LABELS`) how many of the new ones it labelled or left out.
    """
    counts = dict.fromkeys(("episodes", "earlier", "new", *LABELS), 0)
    rows = list(rows)
    new = [row for row in rows if row[columns.TRAJECTORY_ID] not in used]
    counts["episodes"], counts["new"], counts["earlier"] = len(rows), len(new), len(rows) - len(new)
    waiting = [
        r
        for r in new
        if r[columns.TRAJECTORY_ID] not in feedback and r[columns.NAT_CLASS] == columns.UNLABELLED
    ]
    judged = judge(waiting) if judge is not None and waiting else {}
    labelled = []
    for row in new:
        episode_id = row[columns.TRAJECTORY_ID]
        if episode_id in feedback:
            labelled.append(with_feedback(row, feedback[episode_id]))
            counts["feedback"] += 1
        elif row[columns.NAT_CLASS] != columns.UNLABELLED:
            labelled.append(row)
            counts["gold"] += 1
        elif episode_id in judged:
            labelled.append(with_feedback(row, {"score": judged[episode_id]["score"]}))
            counts["judge"] += 1
        else:
            counts["unlabelled"] += 1
    return labelled, counts


def describe(counts: Mapping[str, int]) -> str:
    """One line for a results table: ``3 new of 4 captured: 1 labelled by feedback, 1 by gold, 0 by the
    judge, 1 unlabelled (left out)``."""
    return (
        f"{counts['new']} new of {counts['episodes']} captured: {counts['feedback']} labelled by feedback, "
        f"{counts['gold']} by gold, {counts.get('judge', 0)} by the judge, {counts['unlabelled']} unlabelled "
        "(left out)"
    )
