"""The closed loop end to end on the embedded model: two rounds of real rollout (Ray Data + vLLM),
LoRA training (Ray Train + DeepSpeed) and evaluation, then a re-run that must resume, not redo.

Sized to the smallest that still trains: StrategyQA (yes/no, so a round has positives and
negatives), 3 questions x 2 samples per round, one optimizer step, 3 test questions. The rounds also
take served traffic (``loop.traffic_dir``): a capture folder as a server leaves it, written with the
server's own writer (the served path itself runs in ``test_serve.py``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from nat_ray.config import NatRayConfig, from_dict
from nat_ray.experiment.loop import PLOT_FILE, run_loop
from nat_ray.paths import PACKAGE_DATA_DIR, PARTS_DIR

pytestmark = pytest.mark.integration

TINY = {
    # max_lora_rank: the adapters' rank (on CPU every LoRA token costs in proportion to it).
    "engine": {
        "model": "embedded",
        "max_model_len": 1024,
        "kv_cache_gb": 0.5,
        "max_num_seqs": 16,
        "max_lora_rank": 8,
    },
    "agent": {"max_turns": 3, "max_new_tokens": 64},
    "rollout": {
        "tasks": ["strategyqa"],
        "limit": 3,
        "temperatures": [0.7],
        "samples": 2,
        "num_calculators": 1,
    },
    "train": {
        "mode": "lora",
        "variant": "nat",
        "lora_rank": 8,
        "lora_alpha": 16,
        "max_length": 384,
        "epochs": 1,
        "global_batch_size": 2,
        "micro_batch_size": 1,
        "num_workers": 2,
        "learning_rate": 2.0e-4,
        "warmup_ratio": 0.0,
        "zero_stage": 2,
        "max_steps": 1,
        "checkpoint_every": 1,
    },
    "eval": {"tasks": ["strategyqa"], "split": "test", "limit": 3, "seeds": [0]},
    # The shipped 592-paragraph corpus: the full one (when ../shared is there) takes minutes to index.
    "tools": {"search_corpus": str(PACKAGE_DATA_DIR / "hotpotqa" / "corpus_sample.jsonl.gz")},
    "loop": {"name": "tiny-loop", "rounds": 2, "evaluate_base": False, "carry_rounds": 1},
}


def served_traffic(folder: Path) -> list[str]:
    """Three captured StrategyQA episodes: one a person gave feedback on, one asked with its gold, one
    with neither; returns their episode ids."""
    from nat_ray.agent import new_episode
    from nat_ray.config import AgentConfig
    from nat_ray.core import episode_ids, records
    from nat_ray.core.react import Step
    from nat_ray.serve.api import gold_score
    from nat_ray.serve.capture import CaptureWriter, FeedbackLog, capture_secret, captured_row
    from nat_ray.tasks import get_task

    task = get_task("strategyqa")
    secret = capture_secret(folder)
    writer = CaptureWriter(folder, flush_rows=2, flush_s=60)
    ids = []
    for i, (question, gold) in enumerate(zip(task.load("train", limit=3), (None, "no", None))):
        episode = new_episode(task, question.question, AgentConfig(), f"request-{i}")
        episode.steps.append(Step("Thought: I recall the answer.\nAction: finish[yes]"))
        episode.answer, episode.finished = "yes", True
        ids.append(episode_ids.issue(secret))
        row = captured_row(
            episode,
            task,
            question=question.question,
            episode_id=ids[-1],
            model="served",
            gold=gold,
            score=gold_score("strategyqa", episode.answer, gold),
            started_at=records.now_iso(),
            config_hash="served",
            tool_versions={},
        )
        writer.add(row)
    writer.close()
    FeedbackLog(folder, writer.replica).record(ids[0], 1.0, answer="yes")
    return ids


@pytest.fixture(scope="module")
def loop_run(local_ray, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    traffic = tmp_path_factory.mktemp("capture")
    served_traffic(traffic)
    loop = {**TINY["loop"], "runs_dir": str(runs), "traffic_dir": str(traffic)}
    cfg = from_dict(NatRayConfig, {**TINY, "loop": loop})
    started = time.time()
    first = run_loop(cfg)
    first_seconds = time.time() - started
    started = time.time()
    second = run_loop(cfg)
    return cfg, Path(first["run_dir"]), first, first_seconds, second, time.time() - started


def test_two_rounds_publish_adapters_and_write_the_table_and_plot(loop_run):
    import pyarrow.parquet as pq

    _, run_dir, first, seconds, _, _ = loop_run
    print(f"two rounds took {seconds:.0f}s")
    assert [r["round"] for r in first["rounds"]] == [0, 1]
    assert first["stopped"].startswith("ran loop.rounds = 2")
    for r in (0, 1):
        adapter = run_dir / "adapters" / f"round-{r}"
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["r"] == 8 and (adapter / "adapter_model.safetensors").stat().st_size > 0
        assert (adapter / "CHECKSUMS.sha256").is_file()
        manifest = json.loads((run_dir / "rounds" / str(r) / "manifest.json").read_text())
        assert all(manifest["stages"][s]["status"] == "done" for s in ("rollout", "train", "eval", "publish"))
    # Round 0 took the served traffic it could label (feedback, gold) and left the third out; round 1
    # found nothing new.
    round0, round1 = first["rounds"]
    counts = {"episodes": 3, "earlier": 0, "new": 3, "feedback": 1, "gold": 1, "judge": 0, "unlabelled": 1}
    assert round0["traffic"] == counts
    assert round1["traffic"] == {**counts, "earlier": 2, "new": 1, "feedback": 0, "gold": 0}
    served = pq.read_table(run_dir / "rounds" / "0" / "traffic.parquet").to_pylist()
    assert [(r["correct_robust"], r["gold"]) for r in served] == [(True, "yes"), (False, "no")]
    # Round 1 collected with round 0's agent and, with carry_rounds=1, trained on both rounds' data.
    assert round1["collected_with"] == "round-0"
    assert round1["trained_on"] == round0["trajectories"] + 2 + round1["trajectories"] == 14
    # Round 1's rollout ran on the engines round 0 started, with round 0's adapter hot-loaded.
    models = {
        r: set(
            pq.read_table(run_dir / "rounds" / str(r) / "rollout" / PARTS_DIR, columns=["model"])[
                "model"
            ].to_pylist()
        )
        for r in (0, 1)
    }
    assert not any("+lora:" in m for m in models[0])
    (tuned,) = models[1]
    base, _, adapter = tuned.partition("+lora:")
    assert models[0] == {base} and Path(adapter) == Path(first["rounds"][0]["adapter"]).resolve()
    text = (run_dir / "results.md").read_text()
    assert "Smoke test, not a measurement" in text
    assert "| round-0 |" in text and "| round-1 |" in text and "n=3" in text
    rows = [line for line in text.splitlines() if line.startswith("| 0 |") or line.startswith("| 1 |")]
    assert len(rows) == 2
    assert (
        "- round 0: 3 new of 3 captured: 1 labelled by feedback, 1 by gold, 0 by the judge, 1 unlabelled (left out)"
        in text
    )
    assert (run_dir / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((run_dir / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [0, 1]


def test_mlflow_holds_the_loop_and_its_stages_with_metrics(loop_run):
    from mlflow.tracking import MlflowClient

    _, run_dir, first, _, _, _ = loop_run
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("tiny-loop")
    runs = client.search_runs([experiment.experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    parent = by_name["tiny-loop"]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["loop.rounds"] == "2"
    scores = client.get_metric_history(parent.info.run_id, "score")
    assert [m.step for m in scores] == [0, 1]
    assert [m.value for m in scores] == [r["score"] for r in first["rounds"]]
    for r in (0, 1):
        for stage in ("rollout", "train", "eval", "publish"):
            run = by_name[f"round-{r}/{stage}"]
            assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
            assert run.info.status == "FINISHED"
    assert by_name["round-1/train"].data.metrics["examples"] > 0
    assert client.get_metric_history(by_name["round-0/train"].info.run_id, "loss")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.md", "results.json", PLOT_FILE} <= artifacts
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_a_rerun_resumes_without_redoing_finished_rounds(loop_run):
    from mlflow.tracking import MlflowClient

    _, run_dir, first, seconds, second, rerun_seconds = loop_run
    assert rerun_seconds < 30 < seconds
    assert [r["score"] for r in second["rounds"]] == [r["score"] for r in first["rounds"]]
    assert second["rounds"][1]["adapter"] == first["rounds"][1]["adapter"]
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    runs = client.search_runs([client.get_experiment_by_name("tiny-loop").experiment_id])
    # The re-run logged into the same parent and opened no stage run of its own.
    assert sum(r.info.run_name == "tiny-loop" for r in runs) == 1
    assert len(runs) == 1 + 2 * 4


# --------------------------------------------------------------------------------------------
# nat-ray view on this run, in a real browser (Debian's chromium and chromedriver, with Selenium)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium. Missing, the test is skipped, unless NAT_RAY_REQUIRE_BROWSER is set (CI sets it)."""
    import os
    import shutil

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        message = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        if os.environ.get("NAT_RAY_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
    ):
        options.add_argument(arg)
    session = webdriver.Chrome(service=Service(driver), options=options)
    session.set_page_load_timeout(30)
    yield session
    session.quit()


@pytest.fixture
def viewer(loop_run, free_port):
    """``nat-ray view <the loop run>`` as a user starts it, on a free port; stopped after the test."""
    import subprocess
    import sys

    import requests

    _, run_dir, *_ = loop_run
    command = [str(Path(sys.executable).parent / "nat-ray"), "view", str(run_dir), "--port", str(free_port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{free_port}"
    try:
        for _ in range(120):
            try:
                if requests.get(url + "/static/view.css", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.25)
            assert process.poll() is None, process.stdout.read()
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def _follow(browser, element):
    """Click a link or submit button and wait for the next page: WebDriver's click returns before a form's
    navigation ends, so reading the URL or the rows at once can see the old page (a CI run did)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    old_page = browser.find_element(By.TAG_NAME, "html")
    element.click()
    wait = WebDriverWait(browser, 30)
    wait.until(expected_conditions.staleness_of(old_page))
    wait.until(lambda b: b.execute_script("return document.readyState") == "complete")


def test_the_viewer_filters_opens_a_failure_turn_by_turn_and_compares_the_rounds(viewer, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(viewer + "/")
    sources = browser.find_element(By.ID, "sources").text
    assert "rounds/0/eval" in sources and "rounds/1/eval" in sources and "rounds/1/rollout" in sources
    assert browser.find_elements(By.CSS_SELECTOR, "section.results table")  # the loop's results table
    assert (
        browser.find_element(By.CSS_SELECTOR, "figure img").get_attribute("naturalWidth") != "0"
    )  # the plot

    # Filter: a round's failures, through the form as a person does.
    _follow(browser, browser.find_element(By.LINK_TEXT, "Trajectories"))
    Select(browser.find_element(By.NAME, "source")).select_by_visible_text("rounds/1/rollout")
    Select(browser.find_element(By.NAME, "outcome")).select_by_visible_text("incorrect")
    _follow(browser, browser.find_element(By.CSS_SELECTOR, "form#filters button"))
    assert "source=" in browser.current_url and "outcome=incorrect" in browser.current_url
    rows = browser.find_elements(By.CSS_SELECTOR, "table#trajectories tr.bad")
    assert rows, "round 1's rollout has no failure to open"
    assert all(r.find_element(By.CSS_SELECTOR, "td").text == "rounds/1/rollout" for r in rows)

    # Open one: its turns, its outcome, its lineage.
    _follow(browser, rows[0].find_element(By.CSS_SELECTOR, "a.open"))
    assert browser.find_element(By.ID, "outcome").text != "correct"
    assert browser.find_elements(By.CSS_SELECTOR, "li.msg.assistant")
    assert "question and marker" in browser.find_elements(By.CSS_SELECTOR, "li.msg.prompt")[-1].text

    # The same question in every source that has it: both rounds' rollouts sampled it.
    _follow(browser, browser.find_element(By.PARTIAL_LINK_TEXT, "across sources"))
    labels = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "section.column h2")]
    assert "rounds/0/rollout" in labels and "rounds/1/rollout" in labels
    browser.save_screenshot(str(tmp_path / "compare.png"))
