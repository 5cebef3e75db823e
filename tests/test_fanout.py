"""Arms on a work pool, for real: a `prefect server start`, a process work pool, the experiment deployment
registered on it by `qtuning serve --work-pool`, and two `prefect worker start --limit 1` processes (two "GPUs").

- A sweep fanned out to the pool trains its arms in parallel on both workers, and its table is the one the serial
  path builds (run again without the pool: every stage a cache hit, the same numbers).
- A worker killed outright (SIGKILL to it and its flow run, as a machine that dies) leaves its arm RUNNING with
  nobody to report: Prefect's heartbeat automation sets it CRASHED, the parent `qtuning run --work-pool` stops
  waiting, ends the arm's MLflow run and exits naming the arm.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qtuning.config import SweepConfig, with_overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

HEARTBEAT_S = 30  # Prefect's minimum heartbeat period; the automation's window is 3 of them


@pytest.fixture(scope="module")
def pool(prefect_server, background, tiny_compare_config, tmp_path_factory):
    """The pool, the deployment on it and two workers; yields (name, base config, worker processes, env)."""
    root = tmp_path_factory.mktemp("fanout")
    name = f"qtuning-fanout-{os.getpid()}"
    base = with_overrides(tiny_compare_config(root, name="fanout"),
                          {"evaluation.tasks": ["qt_arc_easy"], "pipeline.launcher": "python", "data.eval_rows": 4})
    env = {**prefect_server["env"], "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}
    prefect = str(Path(sys.executable).with_name("prefect"))
    subprocess.run([prefect, "work-pool", "create", name, "--type", "process"], env=env, check=True, capture_output=True)
    done = subprocess.run([sys.executable, "-m", "commands.serve", "--config", str(base.save(root / "compare.yaml")),
                           "--flows", "experiment", "--work-pool", name], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    workers = [background([prefect, "worker", "start", "--pool", name, "--limit", "1", "--name", f"gpu{i}"],
                          root / f"worker{i}.log", env) for i in range(2)]
    yield name, base, workers, env, root


def _arm_runs(client, since) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterStartTime, FlowRunFilterTags

    return client.read_flow_runs(flow_run_filter=FlowRunFilter(
        tags=FlowRunFilterTags(all_=["qtuning.arm"]), start_time=FlowRunFilterStartTime(after_=since)))


def test_a_sweep_on_the_pool_trains_arms_in_parallel_and_builds_the_serial_table(pool, tmp_path):
    from datetime import datetime, timezone

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows.sweep import sweep

    name, base, _, _, root = pool
    shared = {k: getattr(base, k) for k in ("model", "data", "training", "evaluation", "pipeline")}
    cfg = SweepConfig(name="fanned", **shared, grid={"training.seed": [0, 1], "pruning.token_ratio": [0.5]})
    since = datetime.now(timezone.utc)
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: HEARTBEAT_S}):
        fanned = sweep(with_overrides(cfg, {"pipeline.work_pool": name}))
    with get_client(sync_client=True) as client:
        runs = _arm_runs(client, since)
    assert len(runs) == 4 and all(r.state.is_completed() and r.work_pool_name == name for r in runs), runs
    spans = sorted((r.start_time, r.end_time) for r in runs)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), f"no two arms overlapped in time: {spans}"
    assert [r["arm"] for r in fanned.arms] == ["full", "qtuning-qtuning-rs0.25-rt0.5"]
    assert all(r["seeds"] == 2 for r in fanned.arms) and "heldout vs full" in fanned.table

    trained = sorted(p.name for p in Path(base.pipeline.runs_dir, "train").iterdir())
    serial = sweep(cfg)  # the same sweep here, one arm after another: every stage a cache hit, the same table
    assert sorted(p.name for p in Path(base.pipeline.runs_dir, "train").iterdir()) == trained
    for a, b in zip(fanned.arms, serial.arms):
        for col in ("arm", "loss_tokens", "average", "heldout_loss", "seeds"):
            assert a[col] == b[col], (col, a, b)


def test_a_killed_worker_crashes_its_arm_by_heartbeat_and_the_parent_says_which(pool, background, tmp_path):
    import psutil
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    name, base, workers, env, root = pool
    cfg = with_overrides(base, {"name": "killed", "training.epochs": 400.0, "pipeline.runs_dir": str(tmp_path / "runs")})
    log = tmp_path / "run.log"
    parent = background([sys.executable, "-m", "commands.run", "--config", str(cfg.save(tmp_path / "c.yaml")),
                         "--work-pool", name, "--no-progress"], log, env)
    victim = None
    deadline = time.monotonic() + 300
    with get_client(sync_client=True) as client:
        while victim is None and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(2)
            for run in client.read_flow_runs():
                if "qtuning.arm" in run.tags and run.state and run.state.is_running() and run.infrastructure_pid \
                        and run.parameters["config"]["name"] == "full":  # the long arm: full data, 400 epochs
                    victim = run
        assert victim is not None, log.read_text()[-4000:]
        time.sleep(5)  # its first heartbeat has reached the server
        pid = int(victim.infrastructure_pid.rsplit(":", 1)[-1])
        owner = next(w for w in workers if w.pid in {p.pid for p in psutil.Process(pid).parents()} or w.pid == pid)
        os.kill(pid, signal.SIGKILL)  # the machine dies: the flow run's process and its worker, at once
        os.killpg(owner.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        assert parent.wait(timeout=600) != 0
        crashed = client.read_flow_run(victim.id)
    out = log.read_text()
    assert crashed.state.is_crashed() and "no heartbeat" in crashed.state.message, crashed.state
    print(f"the killed arm was set CRASHED and the parent ended {time.monotonic() - killed_at:.0f} s after the kill")
    assert "did not complete" in out and f"{victim.name}" in out and "full" in out, out[-3000:]
    mlflow = MlflowClient(cfg.pipeline.tracking_uri)
    (arm,) = mlflow.search_runs([mlflow.get_experiment_by_name(cfg.pipeline.experiment_name).experiment_id],
                                filter_string=f"tags.`prefect.flow_run_id` = '{victim.id}'")
    assert arm.info.status == "KILLED" and "CRASHED" in arm.data.tags["qtuning.ended_by"].upper()
