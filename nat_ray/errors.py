"""One exception family for the project, so callers can catch exactly what they mean.

Bugs in our own code raise ordinary Python exceptions. These classes mark problems that come from
outside — a bad config, a bad file, a model's malformed action, a tool that cannot answer — and
their messages name the field or file, the value, and the fix.
"""

from __future__ import annotations


class NatRayError(Exception):
    """Base class of every error nat_ray raises on purpose."""


class ConfigError(NatRayError, ValueError):
    """A config value is missing, unknown or out of range."""


class DataError(NatRayError, ValueError):
    """A data file is missing or malformed; the message names the file and line."""


class ModelError(NatRayError):
    """A model cannot be found, converted or loaded."""


class ToolError(NatRayError):
    """A tool's backend failed (not the model's input: bad input becomes an ``Error:`` observation)."""


class ActionParseError(NatRayError, ValueError):
    """Model output holds no well-formed ``Action: name[argument]`` line.

    Raised by :func:`nat_ray.core.react.parse_action`; the stepper records it as data
    (a failed step), never lets it crash a batch.
    """

    def __init__(self, reason: str, text: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.text = text
