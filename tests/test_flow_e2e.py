"""The compare flow for real: Prefect's engine on a temporary server (and a temporary PREFECT_HOME), a SQLite
MLflow store in a temporary folder, `accelerate launch` training subprocesses on CPU, lm-eval on bundled items.

A tiny random llama (real tokenizer) on 16 ARC rows and one item per benchmark keeps it to a few minutes.
The runs build on each other: a first comparison, the same again (all cached, nothing trains), one pruning
field changed (only the pruned arm retrains), and a training that fails (its runs end FAILED).
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect.settings import (
    PREFECT_HOME,
    PREFECT_SERVER_ANALYTICS_ENABLED,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    temporary_settings,
)
from prefect.testing.utilities import prefect_test_harness

from flows.compare import compare
from qtuning.config import CompareConfig, DataConfig, PipelineConfig, TrainingConfig, with_overrides
from qtuning.config import EvalConfig
from qtuning.config import BUNDLED_TASKS as DEFAULT_TASKS
from qtuning.modeling import tiny_model_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
BENCHMARKS = [t.removeprefix("qt_") for t in DEFAULT_TASKS]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect_home")
    settings = {
        PREFECT_HOME: str(home),  # task results and cache records go to PREFECT_HOME/storage
        PREFECT_SERVER_ANALYTICS_ENABLED: False,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 90,
    }
    with temporary_settings(updates=settings), prefect_test_harness(server_startup_timeout=None):
        yield home


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
    result = compare(cfg)
    return result, {name: task_states(name) - before[name] for name in STAGES}


@pytest.fixture(scope="module")
def first_run(prefect_server, config):
    start = time.perf_counter()
    result, states = compare_counting(config)
    print(f"first comparison: {time.perf_counter() - start:.1f}s")
    return result, states


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
    assert header[-4:] == ["ratio_to_full", "loss_tokens", "loop_seconds", "heldout_loss"]
    assert all(row["heldout_loss"] > 0 for row in rows.values())
    assert "1 item per benchmark" in first.table and "too few to separate the arms" in first.table
    assert rows["qtuning-25x50"]["budget"] == "own" and "diff_lo" in rows["qtuning-25x50"]
    assert first.ui_command.split()[:2] == [str(Path(sys.executable).with_name("qtuning")), "ui"]  # runs as shown
    assert first_run[1]["train"] == {"Completed": 2}


def test_second_run_hits_the_caches_and_trains_nothing(first, config, mlflow_client):
    train_dirs = sorted(Path(config.pipeline.runs_dir, "train").iterdir())
    start = time.perf_counter()
    again, states = compare_counting(config)
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
    result, states = compare_counting(changed)
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
