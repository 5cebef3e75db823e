"""Deployments on a schedule, for real: `prefect server start` on loopback, `qtuning serve` in a subprocess with
a 5-second interval, and a scheduled run created by the server's scheduler and completed by the serving process.

The served flow is flows/health.py (assets cached, MLflow store answers: seconds). The compare and experiment
flows are built into deployments here too (parameters, schedule, form schema) but not run on a schedule: their
end-to-end run is tests/test_flow_e2e.py, and a comparison every few seconds would take the machine.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows import deploy
from qtuning.config import CompareConfig, with_overrides
from commands.serve import main as serve_main
from commands.ui import main as ui_main

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, tiny_compare_config) -> tuple[CompareConfig, Path]:
    root = tmp_path_factory.mktemp("deploy")
    cfg = with_overrides(tiny_compare_config(root, name="deployed"), {"training.lr": 5e-4})
    return cfg, cfg.save(root / "compare.yaml")


# --------------------------------------------------------------------------- without a server
def test_deployments_take_their_defaults_from_the_config_file(config_file):
    cfg, _ = config_file
    built = {d.flow_name: d for d in deploy.build_deployments(["experiment", "compare", "health"], cfg, cron="0 3 * * *",
                                                              timezone="Europe/Berlin")}
    assert {f"{f}/{d.name}" for f, d in built.items()} == {"experiment/qtuning-experiment", "compare/qtuning-compare",
                                                            "health/qtuning-health"}
    assert CompareConfig.model_validate(built["compare"].parameters["config"]) == cfg
    exp = built["experiment"].parameters
    assert exp["config"]["name"] == "qtuning-25x50" and exp["config"]["training"]["lr"] == 5e-4
    assert exp["mode"] == "dynamic" and exp["pipeline"]["tracking_uri"] == cfg.pipeline.tracking_uri
    for d in built.values():
        assert d.entrypoint == f"flows.{d.flow_name}.{d.flow_name}"  # module path: the package, from any folder
        (schedule,) = d.schedules
        assert schedule.schedule.cron == "0 3 * * *" and schedule.schedule.timezone == "Europe/Berlin"
        json.dumps(d.parameters)  # stored by the server as JSON
    # the pydantic parameters become a form: a JSON schema with the config's fields and descriptions (the UI
    # pre-fills it with the deployment's parameters)
    schema = built["compare"]._parameter_openapi_schema.model_dump()
    fields = schema["definitions"]["PruningConfig"]["properties"]
    assert "sample_ratio" in fields and fields["sample_ratio"]["description"]


def test_sweep_is_served_when_its_flow_exists():
    names = deploy.resolve_flow_names(None)
    assert names[:2] == ["experiment", "compare"]
    assert ("sweep" in names) == Path(deploy.__file__).with_name("sweep.py").exists()


def test_sweep_deployment_takes_its_defaults_from_the_sweep_file():
    from qtuning.config import SweepConfig

    path = Path(__file__).parents[1] / "configs" / "sweeps" / "paper-grid.yaml"
    (built,) = deploy.build_deployments(["sweep"], CompareConfig(), interval=86400, sweep_config=path)
    assert f"{built.flow_name}/{built.name}" == "sweep/qtuning-sweep"
    assert SweepConfig.model_validate(built.parameters["config"]) == SweepConfig.load(path)
    (without_file,) = deploy.build_deployments(["sweep"], CompareConfig())
    assert without_file.parameters == {}  # the flow's own default SweepConfig
    with pytest.raises(ValueError, match="add sweep to --flows"):
        deploy.build_deployments(["compare"], CompareConfig(), sweep_config=path)


def test_serve_refuses_bad_options_before_serving(config_file, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    _, path = config_file
    assert serve_main(["--config", str(path), "--flows", "compare,nope", "--dry-run"]) == 2
    assert "unknown flow(s) nope" in capsys.readouterr().err
    assert serve_main(["--cron", "every night", "--flows", "health", "--dry-run"]) == 2
    assert "Invalid cron string" in capsys.readouterr().err
    assert serve_main(["--interval", "0", "--flows", "health"]) == 2
    assert "--interval: must be > 0 seconds" in capsys.readouterr().err
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert serve_main(["--config", str(path), "--flows", "health", "--interval", "60"]) == 2
    assert "no Prefect server: schedules need one. Start it with `prefect server start`" in capsys.readouterr().err
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):  # nothing listens on the discard port
        assert serve_main(["--config", str(path), "--flows", "health", "--interval", "60"]) == 2
    assert "the Prefect server at http://127.0.0.1:9/api does not answer" in capsys.readouterr().err


def test_ui_command_uses_the_pipelines_store(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/m.db")
    assert ui_main(["--port", "5123", "--print-command", "--", "--allowed-hosts", "box:5123"]) == 0
    cmd = capsys.readouterr().out.splitlines()[0]
    assert f"server --backend-store-uri sqlite:///{tmp_path}/m.db --host 127.0.0.1 --port 5123" in cmd
    assert f"--default-artifact-root {(tmp_path / 'artifacts').as_uri()} --allowed-hosts box:5123" in cmd


def test_ui_beyond_loopback_needs_authentication_and_keeps_secrets_off_the_command_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/m.db")
    assert ui_main(["--host", "0.0.0.0", "--print-command"]) == 2
    assert "add --auth (with MLFLOW_AUTH_ADMIN_PASSWORD set), or --no-auth" in capsys.readouterr().err
    assert ui_main(["--host", "0.0.0.0", "--no-auth", "--print-command"]) == 0  # an authenticating proxy in front
    capsys.readouterr()
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "planted-secret")
    monkeypatch.delenv("MLFLOW_FLASK_SERVER_SECRET_KEY", raising=False)
    assert ui_main(["--host", "0.0.0.0", "--auth", "--port", "5124", "--print-command"]) == 0
    cmd = capsys.readouterr().out.splitlines()[0]
    assert "--app-name basic-auth" in cmd and "planted-secret" not in cmd
    from commands.ui import auth_environment

    env = auth_environment(f"sqlite:///{tmp_path}/m.db", None, tmp_path)
    ini = Path(env["MLFLOW_AUTH_CONFIG_PATH"]).read_text()
    assert f"database_uri = sqlite:///{tmp_path}/m.db" in ini and "planted-secret" not in ini
    assert len(env["MLFLOW_FLASK_SERVER_SECRET_KEY"]) == 64
    assert ui_main(["--auth", "--tracking-uri", str(tmp_path / "plain-folder"), "--print-command"]) == 2
    assert "pass --auth-db URI" in capsys.readouterr().err


# --------------------------------------------------------------------------- a real server and a scheduled run
def test_a_scheduled_run_is_created_and_completes(prefect_server, background, config_file, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort

    cfg, path = config_file
    env = {**prefect_server["env"], "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    log = tmp_path / "serve.log"
    start = time.monotonic()
    serving = background([sys.executable, "-m", "commands.serve", "--config", str(path), "--flows", "health",
                          "--interval", "5"], log, env)

    completed, deployment = None, None
    with get_client(sync_client=True) as client:
        while time.monotonic() - start < 180 and serving.poll() is None and completed is None:
            time.sleep(2)
            if deployment is None:
                try:
                    deployment = client.read_deployment_by_name("health/qtuning-health")
                except Exception:  # not registered yet
                    continue
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id])),
                                         sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=50)
            completed = next((r for r in runs if r.state and r.state.is_completed()), None)
        assert completed is not None, f"no completed scheduled run after {time.monotonic() - start:.0f}s:\n" + log.read_text()[-4000:]
        print(f"first scheduled run completed {time.monotonic() - start:.1f}s after `qtuning serve` started")

        assert completed.auto_scheduled  # created by the server's scheduler, not triggered
        assert deployment.schedules[0].schedule.interval.total_seconds() == 5
        assert completed.parameters["pipeline"]["tracking_uri"] == cfg.pipeline.tracking_uri  # the file's defaults
        assert Path(cfg.pipeline.tracking_uri.removeprefix("sqlite:///")).exists()  # the flow queried that store
        logs = ""
        for _ in range(15):  # the run's logs are shipped in batches, the last one maybe after its final state
            logs = " ".join(e.message for e in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[completed.id]))))
            if "ready: model=" in logs:
                break
            time.sleep(1)
        assert "ready: model=" in logs and cfg.pipeline.tracking_uri in logs


def test_a_team_set_up_work_pool_worker_and_runs_triggered_by_hand(prefect_server, background, config_file, tmp_path):
    """The README's team recipe, on one machine: a process work pool, `qtuning serve --work-pool` (registers and
    exits), a `prefect worker start`, and runs triggered with `prefect deployment run ... --params -`."""
    import subprocess

    from prefect.client.orchestration import get_client

    cfg, path = config_file
    env = {**prefect_server["env"], "PREFECT_WORKER_QUERY_SECONDS": "1"}
    prefect = str(Path(sys.executable).with_name("prefect"))

    def sh(*cmd: str, stdin: str | None = None, ok: bool = True) -> str:
        done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env, timeout=120)
        assert (done.returncode == 0) == ok, f"{' '.join(cmd)} -> {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        return done.stdout + done.stderr

    start = time.monotonic()
    sh(prefect, "work-pool", "create", "qtuning-team", "--type", "process")
    out = sh(sys.executable, "-m", "commands.serve", "--config", str(path), "--flows", "health,compare",
             "--work-pool", "qtuning-team")
    assert "registered on work pool 'qtuning-team'" in out and "prefect worker start --pool qtuning-team" in out
    background([prefect, "worker", "start", "--pool", "qtuning-team", "--limit", "1"], tmp_path / "worker.log", env)

    # A whole parameter replaced at run time (JSON on stdin): the run checks another MLflow store.
    other_store = f"sqlite:///{tmp_path}/other/mlflow.db"
    pipeline = {**cfg.pipeline.model_dump(mode="json"), "tracking_uri": other_store}
    out = sh(prefect, "deployment", "run", "health/qtuning-health", "--params", "-", stdin=json.dumps({"pipeline": pipeline}))
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)

    # The form's schema is enforced: a config the pydantic model would refuse never becomes a run.
    for value, field, reason in (('{"typo": 1}', "pipeline", "'typo' was unexpected"),
                                 ('{"num_processes": 0}', "pipeline.num_processes", "0 is less than the minimum of 1")):
        refused = sh(prefect, "deployment", "run", "health/qtuning-health", "--param", f"pipeline={value}", ok=False)
        assert f"Validation failed for field '{field}'" in refused and reason in refused, refused

    # The README's pipe: a config edited with `qtuning run --set`, sent as the compare deployment's `config`;
    # the server validates it against the form's schema. Started a day later: nothing trains here.
    edited = sh(sys.executable, "-m", "commands.run", "--config", str(path), "--set", "training.lr=1e-4", "--print-config")
    params = json.dumps({"config": yaml.safe_load(edited)})
    out = sh(prefect, "deployment", "run", "compare/qtuning-compare", "--params", "-", "--start-in", "1 day", stdin=params)
    later_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        while time.monotonic() - start < 150 and not (run.state and run.state.is_final()):
            time.sleep(2)
            run = client.read_flow_run(run_id)
        assert run.state and run.state.is_completed(), f"{run.state}\n" + (tmp_path / "worker.log").read_text()[-4000:]
        print(f"triggered run completed on the worker {time.monotonic() - start:.1f}s after the pool was created")
        assert run.parameters["pipeline"]["tracking_uri"] == other_store
        assert run.parameters["model"] == cfg.model.model_dump(mode="json")  # the rest: the deployment's defaults
        assert Path(tmp_path, "other", "mlflow.db").exists()
        later = client.read_flow_run(later_id)
        assert later.state.is_scheduled() and later.parameters["config"]["training"]["lr"] == 1e-4
        assert later.parameters["config"]["name"] == "deployed"
        client.delete_flow_run(later_id)
