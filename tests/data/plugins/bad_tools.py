"""Plug-ins with the wrong shape, for check_tool_specs' error report (tests/test_tool_plugins.py)."""

from __future__ import annotations

NOT_CALLABLE = 3


def two_args(a: str, b: str) -> str:
    return a + b


def no_args() -> str:
    return ""


def keyword_only(*, text: str) -> str:
    return text


def with_default(argument: str, k: int = 3) -> str:
    return argument * k


class NeedsPath:
    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, argument: str) -> str:
        return argument


class NoCall:
    pass


class CallTakesTwo:
    def __call__(self, a: str, b: str) -> str:
        return a + b


class FailsToStart:
    def __init__(self) -> None:
        raise OSError("index file missing")

    def __call__(self, argument: str) -> str:
        return argument
