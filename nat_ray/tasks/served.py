"""What a task file says about its served episodes: ``capture`` (whether a server with ``serve.capture``
writes them) and ``judge`` (who grades those that carry no gold answer).

Pure (the judge's HTTP calls are :mod:`nat_ray.experiment.judge`'s); :func:`served_settings` reports
every problem into the task file's list, as the other sections' checks do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class JudgeSpec:
    """A task's judge (:mod:`nat_ray.experiment.judge`): an OpenAI-compatible ``endpoint`` (its ``/v1``
    base URL), the ``model`` to ask, the ``rubric`` it grades by, the ``scale`` of its ``Score: N``, the
    environment variable holding its key (``api_key_env``) and the longest reply (``max_tokens``)."""

    endpoint: str
    model: str
    rubric: str
    scale: int = 1
    api_key_env: str | None = None
    max_tokens: int = 256


JUDGE_KEYS = ("endpoint", "model", "rubric", "scale", "api_key_env", "max_tokens")


def check_judge(judge: Any, problems: list[str]) -> JudgeSpec | None:
    """The section as a :class:`JudgeSpec`, or None with its problems appended to ``problems``."""
    if not isinstance(judge, dict):
        problems.append(f"judge must be a mapping of {list(JUDGE_KEYS)}, got {judge!r}")
        return None
    count = len(problems)
    for key in judge:
        if key not in JUDGE_KEYS:
            problems.append(f"judge.{key}: unknown key; known keys: {list(JUDGE_KEYS)}")
    for key in ("endpoint", "model", "rubric"):
        if not (isinstance(judge.get(key), str) and judge[key].strip()):
            problems.append(f"judge.{key} must be a non-empty string, got {judge.get(key)!r}")
    if (
        "endpoint" in judge
        and isinstance(judge["endpoint"], str)
        and not judge["endpoint"].startswith(("http://", "https://"))
    ):
        problems.append(f"judge.endpoint must be an http(s) URL, got {judge['endpoint']!r}")
    for key, default in (("scale", 1), ("max_tokens", 256)):
        value = judge.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"judge.{key} must be a whole number >= 1, got {value!r}")
    api_key_env = judge.get("api_key_env")
    if api_key_env is not None and not (isinstance(api_key_env, str) and api_key_env.strip()):
        problems.append(f"judge.api_key_env must name an environment variable, got {api_key_env!r}")
    if len(problems) > count:
        return None
    return JudgeSpec(**{k: judge[k] for k in JUDGE_KEYS if k in judge})


def served_settings(data: dict, problems: list[str]) -> tuple[bool, JudgeSpec | None]:
    """``(capture, judge)`` of a task file's mapping (defaults: captured, no judge)."""
    capture = data.get("capture", True)
    if not isinstance(capture, bool):
        problems.append(f"capture must be true or false, got {capture!r}")
    return capture, check_judge(data["judge"], problems) if "judge" in data else None
