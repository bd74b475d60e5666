"""Does the default run make the agent better? The NAT variants against the base, over training seeds.

Run from the repository root (about 80 minutes on the 2-core CPU machine)::

    .venv/bin/python benchmarks/learning.py      # writes benchmarks/results/learning.json + learning.png

On the default task (word math, ``configs/default.yaml``): one rollout of the base model, then the
pipeline (:func:`nat_ray.experiment.pipeline.run_pipeline`, each piece resumable) trains and evaluates

- the base model asked two ways: 0 shots with the "correctly" marker (the prompt every tuned model
  gets) and 1 shot (its best), so the table separates learning the format from learning the task;
- w/o-Neg and NAT over ``--seeds`` training seeds (3), NUT, nat_failure and the preference
  objectives on NAT's data (``nat+kto``, ``nat+dpo``: ``train.objective``, asked with the plain
  prompt) over one;

on the same ``--limit`` held-out test questions (200), then reports per cell the accuracy with its
n and 95 % Wilson interval, each variant's difference to w/o-Neg with a 95 % interval (Newcombe's
hybrid score interval for a difference of proportions, pooled over seeds), and whether *every*
training seed's tuned model is above both base rows outside noise (its Wilson interval wholly above
theirs). No sign is expected of NAT - w/o-Neg: it measures the paper's claim.

The curve: NAT (seed 0) trained for 2, 4 and 8 steps as separate runs (each with its own cosine
schedule, so it is a curve over training budgets) and the full run, evaluated on ``--dev-limit``
dev questions: accuracy and the unparseable-action rate by step, the base at step 0.

Hyper-parameters come from the default config, chosen on the dev split; test answers choose nothing.
KTO and DPO keep them (and their papers' beta 0.1); a DPO run stops when its pairs run out.

A shorter whole run compares the objectives alone (``--variants`` and ``--no-base --no-curve``), e.g.
``--seeds 1 --limit 100 --variants wo_neg nut nat nat+kto nat+dpo --no-base --no-curve
--out benchmarks/results/learning_objectives.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/learning.py` from the repo root
    sys.path.insert(0, str(ROOT))

from machine_info import machine  # noqa: E402 - beside this script

from nat_ray.config import (  # noqa: E402
    NatRayConfig,
    load_config,
    with_sections,  # noqa: E402
)
from nat_ray.evaluation.results_table import wilson_interval  # noqa: E402
from nat_ray.evaluation.run import run_eval  # noqa: E402
from nat_ray.experiment.pipeline import run_pipeline  # noqa: E402

log = logging.getLogger("benchmarks.learning")

RESULTS = ROOT / "benchmarks" / "results"
CONFIG = ROOT / "configs" / "default.yaml"
TASK = "word_math"
SEEDED = ("wo_neg", "nat")  # trained over every seed
ONCE = ("nut", "nat_failure", "nat+kto", "nat+dpo")  # trained with the first seed only
CURVE_STEPS = (2, 4, 8)


def counts(summary: dict) -> tuple[int, int, int]:
    """(correct, parsed, n) of the task in one evaluation summary."""
    task = summary["tasks"][TASK]
    n = task["n"]
    return task["correct_robust"], n - task.get("failures", {}).get("parse_error", 0), n


def cell(correct: int, n: int) -> dict:
    lo, hi = wilson_interval(correct, n)
    return {"correct": correct, "n": n, "accuracy": 100 * correct / n, "wilson95": [100 * lo, 100 * hi]}


def newcombe(a: dict, b: dict) -> dict:
    """a - b in percentage points, with Newcombe's hybrid score 95 % interval (two independent proportions)."""
    p1, p2 = a["correct"] / a["n"], b["correct"] / b["n"]
    l1, u1 = (x / 100 for x in a["wilson95"])
    l2, u2 = (x / 100 for x in b["wilson95"])
    d = p1 - p2
    lo = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return {"difference": 100 * d, "ci95": [100 * lo, 100 * hi], "outside_noise": lo > 0 or hi < 0}


def pooled(cells: list[dict]) -> dict:
    return cell(sum(c["correct"] for c in cells), sum(c["n"] for c in cells))


def run(args: argparse.Namespace) -> dict:
    began = time.time()
    base_cfg = load_config(
        NatRayConfig, CONFIG, [f"eval.limit={args.limit}", f"pipeline.runs_dir={args.runs_dir}"]
    )
    seeds = list(range(args.seeds))
    sections: dict[str, float] = {}
    seeded = [v for v in SEEDED if v in args.variants]

    # Seed 0: the rollout, both base rows and every variant.
    t0 = time.time()
    first = run_pipeline(
        with_sections(
            base_cfg,
            pipeline={"name": "seed0", "variants": list(args.variants), "evaluate_base": args.base},
            train={"seed": seeds[0]},
        )
    )
    sections["seed0"] = time.time() - t0
    rollout_dir = str(Path(first["run_dir"]) / "rollout" / "trajectories")
    per_seed = {0: first["results"]}
    for seed in seeds[1:]:
        t0 = time.time()
        result = run_pipeline(
            with_sections(
                base_cfg,
                pipeline={
                    "name": f"seed{seed}",
                    "variants": seeded,
                    "trajectories": rollout_dir,
                    "evaluate_base": False,
                },
                train={"seed": seed},
            )
        )
        per_seed[seed] = result["results"]
        sections[f"seed{seed}"] = time.time() - t0

    curve: list[dict] = []
    if args.curve:
        curve = _curve(base_cfg, args, seeds, rollout_dir, first, sections)
    return report(per_seed, curve, first, base_cfg, args, sections, began)


def _curve(base_cfg, args, seeds, rollout_dir: str, first: dict, sections: dict) -> list[dict]:
    """The curve on dev: the base (step 0), NAT after 2 / 4 / 8 steps, and the full run."""
    t0 = time.time()
    curve = []
    dev = {"split": "dev", "limit": args.dev_limit}
    for steps in CURVE_STEPS:
        result = run_pipeline(
            with_sections(
                base_cfg,
                pipeline={
                    "name": f"curve{steps}",
                    "variants": ["nat"],
                    "trajectories": rollout_dir,
                    "evaluate_base": steps == CURVE_STEPS[0],
                    "base_shots": [0],
                },
                train={"seed": seeds[0], "max_steps": steps, "checkpoint_every": 0},
                eval=dev,
            )
        )
        if steps == CURVE_STEPS[0]:
            curve.append({"step": 0, "model": "base-0shot", **_curve_point(result["results"]["base"])})
        curve.append({"step": steps, "model": "nat", **_curve_point(result["results"]["nat"])})
    # The seed-0 NAT model of the main run, on the same dev questions (not trained again).
    spec = json.loads((Path(first["run_dir"]) / "manifest.json").read_text())["models"]["nat"]
    full = run_eval(
        with_sections(
            base_cfg,
            engine={"model": spec["model"]},
            agent={"template": spec["template"], "shots": spec["shots"]},
            eval={**dev, "output_dir": str(Path(args.runs_dir) / "curve-full")},
        )
    )
    curve.append({"step": base_cfg.train.max_steps, "model": "nat", **_curve_point(full.to_dict())})
    sections["curve"] = time.time() - t0
    return curve


def _curve_point(summary: dict) -> dict:
    correct, parsed, n = counts(summary)
    return {**cell(correct, n), "unparseable": 100 * (n - parsed) / n}


def report(
    per_seed: dict, curve: list, first: dict, cfg: NatRayConfig, args, sections: dict, began: float
) -> dict:
    base = {
        label: cell(*counts(first["results"][label])[::2])
        for label in ("base-0shot", "base-1shot")
        if label in first["results"]
    }
    variants: dict[str, dict] = {}
    for variant in args.variants:
        cells = {seed: cell(*counts(res[variant])[::2]) for seed, res in per_seed.items() if variant in res}
        parsed = sum(counts(res[variant])[1] for res in per_seed.values() if variant in res)
        total = pooled(list(cells.values()))
        variants[variant] = {
            "seeds": {str(s): c for s, c in cells.items()},
            "pooled": total,
            "parsed_percent": 100 * parsed / total["n"],
            "above_both_bases_every_seed": all(
                c["wilson95"][0] > max(b["wilson95"][1] for b in base.values()) for c in cells.values()
            )
            if base
            else None,
        }
    for variant, entry in variants.items():
        if variant != "wo_neg" and "wo_neg" in variants:
            entry["minus_wo_neg"] = newcombe(entry["pooled"], variants["wo_neg"]["pooled"])
    sources = json.loads((Path(first["run_dir"]) / "manifest.json").read_text())["data_sources"]
    return {
        "benchmark": "learning",
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "task": TASK,
        "config": str(CONFIG.relative_to(ROOT)),
        "model": cfg.engine.model,
        "train": {
            "max_steps": cfg.train.max_steps,
            "learning_rate": cfg.train.learning_rate,
            "mode": cfg.train.mode,
        },
        "test_questions": args.limit,
        "dev_questions": args.dev_limit,
        "training_seeds": sorted(per_seed),
        "data_sources": sources,
        "base": base,
        "variants": variants,
        "curve_dev": curve,
        "headline": {
            "every_seed_nat_above_both_bases": variants.get("nat", {}).get("above_both_bases_every_seed"),
            "every_seed_wo_neg_above_both_bases": variants.get("wo_neg", {}).get(
                "above_both_bases_every_seed"
            ),
            **{f"{v}_minus_wo_neg": e["minus_wo_neg"] for v, e in variants.items() if "minus_wo_neg" in e},
        },
        "train_seconds": train_seconds(first["run_dir"]),
        "sections_seconds": {k: round(v, 1) for k, v in sections.items()},
        "seconds": round(time.time() - began, 1),
    }


def train_seconds(run_dir: str) -> dict[str, float]:
    """Seconds each variant's training took in seed 0 (what KTO and DPO add to the benchmark's time)."""
    stages = json.loads((Path(run_dir) / "manifest.json").read_text()).get("stages", {})
    out = {}
    for name, entry in stages.items():
        if name.startswith("train:") and isinstance(entry, dict) and entry.get("seconds") is not None:
            out[name.split(":", 1)[1]] = entry["seconds"]
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    rows = [(k, v) for k, v in result["base"].items()] + [
        (k, v["pooled"]) for k, v in result["variants"].items()
    ]
    for i, (_, c) in enumerate(rows):
        lo, hi = c["wilson95"]
        # Clamped at 0: at 0 % or 100 % the interval's end and the point differ by rounding alone.
        yerr = [[max(0.0, c["accuracy"] - lo)], [max(0.0, hi - c["accuracy"])]]
        left.errorbar(i, c["accuracy"], yerr=yerr, fmt="o", capsize=4)
    left.set_xticks(range(len(rows)), [label for label, _ in rows], rotation=20)
    left.set_ylabel("test accuracy % (95 % Wilson)")
    left.set_title(f"{result['task']}: n per cell = questions x seeds")
    if not result["curve_dev"]:
        right.set_visible(False)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        return
    steps = [p["step"] for p in result["curve_dev"]]
    right.plot(steps, [p["accuracy"] for p in result["curve_dev"]], "o-", label="accuracy %")
    right.plot(steps, [p["unparseable"] for p in result["curve_dev"]], "s--", label="unparseable %")
    right.set_xlabel("training steps (NAT, separate budgets)")
    right.set_title(f"dev, n={result['dev_questions']}")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="training seeds of w/o-Neg and NAT (default 3)")
    parser.add_argument("--limit", type=int, default=200, help="test questions (default 200)")
    parser.add_argument("--dev-limit", type=int, default=50, help="dev questions for the curve (default 50)")
    parser.add_argument("--runs-dir", default="runs/learning-benchmark", help="where the runs go (resumable)")
    parser.add_argument("--out", type=Path, default=RESULTS / "learning.json")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[*SEEDED, *ONCE],
        help="seed 0's variants, recipe[+objective] (default: %(default)s); w/o-Neg and NAT repeat over --seeds",
    )
    parser.add_argument("--no-base", dest="base", action="store_false", help="skip the base model's rows")
    parser.add_argument("--no-curve", dest="curve", action="store_false", help="skip the dev curve")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps(result["headline"], indent=2))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {result['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
