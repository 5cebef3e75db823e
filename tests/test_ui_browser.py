"""The MLflow and Prefect UIs in a real browser, after a real comparison.

The end-to-end test's tiny comparison (tests/conftest.py: tiny_compare_config) runs on a real `prefect server
start`, logging to a temporary SQLite MLflow store; `qtuning ui` serves that store. Headless Chromium
(Debian's chromium + chromium-driver, through selenium) then reads what a person would see: the runs of the
experiment with a metric, a run's metric value, and the compare flow run completed in the Prefect UI.
Screenshots go to the test's temporary folder, and also to $QTUNING_SCREENSHOTS when set
(`QTUNING_SCREENSHOTS=docs pytest -m browser` refreshes docs/mlflow-ui.png and docs/prefect-ui.png).

Skipped where chromium, chromedriver or selenium are missing (.ci/run installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port, wait_for_url

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.timeout(480),
    pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                       reason="needs /usr/bin/chromium and /usr/bin/chromedriver (apt-get install chromium chromium-driver)"),
]
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")

# Flags for a headless browser in a container that reaches nothing outside loopback.
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1440,900"]


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_compare_config):
    return tiny_compare_config(tmp_path_factory.mktemp("ui"), name="browser")


@pytest.fixture(scope="module")
def mlflow_ui(config, background, tmp_path_factory) -> dict:
    """`qtuning ui` on the comparison's store, started before the comparison runs (it takes a while to come up)."""
    from mlflow import MlflowClient

    MlflowClient(config.pipeline.tracking_uri).search_experiments()  # create the tables here, not in two processes at once
    log = tmp_path_factory.mktemp("mlflow_ui") / "ui.log"
    port = free_port()
    proc = background([sys.executable, "-m", "commands.ui", "--port", str(port),
                       "--tracking-uri", config.pipeline.tracking_uri], log)
    return {"url": f"http://127.0.0.1:{port}", "proc": proc, "log": log}


@pytest.fixture(scope="module")
def compared(mlflow_ui, prefect_server, config):
    """The comparison, run by this process on the real Prefect server: (its flow run id, ComparisonResult)."""
    from flows.compare import compare

    start = time.perf_counter()
    state = compare(config, return_state=True)
    print(f"comparison: {time.perf_counter() - start:.1f}s")
    assert state.is_completed(), state
    return state.state_details.flow_run_id, state.result()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
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


def test_mlflow_ui_shows_the_runs_and_a_metric(compared, mlflow_ui, config, browser, shots):
    from mlflow import MlflowClient

    _, result = compared
    client = MlflowClient(config.pipeline.tracking_uri)
    runs = {r.info.run_name: r for r in client.search_runs([result.experiment_id])}
    assert set(runs) == {"browser", "full", "qtuning-25x50"}
    ui = mlflow_ui["url"]
    wait_for_url(f"{ui}/health", mlflow_ui["proc"], timeout=90, log=mlflow_ui["log"])

    # The runs table as a user leaves it: classic "Model training" view, the assistant panel closed, the
    # comparison expanded to its arms and three metric columns chosen (the UI keeps these in localStorage).
    browser.get(f"{ui}/health")
    view = {"selectedColumns": ["metrics.`eval/average`", "metrics.`train/loss`", "metrics.`train/loss_tokens`",
                                "attributes.`Source`"],
            "runsExpanded": {result.parent_run_id: True}}
    browser.execute_script(
        "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
        "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
        "localStorage.setItem(arguments[0], arguments[1]);",
        f'MLflowLocalStorage-1.1-ExperimentPage-["{result.experiment_id}"]-ReactComponentState', json.dumps(view))
    browser.get(f"{ui}/#/experiments/{result.experiment_id}/runs?workflowType=machine_learning")
    full = runs["full"]
    loss = full.data.metrics["train/loss"]
    page_text(browser, ["Run Name", "browser", "full", "qtuning-25x50", "eval/average", "train/loss",
                        "3 matching runs", repr(loss)])  # JS and Python print a float alike (shortest repr)
    shots(browser, "mlflow-ui")

    # One arm's page: its logged metric with the value the store holds.
    browser.get(f"{ui}/#/experiments/{result.experiment_id}/runs/{full.info.run_id}")
    text = page_text(browser, ["Metrics (", "train/loss", "eval/average", "Parent run", "browser", "Finished"])
    assert value_after(text, "train/loss") == pytest.approx(loss, rel=1e-6)
    assert value_after(text, "train/loss_tokens") == full.data.metrics["train/loss_tokens"]
    shots(browser, "mlflow-run")


def test_prefect_ui_shows_the_flow_run(compared, prefect_server, config, browser, shots):
    flow_run_id, _ = compared
    browser.get(f"{prefect_server['ui_url']}/runs/flow-run/{flow_run_id}")
    page_text(browser, [f"compare-{config.name}", "Completed", "Subflow Runs",  # the run, its state, its logs
                        f"Beginning flow run 'compare-{config.name}' for flow 'compare'", "comparison:"], timeout=90)
    shots(browser, "prefect-ui")

    browser.get(f"{prefect_server['ui_url']}/runs")
    page_text(browser, [f"compare-{config.name}", "experiment-full", "experiment-qtuning-25x50"], timeout=90)

