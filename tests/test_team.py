"""A team's tracking on real servers, on loopback: MLflow's tracking server (`qtuning ui --auth`) on a PostgreSQL
backend store with proxied artifacts, Prefect's server on PostgreSQL, both asking every client for a password; a
work pool with two workers; a sweep sent to it from a machine that knows the servers only by their URLs and its
credentials; then every place the runs write, log or store is searched for the two passwords.

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


# --------------------------------------------------------------------------- arms on a work pool, two workers
HEARTBEAT_S = 30  # Prefect's shortest heartbeat period; the automation's window is three of them


@pytest.fixture(scope="module")
def team_pool(mlflow_server, prefect_on_postgres, background, tiny_compare_config, tmp_path_factory) -> dict:
    """A process work pool on the PostgreSQL Prefect server, the experiment deployment on it (`qtuning serve
    --work-pool`) and two workers (`prefect worker start --limit 1`: one run each at a time, as one GPU each), each
    a "machine" of its own (its own PREFECT_HOME); the runs folder and Prefect's result storage are shared
    folders, the credentials are in every machine's environment only."""
    import subprocess

    from qtuning.config import with_overrides

    root = tmp_path_factory.mktemp("pool")
    base = with_overrides(tiny_compare_config(root, name="pooled"), {
        "pipeline.tracking_uri": mlflow_server["url"], "evaluation.tasks": ["qt_arc_easy"], "pipeline.launcher": "python",
        "data.eval_rows": 4, "training.epochs": 2.0})
    env = {**os.environ, "PREFECT_API_URL": prefect_on_postgres, "PREFECT_API_AUTH_STRING": PREFECT_AUTH,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOCAL_STORAGE_PATH": str(root / "prefect-results"),
           "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S), "PREFECT_WORKER_QUERY_SECONDS": "1",
           "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": MLFLOW_PASSWORD}

    def machine(name: str) -> dict:
        return {**env, "PREFECT_HOME": str(root / name)}

    prefect = str(Path(sys.executable).with_name("prefect"))
    cwd = Path(__file__).resolve().parents[1]
    for cmd in ([prefect, "work-pool", "create", "gpus", "--type", "process"],
                [sys.executable, "-m", "commands.cli", "serve", "--config", str(base.save(root / "base.yaml")), "--flows",
                 "experiment", "--work-pool", "gpus"]):
        done = subprocess.run(cmd, env=machine("admin"), cwd=cwd, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    workers = [background([prefect, "worker", "start", "--pool", "gpus", "--limit", "1", "--name", f"gpu{i}"],
                          root / f"worker{i}.log", machine(f"gpu{i}")) for i in range(2)]
    return {"root": root, "base": base, "workers": workers, "machine": machine, "cwd": cwd}


def _prefect_api(url: str, path: str, body: dict) -> list | dict:
    """A POST to the authenticating Prefect server's REST API (a process of its own is not needed for reading)."""
    import base64
    import json
    import urllib.request

    auth = base64.b64encode(PREFECT_AUTH.encode()).decode()
    req = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Basic {auth}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _arm_runs(url: str, sweep: str) -> list[dict]:
    """The flow runs a sweep's parent submitted to the pool (tag qtuning.arm, the sweep's name in the parent)."""
    runs = _prefect_api(url, "/flow_runs/filter", {"flow_runs": {"tags": {"all_": ["qtuning.arm"]}}, "limit": 200})
    return [r for r in runs if r["parameters"]["parent"] and r["parameters"]["parent"]["name"] == sweep]


def _sweep(team_pool: dict, name: str, **fields) -> Path:
    from qtuning.config import SweepConfig

    base = team_pool["base"]
    shared = {k: getattr(base, k) for k in ("model", "data", "training", "evaluation", "pipeline")}
    cfg = SweepConfig(name=name, **{**shared, **fields})
    return cfg.save(team_pool["root"] / f"{name}.yaml")


def _qtuning(team_pool: dict, *args: str, machine: str = "laptop", credentials: bool = True, timeout: float = 600):
    """A qtuning command on `machine`; without `credentials`, no MLflow password in its environment."""
    import subprocess

    env = {k: v for k, v in team_pool["machine"](machine).items() if credentials or not k.startswith("MLFLOW_TRACKING_")}
    return subprocess.run([sys.executable, "-m", "commands.cli", *args], env=env,
                          cwd=team_pool["cwd"], capture_output=True, text=True, timeout=timeout)


def _train_dirs(team_pool: dict) -> dict[str, float]:
    """Each training folder of the shared runs folder and its manifest's modification time (rewritten if retrained)."""
    train = Path(team_pool["base"].pipeline.runs_dir, "train")
    return {p.name: (p / "manifest.json").stat().st_mtime for p in train.iterdir() if (p / "manifest.json").exists()}


@pytest.fixture(scope="module")
def pooled(team_pool, mlflow_server) -> tuple[dict, Path, str]:
    """`qtuning sweep --work-pool` of the baseline and Q-Tuning from a "laptop" that knows the servers only by
    their URLs and its credentials: the MLflow user and password inside --tracking-uri (as users paste them; the
    command moves them to MLFLOW_TRACKING_USERNAME/PASSWORD, and no flow parameter carries them), Prefect's auth
    string in PREFECT_API_AUTH_STRING. The workers have their own credentials. (Its table as JSON, the sweep
    file, what it printed.)"""
    import json

    path = _sweep(team_pool, "pooled")  # the baseline and Q-Tuning: one arm a worker
    root = team_pool["root"]
    with_password = mlflow_server["url"].replace("http://", f"http://admin:{MLFLOW_PASSWORD}@", 1)
    done = _qtuning(team_pool, "sweep", str(path), "--work-pool", "gpus", "--tracking-uri", with_password,
                    "--json", str(root / "pooled.json"), credentials=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert "Starting temporary server" not in out  # the team's server, not one of its own
    return json.loads((root / "pooled.json").read_text()), path, out


def test_a_sweep_fans_out_to_two_workers_and_builds_the_serial_table(pooled, team_pool, prefect_on_postgres, mlflow_server,
                                                                     mlflow_login):
    """`qtuning sweep --work-pool`: the baseline and the pruned arm as flow runs on the pool, one on each
    worker (their run intervals overlap), under one MLflow parent; the same sweep run serially afterwards trains
    nothing (every stage a cache hit) and prints the same table."""
    import json

    from mlflow import MlflowClient

    pooled, path, _ = pooled
    root = team_pool["root"]
    runs = _arm_runs(prefect_on_postgres, "pooled")
    assert len(runs) == 2 and all(r["state"]["type"] == "COMPLETED" and r["work_pool_name"] == "gpus" for r in runs), runs
    spans = sorted((r["start_time"], r["end_time"]) for r in runs)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), f"the arms ran one after another: {spans}"
    client = MlflowClient(mlflow_server["url"])
    parent = client.get_run(pooled["parent_run_id"])
    kids = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in kids) == sorted(a["arm"] for a in pooled["arms"])
    assert all(r.info.status == "FINISHED" and "eval/average" in r.data.metrics for r in kids)
    assert "sweep/table.txt" in {f.path for f in client.list_artifacts(parent.info.run_id, "sweep")}

    trained = _train_dirs(team_pool)
    done = _qtuning(team_pool, "sweep", str(path), "--json", str(root / "serial.json"))  # no pool: here, in turn
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _train_dirs(team_pool) == trained  # nothing trained twice
    serial = json.loads((root / "serial.json").read_text())
    for a, b in zip(pooled["arms"], serial["arms"]):
        assert {k: a[k] for k in ("arm", "loss_tokens", "average", "heldout_loss")} == \
               {k: b[k] for k in ("arm", "loss_tokens", "average", "heldout_loss")}


def test_a_killed_worker_crashes_its_arm_by_heartbeat_and_a_rerun_resumes_it(team_pool, prefect_on_postgres,
                                                                             mlflow_server, mlflow_login, background):
    """A worker machine that dies mid-arm (SIGKILL to the worker and to its flow run's process: nothing reports
    again): Prefect's heartbeat automation sets the arm CRASHED, the parent stops waiting, ends the arm's MLflow
    run KILLED and exits naming it; the same sweep run again resumes the arm from its last checkpoint, and the
    arm that completed is not trained again."""
    import signal

    import psutil
    from mlflow import MlflowClient

    root = team_pool["root"]
    # 40 steps an arm, a checkpoint every 10: the kill lands after the first with most of the arm left (30 steps,
    # about 10 s: the loop below looks every second), the surviving arm ends within the heartbeat's window, and the
    # rerun trains what the dead one had left
    training = team_pool["base"].training.model_copy(update={"epochs": 20.0, "checkpoint_every_steps": 10})
    path = _sweep(team_pool, "killed", training=training)
    log = root / "killed.log"
    parent = background([sys.executable, "-m", "commands.cli", "sweep", str(path), "--work-pool", "gpus"], log,
                        team_pool["machine"]("laptop"))
    victim, deadline = None, time.monotonic() + 300
    while victim is None:
        assert time.monotonic() < deadline and parent.poll() is None, log.read_text()[-4000:]
        time.sleep(1)
        for run in _arm_runs(prefect_on_postgres, "killed"):
            ckpts = list(Path(team_pool["base"].pipeline.runs_dir, "train").glob("full-*/checkpoints/step-*/trainer_state.json"))
            if run["parameters"]["config"]["name"] == "full" and run["state"]["type"] == "RUNNING" and ckpts:
                victim = run
    pid = int(str(victim["infrastructure_pid"]).rsplit(":", 1)[-1])
    owner = next(w for w in team_pool["workers"] if w.pid in {p.pid for p in psutil.Process(pid).parents()})
    os.kill(pid, signal.SIGKILL)  # the machine is gone: the arm's process and its worker, at once
    os.killpg(owner.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    assert parent.wait(timeout=480) != 0
    out = log.read_text()
    crashed = _prefect_api(prefect_on_postgres, "/flow_runs/filter", {"flow_runs": {"id": {"any_": [victim["id"]]}}})[0]
    assert crashed["state"]["type"] == "CRASHED" and "no heartbeat" in crashed["state"]["message"], crashed["state"]
    print(f"the dead worker's arm was CRASHED and the parent had exited {time.monotonic() - killed_at:.0f} s after the kill")
    assert "did not complete" in out and victim["name"] in out, out[-3000:]
    client = MlflowClient(mlflow_server["url"])
    experiment = client.get_experiment_by_name(team_pool["base"].pipeline.experiment_name)
    (arm,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{victim['id']}'")
    assert arm.info.status == "KILLED" and "Crashed" in arm.data.tags["qtuning.ended_by"]

    trained = _train_dirs(team_pool)
    done = _qtuning(team_pool, "sweep", str(path))  # the survivor's arm is a cache hit, the dead one's resumes
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resuming from the last checkpoint" in done.stdout + done.stderr
    after = _train_dirs(team_pool)
    assert {k: v for k, v in after.items() if k in trained} == trained and len(after) == len(trained) + 1


# --------------------------------------------------------------------------- the pooled sweep, tracked on the servers
# (after the killed worker: xdist hands this process its next file when two tests are left, and those should be short)
def test_the_sweep_is_tracked_on_postgresql_with_proxied_artifacts(pooled, mlflow_server, databases, tmp_path, mlflow_login):
    import psycopg2
    from mlflow import MlflowClient

    table, *_ = pooled
    arms = sorted(a["arm"] for a in table["arms"])
    client = MlflowClient(mlflow_server["url"])
    parent = client.get_run(table["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.info.artifact_uri.startswith("mlflow-artifacts:/")
    kids = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in kids) == arms
    for run in kids:
        assert run.info.status == "FINISHED" and "train/loss" in run.data.metrics and "eval/average" in run.data.metrics
    # artifacts went through the server into its destination, and come back through it
    table = Path(client.download_artifacts(parent.info.run_id, "sweep/table.txt", str(tmp_path)))
    assert "full" in table.read_text()
    assert list(mlflow_server["artifacts"].rglob("table.txt"))
    # the store is the PostgreSQL database: its runs table holds the parent and both arms
    with psycopg2.connect(databases["mlflow"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT name FROM runs WHERE status = 'FINISHED'")
        assert {"pooled", *arms} <= {row[0] for row in cur.fetchall()}


def test_the_flow_runs_are_on_the_prefect_server_on_postgresql(pooled, databases, prefect_on_postgres):
    import psycopg2
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    def query(sql: str, *args) -> list[tuple]:
        with psycopg2.connect(databases["prefect"]) as conn, conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()

    sweeps = query("SELECT id, state_type FROM flow_run WHERE name = 'sweep-pooled'")  # on the pool, then serially
    assert sweeps and all(state == "COMPLETED" for _, state in sweeps), sweeps
    with temporary_settings(updates={PREFECT_API_URL: prefect_on_postgres, PREFECT_API_AUTH_STRING: PREFECT_AUTH}), \
            get_client(sync_client=True) as client:
        assert client.read_flow_run(sweeps[0][0]).state.is_completed()  # and the API serves it from there
    # the arms' flow runs ran their tasks against this database too; task runs reach it as events, which the
    # server writes in the background: wait for them (a state), not for a time
    subflow_tasks = ("SELECT count(*) FROM task_run WHERE flow_run_id IN "
                     "(SELECT id FROM flow_run WHERE parent_task_run_id IS NOT NULL)")
    deadline = time.monotonic() + 60
    while query(subflow_tasks)[0][0] == 0:
        assert time.monotonic() < deadline, "no task run of the arms' flow runs in Prefect's database within 60 s"
        time.sleep(0.5)


def test_no_password_is_written_printed_or_stored_anywhere(pooled, team_pool, mlflow_server, prefect_on_postgres,
                                                          databases, tmp_path_factory):
    """The two planted secrets appear nowhere the runs leave a trace: what the sweep printed, every file under the pool's folder
    (runs, records, configs, Prefect's local results and logs), the artifacts the MLflow server stored, the
    servers' logs, and every row of both PostgreSQL databases (params, tags, the config artifact's record, flow
    run parameters, logs, artifacts, events)."""
    import psycopg2

    *_, printed = pooled
    planted = (MLFLOW_PASSWORD, PREFECT_AUTH.split(":", 1)[1])
    found = [f"output of qtuning sweep: {s}" for s in planted if s in printed]
    prefect_server_homes = list(tmp_path_factory.getbasetemp().glob("prefect_pg_server*"))
    assert prefect_server_homes
    for folder in (team_pool["root"], mlflow_server["root"], *prefect_server_homes):  # the workers' homes and logs too
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
