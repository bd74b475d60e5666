"""The agent card: written beside an export, read by agent / eval / serve, under the user's flags."""

from __future__ import annotations

import json
import logging

import pytest

from nat_ray.cli import CARD_COMMANDS, build_parser, config_overrides, with_agent_card
from nat_ray.config import NatRayConfig, load_config
from nat_ray.core.agent_card import CARD_FILE, AgentCard, model_card, read_card, write_card
from nat_ray.errors import ConfigError

CARD = AgentCard(
    base_model="embedded",
    variant="nat",
    objective="sft",
    template="zero-shot-target-aware",
    shots=0,
    marker="Question: {question}. Solve it correctly.",
    tools=["calculate", "finish"],
    max_turns=4,
    max_new_tokens=80,
    tasks=["word_math"],
)


def _cfg_for(argv: list[str], config: str | None = None) -> NatRayConfig:
    args = build_parser().parse_args(argv)
    overrides = config_overrides(args.command, args)
    return with_agent_card(load_config(NatRayConfig, config, overrides), config, overrides)


def test_a_card_round_trips_and_a_model_without_one_has_none(tmp_path):
    write_card(CARD, tmp_path)
    assert read_card(str(tmp_path)) == CARD
    assert read_card(str(tmp_path / "missing")) is None and read_card("embedded") is None
    assert read_card(None) is None and read_card("s3://bucket/model") is None


@pytest.mark.parametrize("text", ["{not json", "[]", json.dumps({"template": "x"})])
def test_a_damaged_card_is_a_clear_error_naming_the_file(tmp_path, text):
    (tmp_path / CARD_FILE).write_text(text)
    with pytest.raises(ConfigError, match=CARD_FILE):
        read_card(str(tmp_path))


def test_the_card_beats_the_config_file_and_a_flag_beats_the_card(tmp_path, caplog):
    write_card(CARD, tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text("agent: {shots: 1, template: zero-shot, max_turns: 7}\n")
    cfg = _cfg_for(["eval", "--model", str(tmp_path), "--config", str(config)])
    assert (cfg.agent.shots, cfg.agent.template, cfg.agent.max_turns, cfg.agent.max_new_tokens) == (
        0,
        "zero-shot-target-aware",
        4,
        80,
    )
    with caplog.at_level(logging.WARNING):
        cfg = _cfg_for(
            ["agent", "q?", "--model", str(tmp_path), "--shots", "1", "--set", "agent.max_turns=4"]
        )
    assert cfg.agent.shots == 1 and cfg.agent.max_turns == 4
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "agent.shots=1 (card: 0)" in warnings[0].getMessage()
    assert "max_turns" not in warnings[0].getMessage()  # the same value is no override


def test_an_adapters_card_comes_before_its_base_models(tmp_path):
    adapter, model = tmp_path / "adapter", tmp_path / "model"
    write_card(CARD, adapter)
    write_card(AgentCard(**{**CARD.__dict__, "max_turns": 2}), model)
    cfg = load_config(NatRayConfig, None, [f"engine.model={model}", f"serve.lora={adapter}"])
    card, where = model_card(cfg)
    assert card.max_turns == 4 and where == str(adapter)


def test_commands_that_ask_a_model_read_cards_and_no_card_changes_nothing():
    assert set(CARD_COMMANDS) == {"agent", "eval", "serve"}
    plain = load_config(NatRayConfig, None, [])
    assert _cfg_for(["eval"]) == plain
