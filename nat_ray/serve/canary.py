"""A canary: a share of the agent traffic goes to a new adapter, and the labels tell how it does.

``serve.canary`` (or ``POST /v1/canary``) names an adapter and a share; each ``/v1/agent`` request that
names no model is sent to the adapter with that probability, the rest to the server's agent model
(the incumbent). Every answered episode is remembered with its model and, when known, its label: the
gold the request carried (scored when it was answered) or later feedback (``POST /v1/feedback``, score
1.0 correct; feedback wins over the gold). ``GET /v1/canary`` reports per model the episodes, the
labelled ones, the successes with a 95 % Wilson interval, and a verdict; a person promotes or rolls back
(the verdict advises). Pure: the ingress holds one :class:`CanaryState`; nothing here touches Ray.
"""

from __future__ import annotations

import random
import threading
from collections import OrderedDict
from dataclasses import dataclass

from nat_ray.evaluation.results_table import wilson_interval

MAX_REMEMBERED = 100_000  # episodes whose model and label are kept for the report (oldest dropped)


@dataclass(frozen=True)
class Canary:
    """The adapter on trial (``<model_id>:<name>``) and the share of unnamed requests it gets."""

    model: str
    share: float


def verdict(canary: dict, incumbent: dict) -> str:
    """``better`` / ``worse`` when the two 95 % intervals do not overlap, ``within noise`` when they do,
    ``too few labels`` while either model has no labelled episode."""
    if not canary["labelled"] or not incumbent["labelled"]:
        return "too few labels"
    if canary["interval"][0] > incumbent["interval"][1]:
        return "better"
    if canary["interval"][1] < incumbent["interval"][0]:
        return "worse"
    return "within noise"


class CanaryState:
    """The canary in force (if any), the router's coin, and what each answered episode's label is."""

    def __init__(self, incumbent: str, canary: Canary | None = None, seed: int | None = None) -> None:
        self.incumbent = incumbent
        self.canary = canary
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._episodes: OrderedDict[str, tuple[str, bool | None]] = OrderedDict()

    def route(self) -> str:
        """The model an unnamed request runs on."""
        canary = self.canary
        if canary is not None and self._rng.random() < canary.share:
            return canary.model
        return self.incumbent

    def answered(self, episode_id: str, model: str, correct: bool | None) -> None:
        with self._lock:
            self._episodes[episode_id] = (model, correct)
            while len(self._episodes) > MAX_REMEMBERED:
                self._episodes.popitem(last=False)

    def feedback(self, episode_id: str, score: float) -> None:
        with self._lock:
            if episode_id in self._episodes:
                model, _ = self._episodes[episode_id]
                self._episodes[episode_id] = (model, score >= 1.0)

    def start(self, canary: Canary) -> None:
        """A new trial: the report counts the episodes from here on, the canary's and the incumbent's."""
        with self._lock:
            self._episodes.clear()
            self.canary = canary

    def promote(self) -> str:
        """The canary becomes the incumbent; returns the new incumbent.

        Raises:
            LookupError: no canary is running.
        """
        if self.canary is None:
            raise LookupError("no canary is running")
        self.incumbent, self.canary = self.canary.model, None
        return self.incumbent

    def rollback(self) -> str:
        """The canary stops; unnamed requests all go to the incumbent again.

        Raises:
            LookupError: no canary is running.
        """
        if self.canary is None:
            raise LookupError("no canary is running")
        self.canary = None
        return self.incumbent

    def report(self) -> dict:
        """``{incumbent, canary, share, models: {model: {episodes, labelled, successes, rate, interval}},
        verdict}``; the verdict compares the canary with the incumbent."""
        with self._lock:
            entries = list(self._episodes.values())
        models: dict[str, dict] = {}
        for model, correct in entries:
            stats = models.setdefault(model, {"episodes": 0, "labelled": 0, "successes": 0})
            stats["episodes"] += 1
            if correct is not None:
                stats["labelled"] += 1
                stats["successes"] += int(correct)
        for stats in models.values():
            n = stats["labelled"]
            stats["rate"] = stats["successes"] / n if n else None
            stats["interval"] = list(wilson_interval(stats["successes"], n))
        canary = self.canary
        empty = {"episodes": 0, "labelled": 0, "successes": 0, "rate": None, "interval": [0.0, 1.0]}
        return {
            "incumbent": self.incumbent,
            "canary": canary.model if canary else None,
            "share": canary.share if canary else None,
            "models": models,
            "verdict": None
            if canary is None
            else verdict(models.get(canary.model, empty), models.get(self.incumbent, empty)),
        }
