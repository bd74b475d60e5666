"""The command table: every flag sets a real config field, every command names a real function."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
from pathlib import Path

import pytest

from nat_ray.cli import COMMANDS, build_parser, config_overrides, main
from nat_ray.config import NatRayConfig, load_config


def _parse(*argv: str):
    args = build_parser().parse_args(list(argv))
    return args.command, args


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_every_command_has_help_that_lists_its_flags(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command.name, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in command.flags:
        assert flag.options.get("metavar", flag.name) in text
    assert ("--config" in text) == command.config


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_every_command_runs_a_function_that_exists(command):
    module_name, function_name = command.run.split(":")
    spec = importlib.util.find_spec(module_name)
    assert spec is not None and spec.origin is not None, command.run
    tree = ast.parse(Path(spec.origin).read_text())
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert function_name in functions, command.run
    parameters = [a.arg for a in functions[function_name].args.args]
    own = [flag.key for flag in command.flags if flag.field is None]
    assert parameters == (["cfg"] if command.config else []) + own


def test_every_flag_is_a_shortcut_for_a_real_config_field():
    defaults = NatRayConfig()
    for command in COMMANDS:
        for flag in command.flags:
            if flag.field is None:
                continue
            section, key = flag.field.split(".")
            names = {f.name for f in dataclasses.fields(getattr(defaults, section))}
            assert key in names, f"{command.name} {flag.name} -> {flag.field}"


def test_flags_override_the_file_and_set_overrides_a_flag(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("agent:\n  task: svamp\n  max_turns: 3\n  seed: 5\n")
    command, args = _parse(
        "agent", "--config", str(config), "--task", "hotpotqa", "--max-turns", "4", "--seed", "6",
        "--set", "agent.seed=7", "q?",
    )  # fmt: skip
    cfg = load_config(NatRayConfig, args.config, config_overrides(command, args))
    assert (cfg.agent.task, cfg.agent.max_turns, cfg.agent.seed) == ("hotpotqa", 4, 7)
    assert args.question == "q?" and args.gold is None and args.as_json is False


def test_list_flags_become_lists_and_unset_flags_leave_the_defaults():
    command, args = _parse("eval", "--tasks", "gsm8k,svamp", "--seeds", "0,1,2", "--greedy")
    cfg = load_config(NatRayConfig, None, config_overrides(command, args))
    assert cfg.eval.tasks == ["gsm8k", "svamp"] and cfg.eval.seeds == [0, 1, 2] and cfg.eval.greedy
    assert cfg.eval.limit == NatRayConfig().eval.limit and cfg.engine.model == NatRayConfig().engine.model


def test_a_bad_value_is_a_clear_error_and_exit_code_two(capsys):
    assert main(["rollout", "--set", "rollout.limit=-3"]) == 2
    assert "rollout.limit" in capsys.readouterr().err
