"""The agent card: how a trained model must be asked, written beside its weights.

A NAT model answers well only with the prompt it was trained on: the zero-shot layout, its variant's
template, the "correct" marker. Asked the way an untuned model is asked (one demonstration, another
template) it answers worse, and nothing in a bare checkpoint says so. So every export carries
``agent_card.json`` (template, shots, marker, tools, max turns, tasks, variant, objective, base model)
and ``nat-ray agent``, ``eval`` and ``serve`` read it by default.

Precedence, highest first: a command-line flag or ``--set``, then the card, then the task file, then
the config's defaults (a config file's values included). A flag that overrides the card is named in
one warning.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from nat_ray import safe_files
from nat_ray.config_loading import parse_override
from nat_ray.errors import ConfigError, ModelError
from nat_ray.models import resolve_export

log = logging.getLogger(__name__)

CARD_FILE = "agent_card.json"
CARD_VERSION = 1
# agent.* fields a card sets, in the order they are applied.
AGENT_FIELDS = ("template", "shots", "max_turns", "max_new_tokens")


@dataclass(frozen=True)
class AgentCard:
    """How to ask one trained model. ``marker`` is the inference question turn (``{question}`` kept)."""

    base_model: str
    variant: str
    objective: str
    template: str
    shots: int
    marker: str
    tools: list[str]
    max_turns: int
    max_new_tokens: int
    tasks: list[str]
    version: int = CARD_VERSION

    def agent_settings(self) -> dict[str, object]:
        """The ``agent`` section fields this card fixes."""
        return {name: getattr(self, name) for name in AGENT_FIELDS}

    def overrides(self) -> list[str]:
        """The card as ``--set`` items (``agent.shots=0``), applied under the user's own ones."""
        return [f"agent.{k}={json.dumps(v)}" for k, v in self.agent_settings().items()]


def write_card(card: AgentCard, folder: str | Path) -> Path:
    """Write ``folder/agent_card.json`` (through a temporary file and a rename)."""

    return safe_files.write_json(Path(folder) / CARD_FILE, asdict(card), checksum=False)


def card_path(model: str | None) -> Path | None:
    """``model``'s card file, if ``model`` is a local folder that has one."""

    if not model or "://" in model:
        return None
    try:  # a training export folder stands for its model/
        folder = Path(resolve_export(model, "model")).expanduser()
    except ModelError:  # an export without a full model: no card to read here
        return None
    path = folder / CARD_FILE
    return path if path.is_file() else None


def read_card(model: str | None) -> AgentCard | None:
    """The card of a model or adapter folder; ``None`` when it has none (a base model, a hub id).

    Raises:
        ConfigError: the card exists but is not a card (bad JSON, missing or unknown keys).
    """
    path = card_path(model)
    if path is None:
        return None
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: not a readable agent card ({err}); delete it or fix it") from err
    return parse_card(text, path)


def parse_card(text: str, where) -> AgentCard:
    """The card a ``agent_card.json``'s text holds (``where`` names it in errors).

    Raises:
        ConfigError: bad JSON, missing or unknown keys.
    """
    try:
        data = json.loads(text)
    except ValueError as err:
        raise ConfigError(f"{where}: not a readable agent card ({err}); delete it or fix it") from err
    names = {f.name for f in fields(AgentCard)}
    if not isinstance(data, dict) or set(data) - names or {f for f in names if f != "version"} - set(data):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"{where}: an agent card needs the keys {sorted(names)}, got {keys}")
    return AgentCard(**data)


def model_card(cfg) -> tuple[AgentCard | None, str | None]:
    """The card that applies to a config's model: its adapter's (``serve.lora``), else its model's."""
    for where in (cfg.serve.lora, cfg.engine.model):
        card = read_card(where)
        if card is not None:
            return card, where
    return None, None


def overridden(card: AgentCard, user_overrides: list[str]) -> list[str]:
    """The card's fields that the user's flags or ``--set`` items set to another value."""

    settings = card.agent_settings()
    clashes = []
    for item in user_overrides:
        path, value = parse_override(item)
        if len(path) == 2 and path[0] == "agent" and path[1] in settings and value != settings[path[1]]:
            clashes.append(f"agent.{path[1]}={value!r} (card: {settings[path[1]]!r})")
    return clashes
