"""A user's own task end to end: examples/unit_convert (its data, tool, scorer and task file) through
``nat-ray agent``, rollout, training and evaluation, on the embedded model; and examples/mcp_units,
the same task with its tools on an MCP server, through a rollout's tool actors. The served
``/v1/agent`` answers both in ``test_serve.py``'s application (one Serve start-up less).

The tiny model rarely converts units right, so positives come the way the paper gets them: from a
teacher over the OpenAI-compatible HTTP engine. The teacher here is a scripted local server that
calls the example's own ``convert`` tool and finishes with its observation; everything else is the
real stack (Ray Data rollout with Ray tool actors running the plug-in, Ray Train + DeepSpeed, vLLM).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import (  # tests/helpers.py
    EXAMPLES_DIR,
    MCP_UNITS_TASK,
    UNIT_CONVERT_TASK,
    HttpRequest,
    serve_http,
)

from nat_ray.config import NatRayConfig, from_dict
from nat_ray.core import nat_data as columns
from nat_ray.core import records
from nat_ray.paths import PARTS_DIR

pytestmark = pytest.mark.integration

EXAMPLE = EXAMPLES_DIR / "unit_convert"
TASK_FILE = UNIT_CONVERT_TASK
MCP_TASK_FILE = MCP_UNITS_TASK
# max_lora_rank: the tuned adapter's rank (on CPU every LoRA token costs in proportion to it).
ENGINE = {"max_model_len": 2048, "kv_cache_gb": 1, "max_num_seqs": 16, "max_lora_rank": 8}
AGENT = {"max_turns": 3, "max_new_tokens": 48}
UNITS = {
    "millimeters": "mm",
    "centimeters": "cm",
    "meters": "m",
    "kilometers": "km",
    "inches": "in",
    "feet": "ft",
    "miles": "mi",
    "grams": "g",
    "kilograms": "kg",
    "pounds": "lb",
    "ounces": "oz",
    "seconds": "s",
    "minutes": "min",
    "hours": "h",
    "milliliters": "ml",
    "liters": "l",
}
_WORD = "|".join(UNITS)
_QUESTION_FORMS = (
    re.compile(rf"How many ({_WORD}) are in ([\d.]+) ({_WORD})\?"),
    re.compile(rf"Convert ([\d.]+) ({_WORD}) to ({_WORD})\."),
    re.compile(rf"is ([\d.]+) ({_WORD}) long\. How long is it in ({_WORD})\?"),
    re.compile(rf"What is ([\d.]+) ({_WORD}) in ({_WORD})\?"),
)


def _convert_request(question: str) -> str:
    """``"3.5 km to m"`` from one of the example's question forms."""
    for form in _QUESTION_FORMS:
        match = form.search(question)
        if match is not None:
            if form is _QUESTION_FORMS[0]:
                target, value, source = match.groups()
            else:
                value, source, target = match.groups()
            return f"{value} {UNITS[source]} to {UNITS[target]}"
    raise AssertionError(f"the teacher cannot read {question!r}")


def _teacher(request: HttpRequest) -> tuple[int, object, dict]:
    """A ReAct teacher for the example: convert[...] on the question, then finish with the observation."""
    if request.method == "GET":
        return 200, {"object": "list", "data": [{"id": "teacher", "object": "model"}]}, {}
    body = request.json()
    last = body["messages"][-1]["content"]
    if last.startswith("Observation:"):
        text = (
            f"Thought: The converter answered.\nAction: finish[{last.removeprefix('Observation:').strip()}]"
        )
    else:
        question = last.split("Question:", 1)[1]
        # The MCP example's tool is convert_units; its instruction names it.
        mcp = any("convert_units[" in m["content"] for m in body["messages"])
        action = "convert_units" if mcp else "convert"
        text = f"Thought: I convert the units.\nAction: {action}[{_convert_request(question)}]"
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    usage = {"prompt_tokens": 10, "completion_tokens": 10}
    return (
        200,
        {"id": "c", "object": "chat.completion", "model": body["model"], "choices": [choice], "usage": usage},
        {},
    )


def _config(tmp: Path, **sections) -> NatRayConfig:
    return from_dict(
        NatRayConfig,
        {
            "engine": {**ENGINE, **sections.pop("engine", {})},
            "agent": AGENT,
            "rollout": {
                "tasks": [TASK_FILE],
                "split": "train",
                "limit": 8,
                "temperatures": [0.0],
                "output_dir": str(tmp / "rollout"),
                **sections.pop("rollout", {}),
            },
            **sections,
        },
    )


def test_the_agent_command_answers_with_the_tasks_prompt_tool_and_scorer(capsys):
    from nat_ray.cli import main

    argv = ["agent", "--task", TASK_FILE, "--max-turns", "2", "--gold", "3500", "--json", "-"]
    argv += ["--set", "engine.max_model_len=2048", "--set", "engine.kv_cache_gb=1"]
    assert main([*argv, "How many meters are in 3.5 kilometers?"]) == 0
    episode = json.loads(capsys.readouterr().out)
    instruction = episode["conversation"][0]["content"]
    assert (
        instruction.startswith("Convert units with interleaving Thought")
        and "convert[VALUE UNIT" in instruction
    )
    assert (
        "How many grams are in 2.5 kilograms?" in episode["conversation"][2]["content"]
    )  # the demonstration
    assert episode["score"] is not None and episode["turns"] >= 1
    from examples_check import same_number  # the example's check.py (see _example_on_path)

    assert episode["score"]["correct_robust"] == same_number(episode["answer"], "3500")


@pytest.fixture(scope="module", autouse=True)
def _example_on_path():
    """The example's scorer as a module, to check the stored verdicts against it."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("examples_check", EXAMPLE / "check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["examples_check"] = module
    yield
    sys.modules.pop("examples_check", None)


@pytest.fixture(scope="module")
def rollouts(local_ray, tmp_path_factory):
    """The teacher's trajectories (the positives) and the embedded model's (mostly negatives)."""
    from nat_ray.rollout.run import run_rollout

    tmp = tmp_path_factory.mktemp("own-task")
    with serve_http(_teacher) as url:
        teacher = _config(
            tmp,
            engine={"backend": "openai", "base_url": f"{url}/v1", "model": "teacher"},
            rollout={"output_dir": str(tmp / "teacher")},
        )
        run_rollout(teacher, progress=False)
    run_rollout(_config(tmp), progress=False)
    return tmp


def test_rollout_runs_the_plugin_tool_in_tool_actors_and_records_lineage(rollouts):
    from examples_check import same_number

    from nat_ray.tasks import get_task

    task = get_task(TASK_FILE)
    teacher = records.read_rows(rollouts / "teacher" / PARTS_DIR)
    model = records.read_rows(rollouts / "rollout" / PARTS_DIR)
    assert len(teacher) == 8 and len(model) == 8
    for row in teacher + model:
        assert row[columns.TASK] == "unit_convert"
        assert row[columns.TASK_SOURCE] == task.source and row[columns.TASK_HASH] == task.source_hash
        assert set(json.loads(row[columns.TOOL_VERSIONS])) == {"convert", "calculate"}
        assert row[columns.CORRECT_ROBUST] == same_number(row[columns.ANSWER], row[columns.GOLD])
    # The teacher's convert[...] calls ran in the example's own tool, in a Ray tool actor.
    assert all(row[columns.CORRECT_ROBUST] for row in teacher), [r[columns.TRAJECTORY] for r in teacher]
    observations = [t["content"] for r in teacher for t in r[columns.TRAJECTORY] if t["role"] == "user"]
    assert any(re.fullmatch(r"Observation: [\d.e+]+", o) for o in observations), observations


def test_an_mcp_tools_task_rolls_out_with_its_server_in_the_tool_actors(local_ray, tmp_path):
    """The teacher's convert_units[...] calls reach the example MCP server, started by each tool actor."""
    from examples_check import same_number

    from nat_ray.rollout.run import run_rollout

    with serve_http(_teacher) as url:
        cfg = _config(
            tmp_path,
            engine={"backend": "openai", "base_url": f"{url}/v1", "model": "teacher"},
            rollout={"tasks": [MCP_TASK_FILE], "limit": 4},
        )
        result = run_rollout(cfg, progress=False)
    rows = records.read_rows(tmp_path / "rollout" / PARTS_DIR)
    assert result.total == len(rows) == 4
    for row in rows:
        assert row[columns.TASK] == "mcp_units" and row[columns.CORRECT_ROBUST], row[columns.TRAJECTORY]
        assert same_number(row[columns.ANSWER], row[columns.GOLD])
        versions = json.loads(row[columns.TOOL_VERSIONS])
        assert versions["convert_units"].startswith("mcp:units:") and "scale" in versions
        (call, observation) = [t["content"] for t in row[columns.TRAJECTORY][-3:-1]]
        assert "Action: convert_units[" in call and re.fullmatch(r"Observation: [\d.e+]+", observation)


@pytest.fixture(scope="module")
def trained(rollouts):
    """NAT on the teacher's positives and the model's negatives: a LoRA adapter, two steps."""
    from nat_ray.train.run import run_train

    data = [str(rollouts / "teacher" / PARTS_DIR), str(rollouts / "rollout" / PARTS_DIR)]
    cfg = from_dict(
        NatRayConfig,
        {
            "train": {
                "data": data,
                "variant": "nat",
                "mode": "lora",
                "zero_stage": 2,
                "lora_rank": 8,
                "lora_target_modules": ["q_proj", "v_proj"],
                "max_length": 1024,
                "global_batch_size": 2,
                "micro_batch_size": 1,
                "num_workers": 1,
                "use_gpu": False,
                "max_steps": 2,
                "storage_path": str(rollouts / "train"),
                "run_name": "unit_convert",
            }
        },
    )
    return run_train(cfg)


def test_training_uses_the_tasks_own_prompt_for_both_classes(trained):
    assert trained.step == 2 and trained.final_loss is not None
    assert trained.data["positives"] > 0 and trained.data["negatives"] > 0
    assert Path(trained.export["adapter"], "adapter_config.json").is_file()


def test_eval_scores_the_tuned_adapter_with_the_tasks_scorer(trained, rollouts):
    from examples_check import same_number

    from nat_ray.evaluation.run import run_eval

    cfg = _config(
        rollouts,
        engine={"model": trained.export["model"]},
        eval={"tasks": [TASK_FILE], "limit": 4, "seeds": [0], "output_dir": str(rollouts / "eval")},
    )
    summary = run_eval(cfg)
    assert summary.tasks["unit_convert"]["questions"] == 4
    rows = records.read_rows(rollouts / "eval" / PARTS_DIR)
    assert len(rows) == 4
    assert all(r[columns.CORRECT_ROBUST] == same_number(r[columns.ANSWER], r[columns.GOLD]) for r in rows)
    assert "Unit conversion" in (rollouts / "eval" / "results.md").read_text()
