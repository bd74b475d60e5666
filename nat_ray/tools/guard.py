"""The contract every tool call is held to, built-in or plug-in, in one place.

- **Timeout**: the tool runs in a worker thread; a call still running after ``timeout_s`` is
  abandoned (Python cannot stop a thread) and answers ``Error: the X tool timed out after N s``.
  A tool with :data:`MAX_HUNG_CALLS` abandoned calls still running is not called again in this
  process: each further call answers at once that the tool is not answering.
- **Argument cap**: an argument longer than ``max_argument_chars`` is refused before the call.
- **Observation cap**: a longer answer is cut to ``max_observation_chars`` with a note saying so.
- **Errors**: an exception (any, even ``SystemExit``), a timeout, a non-string answer or a cut
  answer becomes an ``Error: ...`` observation (the note, for a cut one) the agent reads, and
  the reason goes into the result's ``error`` (the step records ``tool error: ...``). A too-long
  argument is the model's bad input, not a failing tool: an observation without ``error``, as
  the calculator's own refusals are.

The built-in tools keep their own argument and observation caps (``calculate``: 500 characters
in, at most ``MAX_RESULT_DIGITS`` digits out; ``search``: a 300-character query, 3 snippets of
60 words out), so their observations do not change; the timeout and the error handling apply to
them too. A tool that kills its process is the tool runner's to handle: Ray restarts the tool
actor and the call comes back as an ``Error:`` observation (:mod:`nat_ray.tools.actors`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from nat_ray.config import ToolsConfig
from nat_ray.errors import ToolError

log = logging.getLogger(__name__)

MAX_HUNG_CALLS = 4
"""Abandoned (timed-out) calls of one tool still running, after which it is no longer called."""

MAX_ERROR_CHARS = 300
"""Longest exception message quoted in an observation."""


@dataclass(frozen=True)
class ToolLimits:
    """Limits of one tool's calls; ``None`` caps mean the tool enforces its own (the built-ins).

    Attributes:
        timeout_s: seconds one call may take.
        max_argument_chars: longest argument passed to the tool.
        max_observation_chars: longest observation returned to the agent.
    """

    timeout_s: float
    max_argument_chars: int | None
    max_observation_chars: int | None

    @classmethod
    def from_config(cls, config: ToolsConfig) -> ToolLimits:
        return cls(config.call_timeout_s, config.max_argument_chars, config.max_observation_chars)

    def own_caps(self) -> ToolLimits:
        """The same timeout, with the tool's own argument and observation caps."""
        return ToolLimits(self.timeout_s, None, None)


_default_limits = ToolLimits.from_config(ToolsConfig())


def default_limits() -> ToolLimits:
    """The limits for a bare function handed to :func:`nat_ray.core.react.call_tool` in this process."""
    return _default_limits


def set_default_limits(limits: ToolLimits) -> None:
    global _default_limits
    _default_limits = limits


class GuardedTool:
    """A tool function wrapped in the contract; calling it returns the observation text.

    Args:
        name: the tool's name (in messages).
        fn: ``(argument: str) -> str``.
        limits: timeout and caps.
        prepare: run before each call, untimed, in the calling thread (the search index's one-off
            load, which takes minutes on a full corpus, is not a slow call).
        reraise: exception types that are setup problems, not answers (search's missing model or
            corpus): they propagate to the caller instead of becoming an observation.
    """

    def __init__(
        self,
        name: str,
        fn: Callable[[str], str],
        limits: ToolLimits,
        *,
        prepare: Callable[[], object] | None = None,
        reraise: tuple[type[BaseException], ...] = (),
    ) -> None:
        self.name = name
        self.fn = fn
        self.limits = limits
        self.prepare = prepare
        self.reraise = reraise
        self._hung: list[threading.Thread] = []
        self._logged: set[str] = set()

    def __call__(self, argument: str) -> str:
        return self.run(argument)[0]

    def run(self, argument: str) -> tuple[str, str | None]:
        """Call the tool under the contract.

        Returns:
            ``(observation, error)``; ``error`` is None unless the tool failed.
        """
        name, limits = self.name, self.limits
        cap = limits.max_argument_chars
        if cap is not None and len(argument) > cap:
            return f"Error: the {name} argument is {len(argument)} characters long; the limit is {cap}.", None
        self._hung = [t for t in self._hung if t.is_alive()]
        if len(self._hung) >= MAX_HUNG_CALLS:
            return (
                f"Error: the {name} tool is not answering; answer without it.",
                f"{name} has {len(self._hung)} calls still running past the {limits.timeout_s:g} s timeout",
            )
        if self.prepare is not None:
            self.prepare()
        box: dict[str, object] = {}

        def target() -> None:
            try:
                box["value"] = self.fn(argument)
            except BaseException as err:  # noqa: BLE001 - SystemExit too: the thread must report it
                box["error"] = err

        thread = threading.Thread(target=target, name=f"nat-ray-tool-{name}", daemon=True)
        thread.start()
        thread.join(limits.timeout_s)
        if thread.is_alive():
            self._hung.append(thread)
            log.warning("%s tool timed out after %g s on %r", name, limits.timeout_s, argument[:80])
            return (
                f"Error: the {name} tool timed out after {limits.timeout_s:g} s; try another input or answer.",
                f"{name} timed out after {limits.timeout_s:g} s",
            )
        if "error" in box:
            return self._failure(box["error"], argument)  # type: ignore[arg-type]
        value = box["value"]
        if not isinstance(value, str):
            return (
                f"Error: the {name} tool returned {type(value).__name__}, not text.",
                f"{name} returned {type(value).__name__} instead of str",
            )
        cap = limits.max_observation_chars
        if cap is not None and len(value) > cap:
            return (
                f"{value[:cap]}\n[truncated: the {name} tool returned {len(value)} characters; "
                f"the limit is {cap}]",
                f"{name} returned {len(value)} characters; cut to {cap}",
            )
        return value, None

    def _failure(self, err: BaseException, argument: str) -> tuple[str, str | None]:
        if self.reraise and isinstance(err, self.reraise):
            raise err
        if isinstance(err, ToolError):  # a backend failure the tool itself reports
            return f"Error: the {self.name} tool failed ({err}); try again or answer.", str(err)
        message = f"{type(err).__name__}: {err}"[:MAX_ERROR_CHARS]
        if message not in self._logged:  # once per distinct failure, with the traceback
            self._logged.add(message)
            log.warning("%s tool raised on %r", self.name, argument[:80], exc_info=err)
        return (
            f"Error: the {self.name} tool failed ({message}); try again or answer.",
            f"{self.name} raised {message}",
        )
