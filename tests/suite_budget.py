"""The suite's time budget, per module: wall seconds and how busy the machine's cores were meanwhile.

The suite has a 25-minute budget on two cores, and a change that adds tests says what it adds. Wall
time alone cannot tell a test that computes from one that waits: one that keeps both cores busy
can only be made cheaper by doing less, one that waits can overlap. So the test command's summary
lists each module's wall seconds and the share of the machine's cores that were busy meanwhile
(``/proc/stat``, the whole machine's; absent where there is none).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import pytest

PROC_STAT = Path("/proc/stat")
SHOWN = 20  # modules listed, costliest first
MIN_WALL_S = 60.0  # shorter sessions (a unit run, one module) print nothing


def busy_seconds() -> float | None:
    """CPU seconds all cores spent not idle since boot, or None without ``/proc/stat``."""
    try:
        fields = PROC_STAT.read_text().split("\n", 1)[0].split()[1:]
        ticks = [int(f) for f in fields]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


_spent: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # module -> [wall, busy]


@contextmanager
def _measured(item):
    module = item.nodeid.split("::", 1)[0]
    wall, busy = time.monotonic(), busy_seconds()
    try:
        yield
    finally:
        spent = _spent[module]
        spent[0] += time.monotonic() - wall
        after = busy_seconds()
        if busy is not None and after is not None:
            spent[1] += after - busy


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with _measured(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with _measured(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    with _measured(item):
        return (yield)


def pytest_terminal_summary(terminalreporter):
    wall = sum(w for w, _ in _spent.values())
    if wall < MIN_WALL_S:
        return
    cores = os.cpu_count() or 1
    busy = sum(b for _, b in _spent.values())
    write = terminalreporter.write_line
    terminalreporter.section("suite budget (25 minutes on 2 cores)")
    write(f"{wall / 60:.1f} min in tests; cores busy {busy / wall / cores:.0%} of it on {cores} cores")
    for module, (w, b) in sorted(_spent.items(), key=lambda kv: -kv[1][0])[:SHOWN]:
        write(f"{w:7.0f} s  {b / max(w, 1e-9) / cores:4.0%} busy  {module}")
