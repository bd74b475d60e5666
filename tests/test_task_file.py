"""Task files: the user's own task (tests/data/tasks/metric), every kind of bad file, the built-in ones."""

from __future__ import annotations

import logging
import shutil
import time
import tomllib
from pathlib import Path

import pytest

from nat_ray import tasks
from nat_ray.core import prompts
from nat_ray.core.scoring import Score
from nat_ray.errors import ConfigError, DataError
from nat_ray.tasks import (
    BUILTIN_NAMES,
    TASKS,
    get_task,
    load_task_file,
    register_tasks,
    register_tasks_dir,
    registered_task,
)
from nat_ray.tasks.task_file import BUILTIN_DIR, is_task_path, parse_demonstration

FIXTURE = Path(__file__).parent / "data" / "tasks" / "metric"


@pytest.fixture(autouse=True)
def restore_registry():
    """Tests register tasks; leave the registry as it was (the built-in six, in order)."""
    before = dict(TASKS)
    yield
    TASKS.clear()
    TASKS.update(before)


@pytest.fixture
def metric_dir(tmp_path: Path) -> Path:
    """A private copy of the metric task's folder, to break one thing at a time."""
    return Path(shutil.copytree(FIXTURE, tmp_path / "metric"))


def write_task(folder: Path, text: str, name: str = "task.yaml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path) -> str:
    with pytest.raises(ConfigError) as err:
        load_task_file(path)
    message = str(err.value)
    assert message.startswith(f"{path.resolve()}:"), message
    return message


# ----------------------------------------------------------------------------------------------
# The user's task


def test_the_metric_task_loads_with_every_part() -> None:
    task = load_task_file(FIXTURE / "metric.yaml")
    assert (task.name, task.title, task.family) == ("metric", "Metric lengths", "custom")
    assert task.tools == ("calculate", "to_metres")
    assert task.tool_specs == ("calculate", f"{FIXTURE.resolve()}/metric_tools.py:to_metres")
    assert task.scorer == f"{FIXTURE.resolve()}/check.py:same_number"
    assert task.source == str((FIXTURE / "metric.yaml").resolve())
    assert len(task.source_hash) == 16 and int(task.source_hash, 16) >= 0
    assert task.splits == {
        "train": (str(FIXTURE.resolve() / "data/train.jsonl"),),
        "test": (str(FIXTURE.resolve() / "data/test.csv"),),
    }


def test_renamed_fields_jsonl_and_csv() -> None:
    task = load_task_file(FIXTURE / "metric.yaml")
    train = task.load("train")
    assert [q.id for q in train] == ["m1", "m2", "m3", "m4"]
    assert train[0].question == "How many metres are 2 km?" and train[0].gold == "2000"
    assert train[0].meta == {"unit": "km", "raw_gold": "2000"} and train[0].task == "metric"
    test = task.load("test", limit=1)
    assert [(q.id, q.question, q.gold) for q in test] == [("t1", "How many metres are 5 km?", "5000")]


def test_parquet_data(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"question": "q?", "answer": 3, "id": 7}]), tmp_path / "d.parquet")
    path = write_task(
        tmp_path, "name: p\ndata: {test: d.parquet}\nscorer: math\ninstruction: Solve; finish[answer].\n"
    )
    (q,) = load_task_file(path).load("test")
    assert (q.id, q.question, q.gold) == ("7", "q?", "3")


def test_plugin_scorer_bool_and_float() -> None:
    task = load_task_file(FIXTURE / "metric.yaml")
    assert task.score("2000", "2000") == Score(True, True, f1=1.0)
    assert task.score("2000 m", task.load("train")[0]) == Score(True, True, f1=1.0)
    assert task.score("2500", "2000") == Score(False, False, f1=0.5)
    assert task.score(None, "2000") == Score(False, False, f1=0.0)


def _scorer_task(tmp_path: Path, body: str) -> tasks.Task:
    (tmp_path / "d.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    (tmp_path / "s.py").write_text(body)
    path = write_task(tmp_path, "name: s\ndata: {test: d.jsonl}\nscorer: s.py:score\ninstruction: go\n")
    return load_task_file(path)


def test_plugin_scorer_returning_a_bool(tmp_path: Path) -> None:
    task = _scorer_task(tmp_path, "def score(prediction, gold):\n    return prediction == gold\n")
    assert task.score("a", "a") == Score(True, True) and task.score("b", "a") == Score(False, False)


def test_plugin_scorer_that_raises_or_misbehaves_scores_zero_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    body = (
        "def score(prediction, gold):\n"
        "    if prediction == 'boom':\n        raise RuntimeError('bad gold format')\n"
        "    return {'nan': float('nan'), 'big': 2.0, 'text': 'yes'}.get(prediction, True)\n"
    )
    task = _scorer_task(tmp_path, body)
    zero = Score(False, False, f1=0.0)
    with caplog.at_level(logging.WARNING, logger="nat_ray.tasks.task_file"):
        assert [task.score(p, "a") for p in ("boom", "boom", "nan", "big", "text")] == [zero] * 5
        assert task.score("fine", "a") == Score(True, True)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 4, warnings  # "boom" twice: logged once
    assert "raised RuntimeError: bad gold format" in warnings[0]
    assert "returned 'yes'; expected a bool or a float in [0, 1]" in warnings[3]


@pytest.mark.parametrize(
    "scorer, pred, gold, expected",
    [
        ("math", "$1,800", "1800", Score(False, True)),
        ("math", "1800", "1,800.0", Score(False, True)),  # paper mode: the raw gold, as NAT
        ("math", "1800", "#### 1,800", Score(True, True)),
        ("exact_match", "The Seine", "seine", Score(True, True, em=True)),
        ("exact_match", None, "seine", Score(False, False, em=False)),
        ("f1", "river Seine", "Seine", Score(False, False, em=False, f1=2 / 3)),
        ("yes_no", "Yes.", "no", Score(False, False)),
        ("yes_no", "yes", "true", Score(True, True)),
    ],
)
def test_builtin_scorers_for_a_user_task(tmp_path: Path, scorer, pred, gold, expected) -> None:
    (tmp_path / "d.jsonl").write_text(f'{{"question": "q", "answer": "{gold}"}}\n')
    path = write_task(tmp_path, f"name: b\ndata: {{test: d.jsonl}}\nscorer: {scorer}\ninstruction: go\n")
    task = load_task_file(path)
    (question,) = task.load("test")
    assert task.score(pred, question) == expected


# ----------------------------------------------------------------------------------------------
# Prompts


def test_custom_prompt_instruction_demo_and_markers() -> None:
    task = load_task_file(FIXTURE / "metric.yaml")
    zero = task.build_messages("How far? ", klass="incorrect")
    assert zero == [
        {"role": "user", "content": task.instruction},
        {"role": "assistant", "content": prompts.ACK},
        {"role": "user", "content": "Question: How far? . Convert it to metres, but **incorrectly**."},
    ]
    assert task.instruction.startswith("Convert a length to metres") and task.instruction.endswith("task.")
    one = task.build_messages("How far?", shots=1)
    assert [m["role"] for m in one] == ["user", "assistant"] * 4 + ["user"]
    assert one[2]["content"] == "Question: How many metres are 2.5 km?. Convert it to metres **correctly**."
    assert (
        one[3]["content"]
        == "Thought: I convert kilometres to metres with the tool.\nAction: to_metres[2.5 km]"
    )
    assert one[4]["content"] == "Observation: 2500"
    assert one[5]["content"].endswith("Action: finish[2500]")
    assert one[-1]["content"] == "Question: How far?. Convert it to metres **correctly**."


def test_custom_templates(tmp_path: Path) -> None:
    task = load_task_file(FIXTURE / "metric.yaml")
    nut = task.build_messages("q", "zero-shot", "incorrect")
    assert nut[-1]["content"] == "Question: q" and nut[0]["content"] == task.instruction
    inverse = task.build_messages("q", "zero-shot-target-aware-inverse", "correct")
    assert inverse[-1]["content"] == "Question: q. Convert it to metres, but **incorrectly**."
    assert task.build_messages("q", "zero-shot-target-aware-four-class", "mostly_correct")[-1] == {
        "role": "user",
        "content": "[Mostly Correct] Question: q.",
    }
    with pytest.raises(ConfigError, match="no template 'cot-zero-shot' for custom tasks"):
        task.build_messages("q", "cot-zero-shot")
    # Without markers: the paper's QA markers.
    (tmp_path / "d.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    plain = load_task_file(
        write_task(tmp_path, "name: p\ndata: {test: d.jsonl}\nscorer: f1\ninstruction: go\n")
    )
    assert plain.build_messages("q")[-1]["content"] == prompts.DEFAULT_MARKERS.correct.replace(
        "{question}", "q"
    )
    # No demonstration: one shot asked for, none given (the default agent.shots=1 still runs).
    assert plain.build_messages("q", shots=1) == plain.build_messages("q", shots=0)


def test_builtin_task_prompts_are_the_paper_prompts() -> None:
    for task in (TASKS[name] for name in BUILTIN_NAMES):
        for shots in (0, 1):
            assert task.build_messages("Q {x}? ", shots=shots) == prompts.build_messages(
                task.family, "Q {x}? ", shots=shots
            )


def test_parse_demonstration_multiline_thought_and_errors() -> None:
    demo = parse_demonstration(
        "Question: a\n  b\nThought: t1\n more\nAction: calculate[1+1]\nObservation: 2\nAction: finish[2]\n",
        ("calculate",),
    )
    assert demo == prompts.Demo(
        "a\n  b", (("Thought: t1\n more\nAction: calculate[1+1]", "2"), ("Action: finish[2]", None))
    )
    bad = {
        "Thought: x\nAction: finish[1]\n": "start with a 'Question:'",
        "Question: q\nAction: search[x]\nObservation: y\nAction: finish[1]\n": "'search' is not one of the task's tools",
        "Question: q\nAction: calculate[1]\nAction: finish[1]\n": "has no Observation:",
        "Question: q\nAction: calculate[1]\nObservation: 1\n": "last action must be finish",
        "Question: q\nQuestion: r\nAction: finish[1]\n": "line 2: a second Question:",
        "Question: q\nAction: finish[1]\nThought: more\n": "line 2: finish[...] must be the last action",
        "Question: q\nAction: finish 1\n": "line 2: expected 'Action: name[argument]'",
    }
    for text, message in bad.items():
        with pytest.raises(ValueError, match=message.replace("[", r"\[")):
            parse_demonstration(text, ("calculate",))


# ----------------------------------------------------------------------------------------------
# Bad task files: one error naming the file and every problem


def test_every_problem_in_one_error_fast(metric_dir: Path) -> None:
    path = write_task(
        metric_dir,
        "name: Metric Task\n"
        "colour: blue\n"
        "data: {train: data/nope.jsonl, test: data/test.txt}\n"
        "fields: {question: prompt, label: y}\n"
        "scorer: ./missing.py:score\n"
        "tools: [calculate, ./metric_tools.py:nope]\n"
        "demonstrations: demo.txt\n"
        "markers: {correct: same, incorrect: same}\n",
    )
    start = time.perf_counter()
    message = problems_of(path)
    assert time.perf_counter() - start < 1.0
    for expected in (
        "unknown key 'colour'",
        "missing key 'instruction'",
        "name must be lower-case",
        f"data.train: {metric_dir.resolve()}/data/nope.jsonl does not exist",
        "data.test: data/test.txt is not a supported format",
        "fields: unknown field 'label'",
        "missing.py does not exist",
        "tools: ",
        "nope",
        "markers.correct and markers.incorrect must differ",
    ):
        assert expected in message, (expected, message)
    lines = message.splitlines()  # the file, then one problem a line
    assert (
        lines[0] == f"{path.resolve()}:"
        and len(lines) == 11
        and all(line.startswith("  ") for line in lines[1:])
    )


def test_missing_keys_and_builtin_only_keys(tmp_path: Path) -> None:
    message = problems_of(write_task(tmp_path, "title: x\nfamily: math\n"))
    for key in ("name", "data", "scorer", "instruction"):
        assert f"missing key {key!r}" in message
    assert "unknown key 'family' (only built-in task files set it)" in message


def test_scorer_that_cannot_be_imported(metric_dir: Path) -> None:
    (metric_dir / "check.py").write_text("import no_such_module_xyz\n")
    message = problems_of(metric_dir / "metric.yaml")
    assert "cannot import" in message and "no_such_module_xyz" in message


def test_scorer_with_the_wrong_signature_or_missing_function(metric_dir: Path) -> None:
    (metric_dir / "check.py").write_text("def same_number(prediction):\n    return True\n")
    assert "must take (prediction, gold), but its signature is (prediction)" in problems_of(
        metric_dir / "metric.yaml"
    )
    (metric_dir / "check.py").write_text("def other(prediction, gold):\n    return True\n")
    assert "has no attribute 'same_number'" in problems_of(metric_dir / "metric.yaml")
    text = (metric_dir / "metric.yaml").read_text().replace("./check.py:same_number", "nonsense")
    assert "scorer 'nonsense' is not a built-in scorer" in problems_of(write_task(metric_dir, text))


def test_module_scorer(metric_dir: Path) -> None:
    text = (metric_dir / "metric.yaml").read_text().replace("./check.py:same_number", "operator:eq")
    task = load_task_file(write_task(metric_dir, text))
    assert task.scorer == "operator:eq" and task.score("5", "5") == Score(True, True)


def test_tool_plugin_that_cannot_be_imported_or_has_the_wrong_signature(metric_dir: Path) -> None:
    # Each case its own file: a tool file is imported once per process.
    yaml_text = (metric_dir / "metric.yaml").read_text()
    (metric_dir / "two_args.py").write_text("def to_metres(a, b):\n    return a\n")
    text = yaml_text.replace("./metric_tools.py", "./two_args.py")
    assert "must take exactly one argument" in problems_of(write_task(metric_dir, text))
    (metric_dir / "broken_tools.py").write_text("raise ImportError('broken tool file')\n")
    text = yaml_text.replace("./metric_tools.py", "./broken_tools.py")
    assert "broken tool file" in problems_of(write_task(metric_dir, text))
    text = (metric_dir / "metric.yaml").read_text().replace("./metric_tools.py", "./gone.py")
    assert "gone.py" in problems_of(write_task(metric_dir, text))


def test_data_without_the_named_columns(metric_dir: Path) -> None:
    text = (metric_dir / "metric.yaml").read_text().replace("answer: target", "answer: expected")
    message = problems_of(write_task(metric_dir, text))
    assert "data.train:" in message and "missing 'expected', the task's answer field" in message
    assert "data.test:" in message


def test_bad_demonstration_and_markers(metric_dir: Path) -> None:
    (metric_dir / "demo.txt").write_text("Question: q\nAction: fly[x]\nObservation: y\nAction: finish[1]\n")
    text = (metric_dir / "metric.yaml").read_text()
    text = text[: text.index("markers:")] + "markers: {correct: ok}\n"
    message = problems_of(write_task(metric_dir, text))
    assert "demonstrations:" in message and "'fly' is not one of the task's tools" in message
    assert "markers must have exactly the keys correct and incorrect" in message


@pytest.mark.parametrize(
    "text, expected",
    [("name: [unclosed\n", "not valid YAML"), ("- a list\n", "a task file holds a mapping")],
)
def test_not_a_task_file(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in problems_of(write_task(tmp_path, text))


def test_missing_task_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the task file"):
        load_task_file(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="cannot read the task file"):
        get_task(str(tmp_path / "nope.yaml"))


# ----------------------------------------------------------------------------------------------
# Registry


def test_get_task_by_path_registers_it_once() -> None:
    task = get_task(str(FIXTURE / "metric.yaml"))
    assert TASKS["metric"] is task and get_task("metric") is task and get_task("METRIC") is task
    assert get_task(FIXTURE / "metric.yaml") is task  # unchanged file: not read again
    assert tuple(TASKS)[:6] == BUILTIN_NAMES and list(TASKS)[-1] == "metric"


def test_an_edited_task_file_replaces_its_registration(metric_dir: Path) -> None:
    first = get_task(str(metric_dir / "metric.yaml"))
    (metric_dir / "metric.yaml").write_text(
        (metric_dir / "metric.yaml").read_text().replace("Metric lengths", "M")
    )
    second = get_task(str(metric_dir / "metric.yaml"))
    assert second.title == "M" and second.source_hash != first.source_hash and TASKS["metric"] is second


def test_a_name_taken_by_another_file(metric_dir: Path) -> None:
    get_task(str(FIXTURE / "metric.yaml"))
    with pytest.raises(ConfigError, match="the task name 'metric' is already taken by"):
        get_task(str(metric_dir / "metric.yaml"))
    text = (metric_dir / "metric.yaml").read_text().replace("name: metric", "name: gsm8k")
    with pytest.raises(ConfigError, match="'gsm8k' is already taken by .*builtin/gsm8k.yaml"):
        get_task(str(write_task(metric_dir, text, "clash.yaml")))


def test_register_tasks_dir_and_register_tasks(metric_dir: Path, tmp_path: Path) -> None:
    (registered,) = register_tasks_dir(metric_dir)
    assert registered.name == "metric" and registered_task("metric") is registered
    assert register_tasks(["metric", "gsm8k"], str(metric_dir)) == [registered, TASKS["gsm8k"]]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="holds no task files"):
        register_tasks_dir(empty)
    with pytest.raises(ConfigError, match="is not a folder"):
        register_tasks_dir(tmp_path / "nope")


def test_register_tasks_reports_every_bad_file_and_name(tmp_path: Path) -> None:
    folder = tmp_path / "tasks"
    folder.mkdir()
    write_task(folder, "name: a\n", "a.yaml")
    write_task(folder, "name: b\nextra: 1\n", "b.yaml")
    with pytest.raises(ConfigError) as err:
        register_tasks(["chess", "gsm8k"], str(folder))
    message = str(err.value)
    assert "a.yaml:\n    missing key 'data'" in message and "b.yaml:\n    unknown key 'extra'" in message
    assert "unknown task 'chess'" in message


def test_registered_task_never_reads_a_file() -> None:
    path = str(FIXTURE / "metric.yaml")
    with pytest.raises(ConfigError, match="unknown task"):
        registered_task(path)
    assert "metric" not in TASKS
    assert registered_task("GSM8K") is TASKS["gsm8k"]


def test_is_task_path(tmp_path: Path) -> None:
    assert is_task_path("my/task.yaml") and is_task_path("T.YML") and not is_task_path("gsm8k")
    (tmp_path / "plain").write_text("x")
    assert is_task_path(str(tmp_path / "plain"))


# ----------------------------------------------------------------------------------------------
# The built-in task files


def test_builtin_tasks_are_task_files_in_the_papers_order() -> None:
    # Other tests of the session may have registered their own tasks after these.
    assert tuple(TASKS)[: len(BUILTIN_NAMES)] == BUILTIN_NAMES
    assert sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml")) == sorted(BUILTIN_NAMES)
    for name in BUILTIN_NAMES:
        task = TASKS[name]
        assert task.source == str(BUILTIN_DIR / f"{name}.yaml")
        assert task.source_hash == load_task_file(BUILTIN_DIR / f"{name}.yaml").source_hash
        assert task.scorer == {"math": "math", "hotpotqa": "f1", "strategyqa": "yes_no"}[task.family]
        assert task.instruction is None and task.demo is None and task.markers is None


def test_builtin_task_files_are_package_data() -> None:
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "tasks/builtin/*.yaml" in pyproject["tool"]["setuptools"]["package-data"]["nat_ray"]


def test_loading_a_task_file_is_fast() -> None:
    start = time.perf_counter()
    load_task_file(FIXTURE / "metric.yaml")
    for name in BUILTIN_NAMES:
        load_task_file(BUILTIN_DIR / f"{name}.yaml")
    assert time.perf_counter() - start < 1.0


def test_a_user_split_whose_file_vanished(metric_dir: Path) -> None:
    task = load_task_file(metric_dir / "metric.yaml")
    (metric_dir / "data" / "test.csv").unlink()
    with pytest.raises(DataError, match="split 'test'.*test.csv does not exist"):
        task.load("test")


def test_config_tasks_dir() -> None:
    from nat_ray.config import NatRayConfig, from_dict

    assert NatRayConfig().tasks_dir is None
    assert from_dict(NatRayConfig, {"tasks_dir": str(FIXTURE)}).tasks_dir == str(FIXTURE)
    with pytest.raises(ConfigError, match="tasks_dir must be a folder"):
        from_dict(NatRayConfig, {"tasks_dir": " "})
