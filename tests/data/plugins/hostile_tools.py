"""Plug-in tools that break every rule of the tool contract (tests/test_tool_plugins.py and
tests/integration/test_hostile_tools.py load them as ``<this file>:<function>``)."""

from __future__ import annotations

import os
import time


def explode(argument: str) -> str:
    raise RuntimeError(f"boom on {argument}")


def hang(argument: str) -> str:
    time.sleep(3600)  # far past any call timeout
    return "too late"


def flood(argument: str) -> str:
    return "x" * 10_000_000  # 10 MB


def number(argument: str) -> str:
    return 42  # type: ignore[return-value]  # not a string, on purpose


def die(argument: str) -> str:
    os._exit(3)  # takes its whole process down


def where(argument: str) -> str:
    """A well-behaved tool that says where it runs: ``<module file>|<cwd>``."""
    return f"{__file__}|{os.getcwd()}"


class Counter:
    """A class tool: constructed once per process, then called."""

    constructed = 0

    def __init__(self) -> None:
        Counter.constructed += 1
        self.calls = 0

    def __call__(self, argument: str) -> str:
        self.calls += 1
        return f"{argument} #{self.calls}"
