"""The one command line, ``nat-ray <subcommand>``: a table of subcommands, each calling one ``run_*``.

A row of :data:`COMMANDS` names a subcommand, its help, its flags and the plain function it runs
(``"module:function"``, imported only when that subcommand runs, so ``--help`` starts fast and no
stage module imports this one). A flag with a ``field`` is a shortcut for that config field
(``--task`` is ``agent.task``) and ``--set section.key=value`` reaches every other one, so a
setting has one name from YAML to the worker. Flags without a field are the function's own
arguments (the question of ``agent``, the files of ``import-nat``). The ``jobs/`` entry points and
the ``nat-ray`` script call :func:`main`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nat_ray import __version__
from nat_ray.config import OBJECTIVES, NatRayConfig, load_config, read_yaml, to_dict
from nat_ray.core.agent_card import model_card, overridden
from nat_ray.errors import NatRayError

log = logging.getLogger("nat_ray")


def _comma_list(text: str) -> list[str]:
    return [part for part in text.split(",") if part]


def _comma_ints(text: str) -> list[int]:
    try:
        return [int(part) for part in _comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected whole numbers separated by commas, e.g. 0,1,2; got {text!r}"
        ) from None


@dataclass(frozen=True)
class Flag:
    """One command-line flag (or positional argument).

    Attributes:
        name: ``--max-turns`` (a flag) or ``question`` (a positional argument).
        help: one line for ``--help``.
        field: the config field the flag sets (``agent.max_turns``); None: an argument of the
            command's function, passed by its ``dest``.
        dest: the function's keyword for a flag without a field (default: derived from the name).
        options: further ``add_argument`` keywords (``type``, ``choices``, ``action``, ``nargs``...).
        aliases: other names of the flag (an older name kept working).
    """

    name: str
    help: str
    field: str | None = None
    dest: str | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return self.dest or self.name.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Command:
    """One subcommand: its texts, its flags and the function that runs it.

    Attributes:
        run: ``"module:function"``. With ``config`` the function is called as
            ``function(cfg, **own_arguments)`` with the loaded :class:`~nat_ray.config.NatRayConfig`;
            without, as ``function(**own_arguments)``. It returns the exit code.
        config: whether the command reads a config (``--config`` and ``--set`` are added).
    """

    name: str
    help: str
    description: str
    run: str
    flags: tuple[Flag, ...] = ()
    epilog: str = ""
    config: bool = True


MODEL = Flag("--model", "HF checkpoint path or hub id (default: the embedded SmolLM2-135M)", "engine.model")
# One meaning on every command with a result: write it as JSON to PATH ('-': standard output, and
# the command's tables go to standard error).
JSON = Flag(
    "--json",
    "also write the result as JSON to PATH ('-': print only the JSON)",
    dest="json_path",
    options={"metavar": "PATH"},
)

COMMANDS: tuple[Command, ...] = (
    Command(
        "agent",
        help="answer one question with the ReAct agent and print the trajectory",
        description="Run the agent on one question (vLLM engine, the task's tools) and print every turn.",
        run="nat_ray.agent:run_agent",
        flags=(
            Flag("question", "the question text", options={"nargs": "?"}),
            Flag("--task", "task whose tools, prompt and scorer to use (default gsm8k)", "agent.task"),
            MODEL,
            Flag(
                "--template",
                "NAT prompt template (default zero-shot-target-aware, or the model's agent card)",
                "agent.template",
            ),
            Flag(
                "--shots",
                "1 = add a demonstration (default), 0 = paper format (a trained model's agent card: 0)",
                "agent.shots",
                options={"type": int, "choices": (0, 1)},
            ),
            Flag(
                "--temperature",
                "sampling temperature (default 0 = greedy)",
                "agent.temperature",
                options={"type": float},
            ),
            Flag(
                "--max-turns",
                "model calls before giving up (default 7)",
                "agent.max_turns",
                options={"type": int},
            ),
            Flag("--seed", "sampling seed", "agent.seed", options={"type": int}),
            Flag("--gold", "the right answer: prints whether the agent got it (paper and robust rules)"),
            JSON,
        ),
        epilog="examples:\n"
        '  nat-ray agent --task gsm8k "A farmer has 3 pens with 12 hens each. How many hens?"\n'
        '  nat-ray agent --task hotpotqa --set agent.temperature=0.2 "Which magazine was started first?"',
    ),
    Command(
        "rollout",
        help="collect and score trajectories with Ray Data (stage 1)",
        description="Run the agent over many questions on Ray Data engine actors, score every trajectory "
        "(paper and robust rules) and write Parquet to <rollout.output_dir>/trajectories. Re-running the "
        "same config resumes: finished trajectories are kept and none is generated twice. Set RAY_ADDRESS "
        "to use a running cluster; otherwise a local Ray starts.",
        run="nat_ray.rollout.run:main_rollout",
        flags=(
            Flag(
                "--tasks",
                "comma-separated tasks (default gsm8k,strategyqa)",
                "rollout.tasks",
                options={"type": _comma_list},
            ),
            Flag("--split", "dataset split (default train)", "rollout.split"),
            Flag("--limit", "questions per task (default 20)", "rollout.limit", options={"type": int}),
            Flag("--output-dir", "where trajectories go (default runs/rollout)", "rollout.output_dir"),
            MODEL,
            JSON,
        ),
        epilog="example:\n  nat-ray rollout --config configs/rollout.yaml --set rollout.limit=50",
    ),
    Command(
        "train",
        help="fine-tune on NAT data with Ray Train + DeepSpeed (stage 2)",
        description="Build NAT training data from trajectory Parquet (train.variant, seeded selection), "
        "tokenize it with loss on the agent's turns only, optionally pack it, and fine-tune "
        "train.base_model (full or LoRA) with Ray Train workers running DeepSpeed ZeRO. Checkpoints every "
        "train.checkpoint_every steps; starting the same train.run_name again resumes it. The model is "
        "exported to <storage_path>/<run_name>/export/ (model/ and, for LoRA, adapter/). Set RAY_ADDRESS "
        "to use a running cluster; otherwise a local Ray starts. --objective kto or dpo learns from the "
        "same positives and negatives with a preference loss instead of NAT's markers (README: Objectives).",
        run="nat_ray.train.run:main_train",
        flags=(
            Flag(
                "--objective",
                "sft (NAT's supervised loss, default), kto (unpaired) or dpo (pairs of one question)",
                "train.objective",
                options={"choices": list(OBJECTIVES)},
            ),
            JSON,
        ),
        epilog="examples:\n"
        "  nat-ray import-nat && nat-ray train --config configs/train.yaml\n"
        "  nat-ray train --config configs/train_lora.yaml --objective kto --set train.global_batch_size=4 "
        "--set train.run_name=kto_lora\n"
        "  nat-ray train --config configs/train_lora.yaml --set train.lora_rank=32\n"
        "  nat-ray train --config configs/train.yaml --set train.variant=nut --set train.run_name=nut",
    ),
    Command(
        "serve",
        help="serve the agent on Ray Serve: OpenAI routes, /v1/agent, tool deployments (stage 3)",
        description="Serve a model (the embedded one, a full fine-tune, or a base model plus a LoRA "
        "adapter) on vLLM through ray.serve.llm, with autoscaling calculator and search deployments and "
        "an agent route that batches concurrent requests in one ReAct loop. Routes: GET /v1/models, "
        "POST /v1/chat/completions (OpenAI-compatible, streaming), POST /v1/agent, GET /healthz. Set "
        "RAY_ADDRESS to deploy on a running cluster; otherwise a local Ray starts.",
        run="nat_ray.serve.app:run_serve",
        flags=(
            MODEL,
            Flag("--lora", "peft adapter directory to serve on top of --model", "serve.lora"),
            Flag(
                "--lora-dir",
                "folder of adapters served on demand as <model_id>:<folder>, new ones included",
                "serve.lora_dir",
            ),
            Flag("--host", "address to bind (default 127.0.0.1)", "serve.host"),
            Flag("--port", "HTTP port (default 8000)", "serve.port", options={"type": int}),
        ),
        epilog="examples:\n"
        "  nat-ray serve --config configs/serve.yaml\n"
        "  nat-ray serve --model runs/train/nat/export/model --port 8000\n"
        "  nat-ray serve --lora runs/train/nat/export/adapter\n"
        "  nat-ray serve --lora-dir runs/loop/adapters   # then model=<model_id>:round-1, no restart\n"
        '  curl -s localhost:8000/v1/agent -d \'{"task": "gsm8k", "question": "2 pens of 12 hens?"}\'\n'
        "  serve run nat_ray.serve:build_app_from_args config=configs/serve.yaml",
    ),
    Command(
        "eval",
        help="evaluate the agent the paper's way (in-process vLLM or a running server)",
        description="Run the paper's evaluation (inference prompt, T=0.2 / top-p 0.9, or --greedy) over "
        "tasks and seeds, in-process on vLLM (one batched ReAct loop) or against a running `nat-ray serve` "
        "(--endpoint, concurrent /v1/agent requests). Writes trajectory Parquet, summary.json and "
        "results.md (the paper's table layout, paper and robust scoring, mean ± std over seeds).",
        run="nat_ray.evaluation.run:main_eval",
        flags=(
            MODEL,
            Flag("--lora", "peft adapter directory to evaluate on top of --model", "serve.lora"),
            Flag(
                "--tasks",
                "comma-separated tasks, e.g. gsm8k,svamp,hotpotqa",
                "eval.tasks",
                options={"type": _comma_list},
            ),
            Flag("--seeds", "comma-separated seeds, e.g. 0,1,2", "eval.seeds", options={"type": _comma_ints}),
            Flag("--limit", "questions per task (default 20)", "eval.limit", options={"type": int}),
            Flag("--split", "dataset split (default test)", "eval.split"),
            Flag(
                "--endpoint",
                "evaluate a running server (http://host:port) instead of in-process",
                "eval.endpoint",
            ),
            Flag(
                "--greedy",
                "greedy decoding instead of T=0.2/top-p 0.9",
                "eval.greedy",
                options={"action": "store_true", "default": None},
            ),
            Flag("--output-dir", "where results go (default runs/eval)", "eval.output_dir"),
            JSON,
        ),
        epilog="examples:\n"
        "  nat-ray eval --config configs/eval.yaml\n"
        "  nat-ray eval --model runs/train/nat/export/model --tasks gsm8k,svamp --seeds 0,1,2 --limit 50\n"
        "  nat-ray eval --endpoint http://127.0.0.1:8000 --tasks gsm8k,hotpotqa --greedy",
    ),
    Command(
        "import-nat",
        help="convert the NAT repo's GPT-3.5 StrategyQA trajectories to a trajectory Parquet file",
        description="Convert the NAT repository's GPT-3.5 StrategyQA trajectory files "
        "(strategyqa_gpt-3.5_positive.json / _negative.json, or .json.gz) into one trajectory Parquet "
        "file, so training can use them without running a teacher. Question texts are looked up by id "
        "in NAT's strategyqa/train.jsonl. Every trajectory is re-scored with the paper and the robust "
        "rule; disagreements with the files' info.reward are reported. Malformed records are skipped "
        "with a warning naming the file and the index.",
        run="nat_ray.import_nat:run_import",
        config=False,
        flags=(
            Flag(
                "paths",
                "trajectory files (read in the order given), or folders holding them (a NAT checkout "
                "works: positive file first, then negative); default: nat/data/dataset/strategyqa/ in "
                "the data dirs",
                options={"nargs": "*", "metavar": "PATH"},
            ),
            Flag(
                "--output-dir",
                "output folder for nat_strategyqa.parquet, or a .parquet file "
                "(default: runs/imported/nat_strategyqa.parquet)",
                dest="out",
                options={"metavar": "PATH"},
                aliases=("--out",),
            ),
            Flag(
                "--questions",
                "questions file to look ids up in (JSON Lines with id/question/answer); default: "
                "train.jsonl beside the trajectory files when PATH is given, else NAT's "
                "strategyqa/train.jsonl in the data dirs",
                options={"metavar": "FILE"},
            ),
        ),
        epilog="examples:\n"
        "  nat-ray import-nat                      # the files under shared/data/nat/... (or $NAT_RAY_DATA_DIR)\n"
        "  nat-ray import-nat ~/src/NAT            # a NAT checkout (its data/dataset/strategyqa)\n"
        "  nat-ray import-nat pos.json.gz neg.json.gz --questions train.jsonl --output-dir runs/teacher/",
    ),
    Command(
        "pipeline",
        help="the whole NAT experiment: rollout, train each variant, evaluate, one results table",
        description="rollout -> NAT data -> train the w/o-Neg, NUT and NAT variants -> evaluate the base "
        "model and each tuned one -> runs/<name>/results.md. pipeline.variants may name an objective beside "
        "a recipe (nat+kto, nat+dpo). Every stage is recorded in "
        "runs/<name>/manifest.json; running the same name again resumes and skips finished stages.",
        run="nat_ray.experiment.pipeline:main_pipeline",
        flags=(Flag("--name", "run name (default: pipeline.name = default)", "pipeline.name"), JSON),
        epilog="example:\n  nat-ray pipeline --config configs/default.yaml --name first-try",
    ),
    Command(
        "loop",
        help="the closed NAT loop: rounds of rollout, LoRA training on the failures, evaluation",
        description="Round 0 collects with the base model (or loop.round0's teacher trajectories); each "
        "later round collects with the agent the round before made. Every round builds NAT data from its "
        "trajectories (plus earlier rounds' with loop.carry_rounds), trains a LoRA adapter, evaluates it on "
        "the test split and publishes it to runs/<name>/adapters/round-<r>/ (and loop.publish_dir). Stops "
        "after loop.rounds rounds or when accuracy has not improved for loop.patience rounds; writes "
        "runs/<name>/results.md, results.json and accuracy_by_round.png, and logs every stage to MLflow "
        "(runs/<name>/mlruns) and TensorBoard (runs/<name>/tensorboard). Running the same name again "
        "resumes by round and stage.",
        run="nat_ray.experiment.loop:main_loop",
        flags=(
            Flag("--name", "run name (default: loop.name = loop)", "loop.name"),
            Flag("--rounds", "most rounds, round 0 included", "loop.rounds", options={"type": int}),
            JSON,
        ),
        epilog="examples:\n"
        "  nat-ray loop --config configs/loop.yaml --name first-loop\n"
        "  nat-ray loop --config configs/loop.yaml --name first-loop --rounds 4 --set loop.patience=2\n"
        "  pipx run mlflow ui --backend-store-uri runs/first-loop/mlruns   # mlflow's UI is not in .venv",
    ),
    Command(
        "index",
        help="build the local search index with Ray Data on every CPU (or GPU) of the cluster",
        description="Embed the search corpus (tools.search_corpus, default: the HotpotQA corpus) with "
        "an actor pool over every CPU (or GPU) of the cluster and write float16 shards, keyed by the "
        "corpus's sha256 and the model, under <cache>/search/; corpora of tools.ann_min_paragraphs or "
        "more also get a FAISS index. Logs progress and an ETA. An existing sound index is kept; a "
        "damaged file is set aside and rebuilt. Rollouts run the same build by themselves when no "
        "index exists. Set RAY_ADDRESS to use a running cluster; otherwise a local Ray starts.",
        run="nat_ray.tools.search.index_build:main_index",
        flags=(
            Flag("--corpus", "corpus .jsonl[.gz] of {id, title, text} paragraphs", "tools.search_corpus"),
            Flag("--search-model", "sentence-transformers model folder", "tools.search_model"),
            Flag(
                "--rebuild",
                "set the existing index aside and build it again",
                options={"action": "store_true"},
            ),
        ),
        epilog="examples:\n"
        "  nat-ray index\n"
        "  nat-ray index --corpus my_corpus.jsonl.gz --set tools.index_actors=8\n"
        '  ray job submit --working-dir . -- "$PWD/.venv/bin/python" jobs/index.py',
    ),
    Command(
        "tasks",
        help="list the tasks: splits, question counts, where each split's data was found",
        description="List every task this machine can run: the six built-in ones, and the task files or "
        "--tasks-dir given. For each split: its question count and the files read (the full data under "
        "$NAT_RAY_DATA_DIR or shared/data, else the samples shipped with nat_ray), or why it has no data "
        "here. Starts no Ray and no engine.",
        run="nat_ray.tasks.listing:print_tasks",
        config=False,
        flags=(
            Flag("refs", "task files (.yaml) to list too", options={"nargs": "*", "metavar": "TASK_FILE"}),
            Flag("--tasks-dir", "a folder of task files to list too", options={"metavar": "DIR"}),
            JSON,
        ),
        epilog="examples:\n  nat-ray tasks\n  nat-ray tasks examples/word_math/task.yaml --json tasks.json",
    ),
    Command(
        "view",
        help="a local web page over a run folder: its table, trajectories turn by turn, rounds side by side",
        description="Serve a read-only web page over a run folder (a pipeline, a loop, a rollout, an "
        "evaluation, or a folder of trajectory Parquet files): the run's results table and plots; its "
        "trajectories filtered by source (round, variant), task, outcome, failure reason, turns and text, "
        "paged on the server; one trajectory turn by turn with its score, timings and lineage; one "
        "question across sources side by side; and the tokens each training run's examples put their "
        "loss on. Binds 127.0.0.1; any other --host needs $NAT_RAY_API_KEY, which the page asks for once.",
        run="nat_ray.view.app:run_view",
        config=False,
        flags=(
            Flag("run_dir", "the run folder, e.g. runs/loop", options={"metavar": "RUN_DIR"}),
            Flag(
                "--host",
                "address to bind (default 127.0.0.1: this machine only)",
                options={"default": "127.0.0.1"},
            ),
            Flag("--port", "port (default 8600)", options={"type": int, "default": 8600}),
        ),
        epilog="examples:\n  nat-ray view runs/loop\n"
        "  NAT_RAY_API_KEY=... nat-ray view runs/default --host 0.0.0.0 --port 8600",
    ),
    Command(
        "models",
        help="list cached models",
        description="List converted models in the cache.",
        run="nat_ray.models:print_models",
        config=False,
        flags=(
            Flag(
                "--convert",
                "convert the embedded model now if it is not cached",
                options={"action": "store_true"},
            ),
        ),
    ),
)

_EPILOG = """examples:
  nat-ray agent --task gsm8k "A farmer has 3 pens with 12 hens each. How many hens?"
  nat-ray agent --task hotpotqa --set agent.temperature=0.2 "Which magazine was started first?"
  nat-ray rollout --config configs/rollout.yaml
  nat-ray import-nat
  nat-ray train --config configs/train.yaml
  nat-ray serve --model runs/train/nat/export/model
  nat-ray eval --model runs/train/nat/export/model --tasks gsm8k,svamp --seeds 0,1,2
  nat-ray pipeline --config configs/default.yaml
  nat-ray view runs/default
  nat-ray loop --config configs/loop.yaml --name first-loop
  nat-ray index
  nat-ray tasks
  nat-ray models
"""


def _add_command(subparsers: argparse._SubParsersAction, command: Command) -> None:
    parser = subparsers.add_parser(
        command.name,
        help=command.help,
        description=textwrap.fill(command.description, width=100),
        epilog=command.epilog or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for flag in command.flags:
        options = dict(flag.options)
        if flag.name.startswith("-"):
            options["dest"] = flag.key
        if flag.field is not None:
            options.setdefault("default", None)  # only the flags given override the config file
        parser.add_argument(flag.name, *flag.aliases, help=flag.help, **options)
    if command.config:
        parser.add_argument("--config", metavar="YAML", help="config file (values override the defaults)")
        parser.add_argument(
            "--print-config",
            action="store_true",
            help="print the resolved config (defaults, file, agent card, flags, --set) as YAML and exit",
        )
        if command.name in DRY_RUN_COMMANDS:
            parser.add_argument(
                "--dry-run",
                action="store_true",
                help="run every check made before Ray starts (config, tasks, prompt, data, model, tool "
                "plug-ins, output folder), report all problems at once, and exit: 0 = all passed",
            )
        parser.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override one field, e.g. --set agent.temperature=0.7 (repeatable; value parsed as YAML)",
        )
    _add_verbosity(parser)
    parser.set_defaults(command=command)


def build_parser() -> argparse.ArgumentParser:
    """The ``nat-ray`` parser: one subparser per row of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="nat-ray",
        description="Negative-aware training (NAT) of tool-using LLM agents, on Ray.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"nat-ray {__version__}")
    _add_verbosity(parser)
    parser.set_defaults(verbose=False, quiet=False)
    subparsers = parser.add_subparsers(dest="command_name", required=True, metavar="COMMAND")
    for command in COMMANDS:
        _add_command(subparsers, command)
    return parser


def _add_verbosity(parser: argparse.ArgumentParser) -> None:
    """``-v`` / ``-q``, accepted before the subcommand and after it (no copy has a default, so a
    subcommand's never undoes the one given before it; :func:`build_parser` sets the defaults)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="debug logging, including Ray's and vLLM's",
    )
    group.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="warnings and errors only"
    )


def config_overrides(command: Command, args: argparse.Namespace) -> list[str]:
    """The flags given for config fields as ``--set`` items, then the ``--set`` items themselves.

    Both win over the config file; an explicit ``--set`` wins over a flag for the same field.
    """
    items = []
    for flag in command.flags:
        value = getattr(args, flag.key)
        if flag.field is not None and value is not None:
            items.append(f"{flag.field}={json.dumps(value)}")
    return items + list(args.overrides)


def run_command(command: Command, args: argparse.Namespace) -> int:
    """Import the command's function and call it with the config and its own arguments."""
    module_name, function_name = command.run.split(":")
    own = {flag.key: getattr(args, flag.key) for flag in command.flags if flag.field is None}
    if not command.config:
        return getattr(importlib.import_module(module_name), function_name)(**own)

    overrides = config_overrides(command, args)
    if command.name in LORA_COMMANDS:
        overrides = [*lora_by_default(args.config, overrides), *overrides]
    cfg = load_config(NatRayConfig, args.config, overrides)
    if command.name in CARD_COMMANDS:
        cfg = with_agent_card(cfg, args.config, overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    if getattr(args, "dry_run", False):
        from nat_ray.experiment.preflight import dry_run

        print(dry_run(command.name, cfg))
        return 0
    function: Callable[..., int] = getattr(importlib.import_module(module_name), function_name)
    return function(cfg, **own)


# Commands with --dry-run (nat_ray.experiment.preflight has their checks).
DRY_RUN_COMMANDS = ("agent", "rollout", "train", "eval", "serve", "pipeline", "loop", "index")

# Commands that train LoRA adapters whatever train.mode defaults to (the loop publishes adapters).
LORA_COMMANDS = ("loop",)


def lora_by_default(config_path: str | None, overrides: list[str]) -> list[str]:
    """``["train.mode=lora"]`` unless the config file or a ``--set`` names ``train.mode``."""
    named = any(o.split("=", 1)[0].strip() == "train.mode" for o in overrides)
    if not named and config_path is not None:
        named = "mode" in (read_yaml(config_path).get("train") or {})
    return [] if named else ["train.mode=lora"]


# Commands that ask a model and so read its agent card (nat_ray.core.agent_card).
CARD_COMMANDS = ("agent", "eval", "serve")


def with_agent_card(cfg, config_path: str | None, overrides: list[str]):
    """``cfg`` with the model's agent card applied under the user's flags and ``--set`` items."""

    card, where = model_card(cfg)
    if card is None:
        return cfg
    clashes = overridden(card, overrides)
    if clashes:
        log.warning(
            "%s was trained to be asked otherwise; its agent card is overridden by: %s",
            where,
            ", ".join(clashes),
        )
    log.info("asking %s as its agent card says (%s)", where, ", ".join(card.overrides()))
    return load_config(NatRayConfig, config_path, [*card.overrides(), *overrides])


RAY_DATA_QUIET = Path(__file__).with_name("ray_data_logging.yaml")


def _setup_logging(verbose: bool, quiet: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # vLLM logs to stdout by default, which would mix with --json output.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    if not verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        # Ray Data's execution plans go to the session's ray-data.log, not the console.
        os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(RAY_DATA_QUIET))
        for noisy in ("vllm", "ray", "transformers", "httpx", "urllib3", "sentence_transformers"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        return run_command(args.command, args)
    except NatRayError as err:
        print(f"nat-ray {args.command_name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nat-ray {args.command_name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
