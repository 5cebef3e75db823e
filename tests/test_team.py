"""A team's tracking on real servers, on loopback: MLflow's tracking server (`qtuning ui --auth`) on a PostgreSQL
backend store with proxied artifacts, Prefect's server on PostgreSQL, both asking every client for a password, and
a comparison that knows them only by their URLs and the credentials in its environment; then every place the
run writes, logs or stores is searched for the two passwords.

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
# planted secrets: the MLflow admin's password and Prefect's auth string; neither may appear anywhere but in env
MLFLOW_PASSWORD = "mlflow-" + secrets.token_hex(8)
PREFECT_AUTH = "admin:prefect-" + secrets.token_hex(8)
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
    """`qtuning ui --auth` on the PostgreSQL store (users in the same database, tables of their own), serving
    artifacts from a folder of its own (proxied: clients upload and download through the server and need no
    access to that folder). The admin's password reaches the server by environment only."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    env = {**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": MLFLOW_PASSWORD, "TMPDIR": str(root)}  # its auth config there
    proc = background([sys.executable, "-m", "commands.ui", "--auth", "--port", str(port), "--tracking-uri",
                       databases["mlflow"], "--", "--artifacts-destination", str(root / "artifacts")],
                      root / "server.log", env)
    url = f"http://127.0.0.1:{port}"
    wait_for_url(f"{url}/health", proc, timeout=120, log=root / "server.log")
    return {"url": url, "artifacts": root / "artifacts", "root": root}


@pytest.fixture(scope="module")
def prefect_on_postgres(databases, background, tmp_path_factory) -> str:
    """`prefect server start` with its database on PostgreSQL (PREFECT_API_DATABASE_CONNECTION_URL) and Prefect's
    basic authentication (PREFECT_SERVER_API_AUTH_STRING): its API URL."""
    home = tmp_path_factory.mktemp("prefect_pg_server")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_API_AUTH_STRING": PREFECT_AUTH,
           "PREFECT_API_DATABASE_CONNECTION_URL": databases["prefect"].replace("postgresql://", "postgresql+asyncpg://", 1)}
    env.pop("PREFECT_API_URL", None)
    prefect = str(Path(sys.executable).with_name("prefect"))
    proc = background([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], home / "server.log", env)
    wait_for_url(f"http://127.0.0.1:{port}/api/health", proc, timeout=180, log=home / "server.log")
    return f"http://127.0.0.1:{port}/api"


@pytest.fixture(scope="module")
def compared(mlflow_server, prefect_on_postgres, tiny_compare_config, tmp_path_factory):
    """`qtuning run` of the tiny comparison (one benchmark) on a machine that knows the servers only by their
    URLs and its credentials: the MLflow user and password inside --tracking-uri (as users paste them; the run
    moves them to MLFLOW_TRACKING_USERNAME/PASSWORD), Prefect's auth string in PREFECT_API_AUTH_STRING (a process
    of its own: a test process's Prefect clients may already be bound to another server): (its table as JSON,
    config, its folder, what it printed)."""
    import json
    import subprocess

    from qtuning.config import with_overrides

    root = tmp_path_factory.mktemp("team")
    cfg = tiny_compare_config(root, name="team")
    cfg = with_overrides(cfg, {"pipeline.tracking_uri": None, "evaluation.tasks": ["qt_arc_easy"]})
    path = cfg.save(root / "team.yaml")
    env = {**os.environ, "PREFECT_API_URL": prefect_on_postgres, "PREFECT_API_AUTH_STRING": PREFECT_AUTH,
           "PREFECT_HOME": str(root / "prefect_home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with_password = mlflow_server["url"].replace("http://", f"http://admin:{MLFLOW_PASSWORD}@", 1)
    res = subprocess.run([sys.executable, "-m", "commands.cli", "run", "--config", str(path), "--no-progress",
                          "--tracking-uri", with_password, "--json", str(root / "table.json")], env=env,
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Starting temporary server" not in res.stdout + res.stderr  # the team's server, not one of its own
    return json.loads((root / "table.json").read_text()), cfg, root, res.stdout + res.stderr


@pytest.fixture
def mlflow_login(monkeypatch):
    """This test process as an MLflow client of the authenticating server."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", MLFLOW_PASSWORD)


def test_both_servers_refuse_a_client_without_credentials(mlflow_server, prefect_on_postgres):
    import urllib.error
    import urllib.request

    for url in (f"{mlflow_server['url']}/api/2.0/mlflow/experiments/search?max_results=1",
                f"{prefect_on_postgres}/flows/filter"):
        data = b"{}" if url.endswith("/filter") else None  # Prefect's filter is a POST, MLflow's search a GET
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}), timeout=10)
        assert err.value.code == 401, url


def test_a_comparison_tracked_on_postgresql_with_proxied_artifacts(compared, mlflow_server, databases, tmp_path, mlflow_login):
    import psycopg2
    from mlflow import MlflowClient

    table, cfg, *_ = compared
    client = MlflowClient(mlflow_server["url"])
    parent = client.get_run(table["parent_run_id"])
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


def test_the_flow_runs_are_on_the_prefect_server_on_postgresql(compared, databases, prefect_on_postgres):
    import psycopg2
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    def query(sql: str, *args) -> list[tuple]:
        with psycopg2.connect(databases["prefect"]) as conn, conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()

    ((flow_run_id, state),) = query("SELECT id, state_type FROM flow_run WHERE name = 'compare-team'")
    assert state == "COMPLETED"
    with temporary_settings(updates={PREFECT_API_URL: prefect_on_postgres, PREFECT_API_AUTH_STRING: PREFECT_AUTH}), \
            get_client(sync_client=True) as client:
        assert client.read_flow_run(flow_run_id).state.is_completed()  # and the API serves it from there
    # the arms' subflows ran their tasks against this database too; task runs reach it as events, which the
    # server writes in the background: wait for them (a state), not for a time
    subflow_tasks = ("SELECT count(*) FROM task_run WHERE flow_run_id IN "
                     "(SELECT id FROM flow_run WHERE parent_task_run_id IS NOT NULL)")
    deadline = time.monotonic() + 60
    while query(subflow_tasks)[0][0] == 0:
        assert time.monotonic() < deadline, "no task run of the arms' subflows in Prefect's database within 60 s"
        time.sleep(0.5)


def test_no_password_is_written_printed_or_stored_anywhere(compared, mlflow_server, prefect_on_postgres, databases,
                                                          tmp_path_factory):
    """The two planted secrets appear nowhere the run leaves a trace: what it printed, every file under its folder
    (runs, records, configs, Prefect's local results and logs), the artifacts the MLflow server stored, the
    servers' logs, and every row of both PostgreSQL databases (params, tags, the config artifact's record, flow
    run parameters, logs, artifacts, events)."""
    import psycopg2

    _, _, root, printed = compared
    planted = (MLFLOW_PASSWORD, PREFECT_AUTH.split(":", 1)[1])
    found = [f"output of qtuning run: {s}" for s in planted if s in printed]
    prefect_server_homes = list(tmp_path_factory.getbasetemp().glob("prefect_pg_server*"))
    assert prefect_server_homes
    for folder in (root, mlflow_server["root"], *prefect_server_homes):
        for path in (p for p in folder.rglob("*") if p.is_file()):
            data = path.read_bytes()
            found += [f"{path}: {s}" for s in planted if s.encode() in data]
    for name, url in databases.items():
        with psycopg2.connect(url) as conn, conn.cursor() as cur:
            cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
            for (table,) in cur.fetchall():
                for secret in planted:
                    cur.execute(f'SELECT count(*) FROM "{table}" t WHERE t::text LIKE %s', (f"%{secret}%",))
                    if cur.fetchone()[0]:
                        found.append(f"{name} database, table {table}: {secret}")
    assert not found, "\n".join(found)
