"""The one command line: ``nat-ray <subcommand>``. The ``jobs/`` entry points call :func:`main`.

Every flag maps onto a config field (``--task`` is ``agent.task``), and ``--set section.key=value``
reaches any other one, so a setting has one name from YAML to the worker.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from nat_ray.errors import NatRayError

log = logging.getLogger("nat_ray")

_EPILOG = """examples:
  nat-ray agent --task gsm8k "A farmer has 3 pens with 12 hens each. How many hens?"
  nat-ray agent --task hotpotqa --set agent.temperature=0.2 "Which magazine was started first?"
  nat-ray rollout --config configs/rollout.yaml
  nat-ray train --config configs/train.yaml
  nat-ray serve --model runs/train/nat/export/model
  nat-ray eval --model runs/train/nat/export/model --tasks gsm8k,svamp --seeds 0,1,2
  nat-ray pipeline --config configs/default.yaml
  nat-ray models
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", help="config file (values override the defaults)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set agent.temperature=0.7 (repeatable; value parsed as YAML)",
    )


def _overrides(args: argparse.Namespace, mapping: dict[str, str]) -> list[str]:
    """Flags that are shortcuts for config fields, as ``--set`` items (they win over the file)."""
    items = []
    for flag, key in mapping.items():
        value = getattr(args, flag)
        if value is not None:
            items.append(f"{key}={json.dumps(value)}")
    return items + list(args.overrides)


def cmd_agent(args: argparse.Namespace) -> int:
    from nat_ray.agent import format_episode, new_episode
    from nat_ray.config import NatRayConfig, load_config
    from nat_ray.engines import build_engine
    from nat_ray.react import LocalTools, Stepper
    from nat_ray.tasks import get_task
    from nat_ray.tools import configure_tools

    flags = {
        "task": "agent.task",
        "model": "engine.model",
        "template": "agent.template",
        "shots": "agent.shots",
        "temperature": "agent.temperature",
        "max_turns": "agent.max_turns",
        "seed": "agent.seed",
    }
    cfg = load_config(NatRayConfig, args.config, _overrides(args, flags))
    task = get_task(cfg.agent.task)
    configure_tools(cfg.tools)
    episode = new_episode(task, args.question, cfg.agent, "cli-0")
    engine = build_engine(cfg.engine)
    if cfg.engine.backend == "openai":
        engine.models()  # an unreachable server is a clear error now, not a failed episode later
    try:
        Stepper(engine, LocalTools(), stop_on_tool_error=cfg.agent.stop_on_tool_error).run([episode])
    finally:
        engine.close()
    score = task.score(episode.answer, args.gold) if args.gold is not None else None
    if args.json:
        print(
            json.dumps(
                {
                    "answer": episode.answer,
                    "finished": episode.finished,
                    "failure_reason": episode.failure_reason,
                    "turns": episode.turns,
                    "conversation": episode.conversation(),
                    "score": None if score is None else score.__dict__,
                },
                indent=2,
            )
        )
    else:
        print(format_episode(episode, score))
    return 0


def cmd_rollout(args: argparse.Namespace) -> int:
    from nat_ray.config import NatRayConfig, load_config
    from nat_ray.rollout import main_rollout

    flags = {
        "tasks": "rollout.tasks",
        "split": "rollout.split",
        "limit": "rollout.limit",
        "output_dir": "rollout.output_dir",
        "model": "engine.model",
    }
    cfg = load_config(NatRayConfig, args.config, _overrides(args, flags))
    return main_rollout(cfg)


def cmd_pipeline(args: argparse.Namespace) -> int:
    from nat_ray.config import NatRayConfig, load_config
    from nat_ray.pipeline import main_pipeline

    cfg = load_config(NatRayConfig, args.config, _overrides(args, {"name": "pipeline.name"}))
    return main_pipeline(cfg)


def cmd_models(args: argparse.Namespace) -> int:
    from nat_ray.models import EMBEDDED, ensure_embedded, list_models, models_dir

    if args.convert:
        ensure_embedded()
    found = list_models()
    print(f"model cache: {models_dir()}  (set NAT_RAY_MODELS to move it)")
    if not found:
        print(
            f"  (empty: the embedded model {EMBEDDED} is converted on first use, or run `nat-ray models --convert`)"
        )
    for m in found:
        state = "ready" if m.complete else "incomplete"
        print(f"  {m.name:32s} {m.size_mb:8.1f} MiB  {state}  {m.path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nat-ray",
        description="Negative-aware training (NAT) of tool-using LLM agents, on Ray.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, including vLLM's")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "agent",
        help="answer one question with the ReAct agent and print the trajectory",
        description="Run the agent on one question (vLLM engine, the task's tools) and print every turn.",
    )
    p.add_argument("question", help="the question text")
    p.add_argument("--task", help="task whose tools, prompt and scorer to use (default gsm8k)")
    p.add_argument("--model", help="HF checkpoint path or hub id (default: the embedded SmolLM2-135M)")
    p.add_argument("--template", help="NAT prompt template (default zero-shot-target-aware)")
    p.add_argument(
        "--shots", type=int, choices=(0, 1), help="1 = add a demonstration (default), 0 = paper format"
    )
    p.add_argument("--temperature", type=float, help="sampling temperature (default 0 = greedy)")
    p.add_argument("--max-turns", type=int, help="model calls before giving up (default 7)")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument(
        "--gold", help="the right answer: prints whether the agent got it (paper and robust rules)"
    )
    p.add_argument("--json", action="store_true", help="print the episode as JSON")
    _add_config_args(p)
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser(
        "rollout",
        help="collect and score trajectories with Ray Data (stage 1)",
        description="Run the agent over many questions on Ray Data engine actors, score every trajectory "
        "(paper and robust rules) and write Parquet to <rollout.output_dir>/trajectories. Re-running the "
        "same config resumes: finished trajectories are kept and none is generated twice. Set RAY_ADDRESS "
        "to use a running cluster; otherwise a local Ray starts.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  nat-ray rollout --config configs/rollout.yaml --set rollout.limit=50",
    )
    p.add_argument(
        "--tasks", type=lambda s: s.split(","), help="comma-separated tasks (default gsm8k,strategyqa)"
    )
    p.add_argument("--split", help="dataset split (default train)")
    p.add_argument("--limit", type=int, help="questions per task (default 20)")
    p.add_argument("--output-dir", help="where trajectories go (default runs/rollout)")
    p.add_argument("--model", help="HF checkpoint path or hub id (default: the embedded model)")
    _add_config_args(p)
    p.set_defaults(func=cmd_rollout)

    from nat_ray import evaluate, import_nat, serve, train

    train.add_parser(sub)
    serve.add_parser(sub)
    evaluate.add_parser(sub)
    import_nat.add_parser(sub)

    p = sub.add_parser(
        "pipeline",
        help="the whole NAT experiment: rollout, train each variant, evaluate, one results table",
        description="rollout -> NAT data -> train the w/o-Neg, NUT and NAT variants -> evaluate the base "
        "model and each tuned one -> runs/<name>/results.md. Every stage is recorded in "
        "runs/<name>/manifest.json; running the same name again resumes and skips finished stages.",
        epilog="example:\n  nat-ray pipeline --config configs/default.yaml --name first-try",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--name", help="run name (default: pipeline.name = default)")
    _add_config_args(p)
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("models", help="list cached models", description="List converted models in the cache.")
    p.add_argument(
        "--convert", action="store_true", help="convert the embedded model now if it is not cached"
    )
    p.set_defaults(func=cmd_models)
    return parser


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # vLLM logs to stdout by default, which would mix with --json output.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    if not verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        for noisy in ("vllm", "ray", "transformers", "httpx", "urllib3", "sentence_transformers"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except NatRayError as err:
        print(f"nat-ray {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nat-ray {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
