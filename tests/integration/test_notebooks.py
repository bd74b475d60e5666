"""The notebooks run end to end on the embedded default, in a kernel of this virtual environment.

``quickstart.ipynb`` runs with tiny sizes (``NAT_RAY_NB_QUICK=1``) into a temporary run folder: the
agent on one question, the pipeline (rollout -> NAT training -> evaluation) and one request to the
tuned model on Ray Serve. ``results.ipynb`` then reads that folder. Both are executed with nbclient
exactly as committed; the tests check the files they write and the tables they print.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from helpers import SHARED_MACHINE_ENV  # tests/helpers.py

pytestmark = pytest.mark.integration

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
CELL_TIMEOUT_S = 900


def _execute(name: str, env: dict[str, str], save_to: Path):
    """Run ``notebooks/<name>`` in a fresh ``python3`` kernel (this venv's interpreter); return it run.

    The executed notebook, outputs and all (up to a failing cell), is written to ``save_to``.
    """
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    with pytest.MonkeyPatch.context() as mp:  # the kernel inherits this process's environment
        for key, value in env.items():
            mp.setenv(key, value)
        client = NotebookClient(
            nb,
            kernel_name="python3",
            timeout=CELL_TIMEOUT_S,
            resources={"metadata": {"path": str(NOTEBOOKS)}},
        )
        started = time.time()
        try:
            client.execute()
        finally:
            nbformat.write(nb, save_to)
        print(f"{name}: {time.time() - started:.0f}s")
    return nb


def _text(nb) -> str:
    """Everything the notebook's cells printed or displayed as text."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out["text"])
            elif "data" in out:
                parts.append(out["data"].get("text/plain", ""))
    return "\n".join(parts)


@pytest.mark.parametrize("name", ["quickstart.ipynb", "results.ipynb"])
def test_committed_notebooks_are_clean(name):
    import nbformat

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert sum(c.cell_type == "markdown" for c in nb.cells) >= len(code) // 2
    assert "NAT_RAY_NB_RUN_DIR" in code[0].source  # parameters come first


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, embedded_path) -> Path:
    """The quickstart notebook's run folder, after running it with tiny sizes."""
    run = tmp_path_factory.mktemp("notebooks") / "quickstart-ci"
    env = {**SHARED_MACHINE_ENV, "NAT_RAY_NB_QUICK": "1", "NAT_RAY_NB_RUN_DIR": str(run)}
    _execute("quickstart.ipynb", env, run.parent / "quickstart.executed.ipynb")
    return run


def test_quickstart_runs_agent_pipeline_and_serve(run_dir):
    import nbformat

    summary = json.loads((run_dir / "quickstart.json").read_text())
    # The kernel ran this virtual environment's interpreter, not some other Python on the machine.
    assert Path(summary["python"]).resolve() == Path(sys.executable).resolve()
    assert summary["quick"] is True
    assert summary["agent"]["turns"] >= 1
    assert summary["stages"] == dict.fromkeys(["rollout", "train:nat", "eval:base", "eval:nat"], "done")
    assert summary["trajectories"] == 12  # word math: 6 questions x 2 temperatures
    assert summary["served"]["status"] == 200 and summary["served"]["model"] == "nat"
    assert 1 <= summary["served"]["turns"] <= 2

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["name"] == "quickstart-ci"
    assert list((run_dir / "rollout" / "trajectories").glob("*.parquet"))
    assert (run_dir / "train" / "nat" / "export" / "model" / "model.safetensors").is_file()
    for model in ("base", "nat"):
        parts = {p.name for p in (run_dir / "eval" / model / "trajectories").glob("*.parquet")}
        assert parts == {"word_math.parquet"}
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["results"]) == {"base", "nat"}
    # The default trains on the shipped teacher's trajectories beside the rollout's, and says so.
    sources = {Path(s["path"]).name: s["models"] for s in manifest["data_sources"]}
    assert sources["teacher.parquet"]["scripted-teacher"]["positives"] > 0
    assert "## Training data" in (run_dir / "results.md").read_text()
    card = json.loads((run_dir / "train" / "nat" / "export" / "model" / "agent_card.json").read_text())
    assert card["shots"] == 0 and card["variant"] == "nat" and card["tasks"] == ["word_math"]
    text = _text(nbformat.read(run_dir.parent / "quickstart.executed.ipynb", as_version=4))
    assert "# NAT pipeline results" in text and "POST /v1/agent -> 200" in text


def test_eval_of_the_nat_export_asks_it_as_its_agent_card_says(run_dir, tmp_path):
    """`nat-ray eval --model <export>` with no prompt flags: zero shots and the NAT template, from the
    card, though the config defaults (and configs/default.yaml) say one shot."""
    from nat_ray.cli import main

    export = run_dir / "train" / "nat" / "export"
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(export), "--tasks", "examples/word_math/task.yaml", "--limit", "2"]
    assert main([*argv, "--output-dir", str(out), "--config", "configs/default.yaml"]) == 0
    header = (out / "results.md").read_text()
    assert "- **prompt**: zero-shot-target-aware (0-shot)" in header


def test_results_reads_the_run_and_plots(run_dir):
    nb = _execute(
        "results.ipynb", {"NAT_RAY_NB_RUN_DIR": str(run_dir)}, run_dir.parent / "results.executed.ipynb"
    )
    report = json.loads((run_dir / "report" / "summary.json").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    expected = {
        (model, task): stats["acc_robust"]["mean"]
        for model, summary in results["results"].items()
        for task, stats in summary["tasks"].items()
    }
    assert {(r["model"], r["task"]): r["acc_robust"] for r in report["accuracy"]} == expected
    for model in ("base", "nat"):
        assert sum(report["outcomes"][model].values()) == 2  # 1 task x 2 questions x 1 seed
        assert sum(report["turns"][model].values()) == 2
    assert sum(r["trajectories"] for r in report["rollout"]) == 12
    plots = {Path(p).name for p in report["plots"]}
    assert {"accuracy.png", "outcomes.png", "turns.png", "rollout.png"} <= plots
    for plot in report["plots"]:
        assert Path(plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = _text(nb)
    assert "accuracy % (mean over seeds)" in text and "acc_robust" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == len(report["plots"])
