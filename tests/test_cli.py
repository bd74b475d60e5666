"""The command table: every flag sets a real config field, every command names a real function."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
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
    assert args.question == "q?" and args.gold is None and args.json_path is None


def test_list_flags_become_lists_and_unset_flags_leave_the_defaults():
    command, args = _parse("eval", "--tasks", "gsm8k,svamp", "--seeds", "0,1,2", "--greedy")
    cfg = load_config(NatRayConfig, None, config_overrides(command, args))
    assert cfg.eval.tasks == ["gsm8k", "svamp"] and cfg.eval.seeds == [0, 1, 2] and cfg.eval.greedy
    assert cfg.eval.limit == NatRayConfig().eval.limit and cfg.engine.model == NatRayConfig().engine.model


def test_a_bad_value_is_a_clear_error_and_exit_code_two(capsys):
    assert main(["rollout", "--set", "rollout.limit=-3"]) == 2
    assert "rollout.limit" in capsys.readouterr().err


def test_version_and_verbosity_before_or_after_the_subcommand(capsys):
    from nat_ray import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"nat-ray {__version__}"
    parser = build_parser()
    assert parser.parse_args(["-v", "models"]).verbose is True
    assert parser.parse_args(["models", "-v"]).verbose is True
    after = parser.parse_args(["models", "-q"])
    assert after.quiet is True and after.verbose is False
    plain = parser.parse_args(["models"])
    assert plain.verbose is False and plain.quiet is False
    with pytest.raises(SystemExit):
        parser.parse_args(["models", "-v", "-q"])


def test_a_bad_list_of_seeds_says_what_it_expected(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--seeds", "0,x"])
    err = capsys.readouterr().err
    assert "expected whole numbers separated by commas, e.g. 0,1,2; got '0,x'" in err and "_comma" not in err


def test_tasks_lists_splits_counts_and_where_the_data_was_found(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv("NAT_RAY_DATA_DIR", str(tmp_path / "missing"))
    word_math = Path(__file__).parents[1] / "examples" / "word_math" / "task.yaml"
    assert main(["tasks", str(word_math), "--json", str(tmp_path / "tasks.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"NAT_RAY_DATA_DIR={tmp_path / 'missing'} is not a folder")
    assert "is not a folder" in caplog.text  # a missing data folder is said, not skipped in silence
    listing = json.loads((tmp_path / "tasks.json").read_text())
    tasks = {t["name"]: t for t in listing["tasks"]}
    assert tasks["gsm8k"]["splits"]["test"]["questions"] == 100
    assert tasks["gsm8k"]["splits"]["test"]["where"] == "shipped sample"
    assert "no data" in tasks["asdiv"]["splits"]["test"]["error"]  # not shipped (CC BY-NC)
    assert tasks["word_math"]["splits"]["test"]["questions"] == 200 and tasks["word_math"]["tools"] == [
        "calculate"
    ]
    assert "  test                 200 questions  file: " in out


def test_json_is_a_path_on_every_command_with_a_result_and_dash_prints_only_json(capsys):
    for name in ("agent", "rollout", "train", "eval", "pipeline", "loop", "tasks"):
        command = next(c for c in COMMANDS if c.name == name)
        (flag,) = [f for f in command.flags if f.name == "--json"]
        assert flag.key == "json_path" and flag.options == {"metavar": "PATH"}, name
    assert main(["tasks", "--json", "-"]) == 0
    listing = json.loads(capsys.readouterr().out)  # nothing but the JSON on standard output
    assert "gsm8k" in {t["name"] for t in listing["tasks"]}


def test_the_loop_trains_lora_unless_told_otherwise(tmp_path, capsys):
    from nat_ray.cli import lora_by_default

    assert lora_by_default(None, []) == ["train.mode=lora"]
    assert lora_by_default(None, ["train.mode=full"]) == []
    named = tmp_path / "full.yaml"
    named.write_text("train:\n  mode: full\n")
    silent = tmp_path / "silent.yaml"
    silent.write_text("train:\n  lora_rank: 8\n")
    assert lora_by_default(str(named), []) == [] and lora_by_default(str(silent), []) == ["train.mode=lora"]
    # A plain `nat-ray loop` gets past the check that the loop trains adapters (it fails later, on data).
    code = main(["loop", "--name", "x", "--set", f"loop.runs_dir={tmp_path}", "--set", "loop.round0=/nope"])
    err = capsys.readouterr().err
    assert code == 2 and "/nope" in err and "train.mode" not in err and not (tmp_path / "x").exists()


def test_without_v_ray_datas_console_shows_warnings_only(monkeypatch):
    import logging

    from nat_ray.cli import RAY_DATA_QUIET, _setup_logging

    monkeypatch.delenv("RAY_DATA_LOGGING_CONFIG", raising=False)
    _setup_logging(verbose=False)
    assert os.environ["RAY_DATA_LOGGING_CONFIG"] == str(RAY_DATA_QUIET)
    from ray.data._internal.logging import configure_logging

    configure_logging()  # what importing ray.data does, with the file the variable names
    handlers = {type(h).__name__: h.level for h in logging.getLogger("ray.data").handlers}
    assert handlers["PlainRayHandler"] == logging.WARNING  # the console
    assert handlers["SessionFileHandler"] == logging.NOTSET  # the session's ray-data.log keeps everything
    monkeypatch.delenv("RAY_DATA_LOGGING_CONFIG")
    configure_logging()  # Ray Data's own defaults again for the rest of the session


def test_print_config_shows_the_resolved_config_and_runs_nothing(tmp_path, monkeypatch, capsys):
    import ray
    import yaml

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("--print-config must start nothing"))
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  max_steps: 5\n  learning_rate: 1.0e-4\n")
    code = main(["train", "--config", str(config), "--set", "train.max_steps=3", "--print-config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert code == 0 and printed["train"]["max_steps"] == 3 and printed["train"]["learning_rate"] == 1e-4
    assert printed["agent"]["shots"] == NatRayConfig().agent.shots  # the defaults are there too
    assert main(["loop", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["mode"] == "lora"  # the loop's own default


def test_dry_run_names_every_problem_in_one_run_and_writes_nothing(tmp_path, monkeypatch, capsys):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("--dry-run must start nothing"))
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    argv = [
        "rollout",
        "--tasks",
        "gsm8k,no_such_task",
        "--model",
        str(tmp_path / "missing-model"),
        "--output-dir",
        str(a_file),
        "--set",
        "agent.template=no-such-template",
        "--dry-run",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "4 of 7 checks failed" in err, err
    assert "rollout.tasks: prompt: gsm8k: no template 'no-such-template'" in err
    for problem in ("no_such_task", "no-such-template", "missing-model", "is a file, not a folder"):
        assert problem in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # nothing was written


@pytest.mark.parametrize(
    "command", ["agent", "rollout", "train", "eval", "serve", "pipeline", "loop", "index"]
)
def test_dry_run_of_the_shipped_configs_passes_without_starting_or_writing(
    command, tmp_path, monkeypatch, capsys
):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("--dry-run must start nothing"))
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)  # the configs name the shipped example task from the repository's root
    task = "examples/word_math/task.yaml"
    out = str(tmp_path / "out")
    argv = {
        "agent": ["--task", task],
        "rollout": ["--tasks", task, "--output-dir", out],
        "train": ["--config", "configs/train.yaml", "--set", f"train.storage_path={out}"],
        "eval": ["--tasks", task, "--output-dir", out],
        "serve": ["--config", "configs/serve.yaml"],
        "pipeline": ["--config", "configs/default.yaml", "--set", f"pipeline.runs_dir={out}"],
        "loop": ["--config", "configs/loop.yaml", "--set", f"loop.runs_dir={out}"],
        "index": [],
    }[command]
    assert main([command, *argv, "--dry-run"]) == 0, capsys.readouterr().err
    assert "checks passed" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
