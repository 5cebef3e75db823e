"""A team's tracking on real servers, on loopback: MLflow's tracking server (`qtuning ui`) on a PostgreSQL backend
store with proxied artifacts, Prefect's server on PostgreSQL, and a comparison that knows them only by their URLs.

Needs PostgreSQL at $QTUNING_TEST_POSTGRES (default postgresql://postgres@127.0.0.1:5432, trust authentication):
every machine of this project runs one. The module creates its own databases and drops them at the end;
without a server, or without psycopg2 (the `team` extra), its tests skip and say why.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port, wait_for_url

POSTGRES = os.environ.get("QTUNING_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def databases():
    """{"mlflow": URL, "prefect": URL}: two new databases on the PostgreSQL server, dropped at the end."""
    psycopg2 = pytest.importorskip("psycopg2", reason="needs psycopg2 (pip install -e '.[team]')")
    try:
        admin = psycopg2.connect(f"{POSTGRES}/postgres", connect_timeout=5)
    except psycopg2.OperationalError as e:
        pytest.skip(f"no PostgreSQL at {POSTGRES} ({str(e).strip().splitlines()[0]}); "
                    "start one or set QTUNING_TEST_POSTGRES")
    admin.autocommit = True
    names = {k: f"qtuning_test_{k}_{os.getpid()}_{secrets.token_hex(3)}" for k in ("mlflow", "prefect")}
    with admin.cursor() as cur:
        for name in names.values():
            cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield {k: f"{POSTGRES}/{name}" for k, name in names.items()}
    finally:
        with admin.cursor() as cur:
            for name in names.values():
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="module")
def mlflow_server(databases, background, tmp_path_factory) -> dict:
    """`qtuning ui` on the PostgreSQL store, serving artifacts from a folder of its own (proxied: clients upload
    and download through the server and need no access to that folder)."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    proc = background([sys.executable, "-m", "commands.ui", "--port", str(port), "--tracking-uri", databases["mlflow"],
                       "--", "--artifacts-destination", str(root / "artifacts")], root / "server.log")
    url = f"http://127.0.0.1:{port}"
    wait_for_url(f"{url}/health", proc, timeout=120, log=root / "server.log")
    return {"url": url, "artifacts": root / "artifacts"}


@pytest.fixture(scope="module")
def prefect_on_postgres(databases, background, tmp_path_factory):
    """`prefect server start` with its database on PostgreSQL (PREFECT_API_DATABASE_CONNECTION_URL); this
    process's client points at it, with a PREFECT_HOME of its own for task results."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

    home = tmp_path_factory.mktemp("prefect_pg_server")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_DATABASE_CONNECTION_URL": databases["prefect"].replace("postgresql://", "postgresql+asyncpg://", 1)}
    env.pop("PREFECT_API_URL", None)
    prefect = str(Path(sys.executable).with_name("prefect"))
    proc = background([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], home / "server.log", env)
    wait_for_url(f"http://127.0.0.1:{port}/api/health", proc, timeout=180, log=home / "server.log")
    settings = {PREFECT_API_URL: f"http://127.0.0.1:{port}/api", PREFECT_HOME: str(tmp_path_factory.mktemp("prefect_client")),
                PREFECT_SERVER_ANALYTICS_ENABLED: False}
    with temporary_settings(updates=settings):
        yield settings[PREFECT_API_URL]
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()


@pytest.fixture(scope="module")
def compared(mlflow_server, prefect_on_postgres, tiny_compare_config, tmp_path_factory):
    """The tiny comparison (one benchmark) with pipeline.tracking_uri = the tracking server's URL: (its flow run
    id, ComparisonResult, config)."""
    from flows.compare import compare
    from qtuning.config import with_overrides

    cfg = tiny_compare_config(tmp_path_factory.mktemp("team"), name="team")
    cfg = with_overrides(cfg, {"pipeline.tracking_uri": mlflow_server["url"], "evaluation.tasks": ["qt_arc_easy"]})
    state = compare(cfg, return_state=True)
    assert state.is_completed(), state
    return state.state_details.flow_run_id, state.result(), cfg


def test_a_comparison_tracked_on_postgresql_with_proxied_artifacts(compared, mlflow_server, databases, tmp_path):
    import psycopg2
    from mlflow import MlflowClient

    _, result, cfg = compared
    client = MlflowClient(mlflow_server["url"])
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.info.artifact_uri.startswith("mlflow-artifacts:/")
    kids = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in kids) == ["full", "qtuning-25x50"]
    for run in kids:
        assert run.info.status == "FINISHED" and "train/loss" in run.data.metrics and "eval/average" in run.data.metrics
    # artifacts went through the server into its destination, and come back through it
    table = Path(client.download_artifacts(parent.info.run_id, "comparison/table.txt", str(tmp_path)))
    assert table.read_text().splitlines()[0].split()[0] == "arm"
    assert list(mlflow_server["artifacts"].rglob("table.txt"))
    # the store is the PostgreSQL database: its runs table holds the parent and both arms
    with psycopg2.connect(databases["mlflow"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT name FROM runs WHERE status = 'FINISHED'")
        assert {"team", "full", "qtuning-25x50"} <= {row[0] for row in cur.fetchall()}


def test_the_flow_runs_are_on_the_prefect_server_on_postgresql(compared, databases):
    import psycopg2
    from prefect.client.orchestration import get_client

    flow_run_id, _, _ = compared
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
    assert run.state is not None and run.state.is_completed()
    def query(sql: str, *args) -> list[tuple]:
        with psycopg2.connect(databases["prefect"]) as conn, conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()

    assert query("SELECT name, state_type FROM flow_run WHERE id = %s", str(flow_run_id)) == [("compare-team", "COMPLETED")]
    # the arms' subflows ran their tasks against this database too; task runs reach it as events, which the
    # server writes in the background: wait for them (a state), not for a time
    subflow_tasks = ("SELECT count(*) FROM task_run WHERE flow_run_id IN "
                     "(SELECT id FROM flow_run WHERE parent_task_run_id IS NOT NULL)")
    deadline = time.monotonic() + 60
    while query(subflow_tasks)[0][0] == 0:
        assert time.monotonic() < deadline, "no task run of the arms' subflows in Prefect's database within 60 s"
        time.sleep(0.5)
