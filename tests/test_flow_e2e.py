"""The compare flow for real: Prefect's engine on the test process's real server (with this module's own
PREFECT_HOME), a SQLite MLflow store in a temporary folder, `accelerate launch` training subprocesses on CPU, lm-eval on bundled items.

A tiny random llama (real tokenizer) on 16 ARC rows and one item per benchmark keeps it to a few minutes.
The runs build on each other: a first comparison, the same again (all cached, nothing trains), one pruning
field changed (only the pruned arm retrains), and a training that fails (its runs end FAILED); the first
comparison is also read in a real browser, in the MLflow and Prefect UIs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect.settings import PREFECT_HOME, temporary_settings

from conftest import free_port, wait_for_url
from flows.compare import compare
from qtuning.config import CompareConfig, DataConfig, PipelineConfig, TrainingConfig, with_overrides
from qtuning.config import EvalConfig
from qtuning.config import BUNDLED_TASKS as DEFAULT_TASKS
from qtuning.modeling import tiny_model_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
BENCHMARKS = [t.removeprefix("qt_") for t in DEFAULT_TASKS]


@pytest.fixture(scope="module")
def prefect(prefect_server, tmp_path_factory):
    """The test process's real Prefect server (tests/conftest.py), with this module's own PREFECT_HOME: task
    results and cache records go to PREFECT_HOME/storage, so no other module's cached stages are found here."""
    with temporary_settings(updates={PREFECT_HOME: str(tmp_path_factory.mktemp("prefect_home"))}):
        yield prefect_server


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> CompareConfig:
    root = tmp_path_factory.mktemp("e2e")
    return CompareConfig(
        name="e2e",
        model=tiny_model_config(),
        data=DataConfig(source="arc", limit=16, max_length=96, eval_rows=4),
        training=TrainingConfig(micro_batch_size=8, lr=1e-3, epochs=1.0),
        evaluation=EvalConfig(limit=1, max_gen_toks=4, max_gen_toks_short=4, num_fewshot_gsm8k=1, batch_size=4),
        pipeline=PipelineConfig(runs_dir=str(root / "runs"), tracking_uri=f"sqlite:///{root}/mlflow.db", progress=False,
                                token_view_samples=2, train_retries=0),
    )


@pytest.fixture(scope="module")
def mlflow_client(config) -> MlflowClient:
    return MlflowClient(config.pipeline.tracking_uri)


def task_states(name: str) -> Counter:
    """How many task runs called `name` ended in each state, over all flow runs so far."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=f"{name}-")), limit=200)
    return Counter(r.state.name for r in runs if r.name.startswith(f"{name}-") and r.state is not None)


def children(client: MlflowClient, parent_id: str) -> dict:
    parent = client.get_run(parent_id)
    found = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    return {r.info.run_name: r for r in found}


def artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for a in client.list_artifacts(run_id, path):
        out |= artifacts(client, run_id, a.path) if a.is_dir else {a.path}
    return out


STAGES = ("prepare_data", "score_eu", "train", "evaluate")


def compare_counting(cfg: CompareConfig):
    """compare(cfg), and how many task runs of each stage it ended in each state (the tests of this module may
    run in any order: each counts only its own flow run's tasks)."""
    before = {name: task_states(name) for name in STAGES}
    state = compare(cfg, return_state=True)
    assert state.is_completed(), state
    return state.result(), {name: task_states(name) - before[name] for name in STAGES}, state.state_details.flow_run_id


@pytest.fixture(scope="module")
def first_run(prefect, config):
    """The first comparison: (its ComparisonResult, task states per stage, its flow run id)."""
    start = time.perf_counter()
    result, states, flow_run_id = compare_counting(config)
    print(f"first comparison: {time.perf_counter() - start:.1f}s")
    return result, states, flow_run_id


@pytest.fixture(scope="module")
def first(first_run):
    return first_run[0]


def test_first_comparison_fills_mlflow(first, config, mlflow_client):
    parent = mlflow_client.get_run(first.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "e2e"
    assert parent.data.params["arms"].count('"name"') == 2  # the config, flattened
    assert {"config/config.yaml", "eu/eu_plane.png", "eu/quadrant_shares.json", "eu/scores.csv",
            "comparison/table.txt", "comparison/table.md", "comparison/table.json"} <= artifacts(mlflow_client, parent.info.run_id)
    full_avg = parent.data.metrics["compare/full/average"]  # a tiny random model may well score 0 everywhere
    assert parent.data.metrics["compare/full/ratio_to_full"] == (pytest.approx(1.0) if full_avg else pytest.approx(math.nan, nan_ok=True))
    assert [d.dataset.name for d in parent.inputs.dataset_inputs] == ["arc"]
    # issue 9: the held-out loss of each arm and the pruned arm's quadrant migration figure, on the parent run
    assert {"compare/full/heldout_loss", "compare/qtuning-25x50/heldout_loss"} <= set(parent.data.metrics)
    assert all(parent.data.metrics[f"compare/{a}/heldout_loss"] > 0 for a in ("full", "qtuning-25x50"))
    assert "selection/qtuning-25x50/migration.png" in artifacts(mlflow_client, parent.info.run_id)

    runs = children(mlflow_client, first.parent_run_id)
    assert set(runs) == {"full", "qtuning-25x50"}
    for name, run in runs.items():
        assert run.info.status == "FINISHED"
        steps = mlflow_client.get_metric_history(run.info.run_id, "train/loss")
        assert sorted(m.step for m in steps) == [1, 2]  # 14 usable rows / pools of 8
        m = run.data.metrics
        assert {f"eval/{b}/score" for b in BENCHMARKS} <= set(m) and "eval/average" in m
        assert "eval/arc_easy/acc" in m and "eval/gsm8k/exact_match_last_number" in m
        assert any(k.startswith("system/") for k in m)
        assert Path(run.data.tags["checkpoint"], "config.json").exists()
        assert run.data.tags["qtuning.train.cached"] == "false"
        assert run.data.tags["mlflow.source.name"] == "qtuning"
        files = artifacts(mlflow_client, run.info.run_id)
        assert {"config/config.yaml", "eu/eu_plane.png", "pruning/plan.json", "eval/results.json", "eval/samples.json",
                "training/metrics.jsonl", "training/summary.json"} <= files
        contexts = Counter(t.value for d in run.inputs.dataset_inputs for t in d.tags if t.key == "mlflow.data.context")
        assert contexts == {"train": 1, "eval": len(BENCHMARKS)}
    qt = runs["qtuning-25x50"].data.metrics
    assert qt["prune/kept_samples"] == pytest.approx(2 / 8, abs=0.1)
    assert "prune/alpha" in qt and qt["train/loss_tokens"] < runs["full"].data.metrics["train/loss_tokens"]
    assert "pruning/pruned_tokens.html" in artifacts(mlflow_client, runs["qtuning-25x50"].info.run_id)
    # issue 9: what each arm learned, per sample; the held-out loss at the end of training
    assert "selection/selection.parquet" in artifacts(mlflow_client, runs["full"].info.run_id)
    assert {"selection/selection.parquet", "selection/migration.png", "selection/eu_plane_steps.png",
            "selection/kept_ids.txt", "selection/kept_rows.jsonl"} <= artifacts(mlflow_client, runs["qtuning-25x50"].info.run_id)
    for run in runs.values():
        assert run.data.metrics["summary/heldout_rows"] >= 1 and "eval/loss" in run.data.metrics


def test_first_comparison_table(first_run, first):
    rows = {a["name"]: a for a in first.arms}
    assert list(rows) == ["full", "qtuning-25x50"]
    assert rows["full"]["ratio_to_full"] == (pytest.approx(1.0) if rows["full"]["average"] else None)
    for row in rows.values():
        assert set(row["scores"]) == set(BENCHMARKS)
        assert row["average"] == pytest.approx(sum(row["scores"].values()) / len(BENCHMARKS))
        assert row["loop_seconds"] > 0 and row["loss_tokens"] > 0
    assert rows["qtuning-25x50"]["loss_tokens"] < rows["full"]["loss_tokens"] / 2
    header = first.table.splitlines()[0].split()
    # issue 10: the arm's budget, each score with lm-eval's standard error, the difference to full with its
    # interval (paired bootstrap on the logged items), and notes on what one item per benchmark can separate
    assert header[: 2 + len(BENCHMARKS)] == ["arm", "budget", *BENCHMARKS]
    assert header[-5:] == ["ratio_to_full", "loss_tokens", "loop_seconds", "heldout_loss", "kept_rows"]
    assert all(row["heldout_loss"] > 0 for row in rows.values())
    assert "1 item per benchmark" in first.table and "too few to separate the arms" in first.table
    assert rows["qtuning-25x50"]["budget"] == "own" and "diff_lo" in rows["qtuning-25x50"]
    assert first.ui_command.split()[:2] == [str(Path(sys.executable).with_name("qtuning")), "ui"]  # runs as shown
    assert first_run[1]["train"] == {"Completed": 2}


# --------------------------------------------------------------------------- the UIs, in a real browser
# The first comparison as a person sees it: headless Chromium (Debian's chromium + chromium-driver, through
# selenium) reads the MLflow UI (`qtuning ui` on the comparison's store) and the Prefect UI (the test process's
# real server): the runs of the experiment with a metric, a run's metric value, the compare flow run completed.
# Screenshots go to the test's temporary folder, and also to $QTUNING_SCREENSHOTS when set
# (`QTUNING_SCREENSHOTS=docs pytest -m browser` refreshes docs/mlflow-ui.png and docs/prefect-ui.png).
# Skipped where chromium, chromedriver or selenium are missing (.ci/run installs them).
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
needs_chromium = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs /usr/bin/chromium and /usr/bin/chromedriver (apt-get install chromium chromium-driver)")
# Flags for a headless browser in a container that reaches nothing outside loopback.
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1440,900"]


@pytest.fixture(scope="module")
def mlflow_ui(config, background, tmp_path_factory) -> dict:
    """`qtuning ui` on the comparison's store."""
    log = tmp_path_factory.mktemp("mlflow_ui") / "ui.log"
    port = free_port()
    proc = background([sys.executable, "-m", "commands.ui", "--port", str(port),
                       "--tracking-uri", config.pipeline.tracking_uri], log)
    url = f"http://127.0.0.1:{port}"
    wait_for_url(f"{url}/health", proc, timeout=90, log=log)
    return {"url": url, "proc": proc, "log": log}


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """shots(driver, name) -> the screenshot's path; copied to $QTUNING_SCREENSHOTS when set."""
    folder = tmp_path_factory.mktemp("screenshots")

    def save(driver, name: str) -> Path:
        path = folder / f"{name}.png"
        assert driver.save_screenshot(str(path)), path
        if os.environ.get("QTUNING_SCREENSHOTS"):
            Path(os.environ["QTUNING_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(os.environ["QTUNING_SCREENSHOTS"]) / path.name)
        return path

    return save


def page_text(driver, expected: list[str], timeout: float = 60) -> str:
    """The page's visible text once every string of `expected` is in it (single-page apps render late)."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = driver.find_element("tag name", "body").text
        if all(s in text for s in expected):
            time.sleep(1)  # let the last requests settle before a screenshot
            return driver.find_element("tag name", "body").text
        time.sleep(1)
    missing = [s for s in expected if s not in text]
    pytest.fail(f"{driver.current_url}: not shown after {timeout:.0f}s: {missing}\npage text:\n{text[:3000]}", pytrace=False)


def value_after(text: str, label: str) -> float:
    """The number on the line after `label` (MLflow's key/value tables render as alternating lines)."""
    lines = text.splitlines()
    return float(lines[lines.index(label) + 1])


@pytest.mark.browser
@needs_chromium
def test_mlflow_ui_shows_the_runs_and_a_metric(first, config, mlflow_client, mlflow_ui, browser, shots):
    runs = children(mlflow_client, first.parent_run_id)
    assert set(runs) == {"full", "qtuning-25x50"}
    every = mlflow_client.search_runs([first.experiment_id])  # this module's later comparisons too, when they ran first
    ui = mlflow_ui["url"]

    # The runs table as a user leaves it: classic "Model training" view, the assistant panel closed, the
    # comparison expanded to its arms and three metric columns chosen (the UI keeps these in localStorage).
    browser.get(f"{ui}/health")
    view = {"selectedColumns": ["metrics.`eval/average`", "metrics.`train/loss`", "metrics.`train/loss_tokens`",
                                "attributes.`Source`"],
            "runsExpanded": {first.parent_run_id: True}}
    browser.execute_script(
        "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
        "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
        "localStorage.setItem(arguments[0], arguments[1]);",
        f'MLflowLocalStorage-1.1-ExperimentPage-["{first.experiment_id}"]-ReactComponentState', json.dumps(view))
    browser.get(f"{ui}/#/experiments/{first.experiment_id}/runs?workflowType=machine_learning")
    full = runs["full"]
    loss = full.data.metrics["train/loss"]
    page_text(browser, ["Run Name", config.name, "full", "qtuning-25x50", "eval/average", "train/loss",
                        f"{len(every)} matching runs", repr(loss)])  # JS and Python print a float alike (shortest repr)
    shots(browser, "mlflow-ui")

    # One arm's page: its logged metric with the value the store holds.
    browser.get(f"{ui}/#/experiments/{first.experiment_id}/runs/{full.info.run_id}")
    text = page_text(browser, ["Metrics (", "train/loss", "eval/average", "Parent run", config.name, "Finished"])
    assert value_after(text, "train/loss") == pytest.approx(loss, rel=1e-6)
    assert value_after(text, "train/loss_tokens") == full.data.metrics["train/loss_tokens"]
    shots(browser, "mlflow-run")


@pytest.mark.browser
@needs_chromium
def test_prefect_ui_shows_the_flow_run(first_run, prefect, config, browser, shots):
    flow_run_id = first_run[2]
    browser.get(f"{prefect['ui_url']}/runs/flow-run/{flow_run_id}")
    page_text(browser, [f"compare-{config.name}", "Completed", "Subflow Runs",  # the run, its state, its logs
                        f"Beginning flow run 'compare-{config.name}' for flow 'compare'", "comparison:"], timeout=90)
    shots(browser, "prefect-ui")

    browser.get(f"{prefect['ui_url']}/runs")
    page_text(browser, [f"compare-{config.name}", "experiment-full", "experiment-qtuning-25x50"], timeout=90)


def test_second_run_hits_the_caches_and_trains_nothing(first, config, mlflow_client):
    train_dirs = sorted(Path(config.pipeline.runs_dir, "train").iterdir())
    start = time.perf_counter()
    again, states, _ = compare_counting(config)
    print(f"cached comparison: {time.perf_counter() - start:.1f}s")
    assert again.parent_run_id != first.parent_run_id
    assert states["train"] == {"Cached": 2} and states["evaluate"] == {"Cached": 2}
    assert states["score_eu"]["Completed"] == 0 and states["prepare_data"]["Completed"] == 0
    assert sorted(Path(config.pipeline.runs_dir, "train").iterdir()) == train_dirs
    assert [(a["name"], a["scores"]) for a in again.arms] == [(a["name"], a["scores"]) for a in first.arms]
    for run in children(mlflow_client, again.parent_run_id).values():  # the new runs are complete: replayed
        assert run.data.tags["qtuning.train.cached"] == "true"
        assert len(mlflow_client.get_metric_history(run.info.run_id, "train/loss")) == 2
        assert "eval/average" in run.data.metrics


def test_changing_one_pruning_field_retrains_only_the_pruned_arm(first, config, mlflow_client):
    raw = config.model_dump()
    raw["arms"][1]["pruning"]["token_ratio"] = 0.75  # keeps other tokens, so the weights (and scores) change
    changed = CompareConfig.model_validate(raw)
    trained = set(Path(config.pipeline.runs_dir, "train").iterdir())
    result, states, _ = compare_counting(changed)
    assert states["train"] == {"Completed": 1, "Cached": 1}
    assert states["evaluate"] == {"Completed": 1, "Cached": 1}  # keyed by the checkpoint's content
    runs = children(mlflow_client, result.parent_run_id)
    assert runs["full"].data.tags["qtuning.train.cached"] == "true"
    assert runs["qtuning-25x50"].data.tags["qtuning.train.cached"] == "false"
    assert runs["qtuning-25x50"].data.params["pruning.token_ratio"] == "0.75"
    assert len(set(Path(config.pipeline.runs_dir, "train").iterdir()) - trained) == 1


def test_a_failed_training_ends_its_runs_failed_and_keeps_what_they_logged(first, config, mlflow_client):
    broken = with_overrides(config, {"training.precision": "bf16", "name": "broken"})  # bf16 needs a GPU: the child exits 1
    with pytest.raises(RuntimeError, match="exited with code 1"):
        compare(broken)
    exp = mlflow_client.get_experiment_by_name(config.pipeline.experiment_name)
    parent = mlflow_client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'broken'")[0]
    assert parent.info.status == "FAILED"
    full = children(mlflow_client, parent.info.run_id)["full"]
    assert full.info.status == "FAILED"
    assert {"config/config.yaml", "pruning/plan.json"} <= artifacts(mlflow_client, full.info.run_id)
    assert full.data.params["training.precision"] == "bf16" and "data/rows" in full.data.metrics
