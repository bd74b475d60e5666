"""Planned episodes and their scored rows: one shape for rollout and evaluation.

A stage first plans every episode it will run (which question, at which temperature, sample and
seed, under which trajectory id), then runs them and turns each finished episode into a trajectory
row. Rollout ships its plan through Ray Data as Arrow rows (:meth:`PlannedEpisode.to_row`), evaluation
keeps it in memory; both score and build rows with :func:`scored_row`, so a trajectory of either
stage is scored against the same gold and carries the same columns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from nat_ray.core import records
from nat_ray.core.react import Episode
from nat_ray.tasks.task_file import Task


@dataclasses.dataclass(frozen=True)
class PlannedEpisode:
    """One episode a stage will run.

    Attributes:
        gold: the normalised gold as rows store it (text).
        gold_scored: the gold the task's scorer is given (:meth:`Task.scoring_gold`), as text so a
            plan travels as an Arrow row.
    """

    trajectory_id: str
    task: str
    question_id: str
    question: str
    gold: str
    gold_scored: str
    temperature: float
    sample_index: int
    seed: int

    def to_row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> PlannedEpisode:
        """A plan back from its row (extra columns are ignored)."""
        return cls(**{f.name: row[f.name] for f in dataclasses.fields(cls)})


def plan_episodes(
    tasks: Sequence[Task],
    split: str,
    limit: int | None,
    model_id: str,
    *,
    temperatures: Iterable[float],
    samples: int = 1,
    seeds: Iterable[int],
) -> list[PlannedEpisode]:
    """Every (seed, task, question, temperature, sample) in that order, each with its trajectory id.

    Raises:
        ConfigError / DataError: unknown split, missing or bad data (the questions are read here, so
            bad data fails before a stage writes anything).
    """
    temperatures = [float(t) for t in temperatures]
    plans = []
    for seed in seeds:
        for task in tasks:
            for q in task.load(split, limit=limit):
                gold, gold_scored = records.gold_text(q.gold), task.scoring_gold(q)
                for temperature in temperatures:
                    for sample in range(samples):
                        tid = records.trajectory_id(model_id, task.name, q.id, temperature, sample, seed)
                        plans.append(
                            PlannedEpisode(
                                tid, task.name, q.id, q.question, gold, gold_scored, temperature, sample, seed
                            )
                        )
    return plans


def scored_row(
    plan: PlannedEpisode,
    task: Task,
    episode: Episode,
    *,
    model: str,
    engine: str,
    config_hash: str,
    started_at: str,
    tool_versions: Mapping[str, str],
    tokenizer=None,
) -> dict:
    """The trajectory row of a finished (or failed) planned episode, scored by its task."""
    return records.episode_row(
        episode,
        tokenizer,
        task=task.name,
        family=task.family,
        question_id=plan.question_id,
        question=plan.question,
        gold=plan.gold,
        score=task.score(episode.answer, plan.gold_scored),
        temperature=plan.temperature,
        sample_index=plan.sample_index,
        seed=plan.seed,
        model=model,
        engine=engine,
        config_hash=config_hash,
        started_at=started_at,
        **task.lineage(tool_versions),
    )
