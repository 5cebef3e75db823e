"""MLflow plumbing shared by the tasks: where the store is, explicit run ids, small logging helpers.

Every call names its run id and tracking URI (a `RunRef`); nothing relies on MLflow's thread-local active
run, which does not cross tasks, threads or the training subprocess.

Where runs go, first match wins: `pipeline.tracking_uri`, `$MLFLOW_TRACKING_URI`, else the store described
by `mlflow/tracking.yaml` (a SQLite file and an artifact folder under the repository's `mlflow/`).

Several processes may share a store: a new SQLite store is created (schema migrations) under an exclusive lock
beside it (`<db>.lock`), so two runs started at once do not race in its creation. Every run is tagged with
the host, pid and start time of the process that opened it: runs that process leaves RUNNING when it dies
(kill -9, a crash) are found by `close_orphan_runs` and ended KILLED; `close_open_runs` ends the runs a
process still has open when it is interrupted.

`qtuning ui` (commands/ui.py; mlflow/ui.sh runs it too) opens the UI on that store.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse, urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


def mlflow_dir() -> Path:
    """The folder with tracking.yaml: the repository's mlflow/, else ./mlflow (an installed package)."""
    repo = REPO_ROOT / "mlflow"
    return repo if (repo / "tracking.yaml").exists() else Path.cwd() / "mlflow"


def _store_settings() -> dict[str, str]:
    path = mlflow_dir() / "tracking.yaml"
    settings = {"backend_store": "mlflow.db", "artifact_root": "artifacts"}
    if path.exists():
        settings.update(yaml.safe_load(path.read_text()) or {})
    return settings


def default_tracking_uri() -> str:
    return "sqlite:///" + str((mlflow_dir() / _store_settings()["backend_store"]).resolve())


def resolve_tracking_uri(configured: str | None = None) -> str:
    """`configured` (pipeline.tracking_uri), else $MLFLOW_TRACKING_URI, else the repository's SQLite store; a
    user:password in it moves to the environment (`split_credentials`), so the URI every run, record, artifact,
    log line and child command line carries holds none."""
    uri, secrets = split_credentials(configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri())
    os.environ.update(secrets)  # this process's clients and every child it starts read them from there
    return uri


def split_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """(`uri` without its password, the environment variables that carry the credentials instead).

    http(s): MLflow's own MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (basic auth); postgresql: the user
    stays, the password goes to PGPASSWORD (libpq's). Another scheme's password has no variable to go to: the URI
    is kept as given, and `without_credentials` masks it wherever it is shown or stored."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri, {}
    host = parts.netloc.rsplit("@", 1)[1]
    if parts.scheme in ("http", "https"):
        bare = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
        return bare, {"MLFLOW_TRACKING_USERNAME": unquote(parts.username or ""),
                      "MLFLOW_TRACKING_PASSWORD": unquote(parts.password)}
    if parts.scheme.split("+")[0] == "postgresql":
        bare = urlunsplit((parts.scheme, f"{parts.username}@{host}", parts.path, parts.query, parts.fragment))
        return bare, {"PGPASSWORD": unquote(parts.password)}
    return uri, {}


CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")  # the user[:password]@ of any URI inside a text


def without_credentials(text: str) -> str:
    """`text` with the user:password of every URI in it replaced by *** (postgresql://u:p@host/db ->
    postgresql://***@host/db), for anything printed, logged or stored."""
    return CREDENTIALS.sub("***@", text)


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a SQLite store (artifacts/), the server's choice otherwise."""
    if uri == default_tracking_uri():
        return (mlflow_dir() / _store_settings()["artifact_root"]).resolve().as_uri()
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        db = Path(unquote(uri[len("sqlite:///") :]))
        return (db.parent / "artifacts").resolve().as_uri()
    return None


def ui_command(uri: str) -> str:
    """What to run (or open) to see `uri`'s runs, as it works when pasted: a tracking server is its own UI;
    another store gets `qtuning ui` by its full path (the virtual environment need not be active)."""
    if uri.startswith(("http://", "https://")):
        return without_credentials(uri)
    script = Path(sys.executable).with_name("qtuning")
    cmd = shlex.quote(str(script)) if script.exists() else f"{shlex.quote(sys.executable)} -m commands.cli"
    return f"{cmd} ui" + ("" if uri == default_tracking_uri() else f" --tracking-uri {shlex.quote(uri)}")


@lru_cache(maxsize=8)
def client(uri: str):
    """The MLflow client of `uri`; a SQLite store is created (or migrated) once, under a file lock beside it."""
    from mlflow import MlflowClient

    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    db = Path(unquote(uri[len("sqlite:///") :]))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes; another process waits here meanwhile
        c = MlflowClient(tracking_uri=uri)
        c.search_experiments(max_results=1)  # opens the store: creates its tables or upgrades them, once
    return c


class RunRef(BaseModel):
    """An MLflow run, by explicit id: what tasks pass each other instead of an active run."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    experiment_id: str
    tracking_uri: str
    name: str

    @property
    def client(self):
        return client(self.tracking_uri)


def experiment_id(uri: str, name: str) -> str:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=artifact_root(uri))
    except Exception:  # created meanwhile by another process
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit() -> str | None:
    """The repository's HEAD commit, with '-dirty' when tracked files differ from it; None outside git."""
    git = shutil.which("git")
    if not git or not (REPO_ROOT / ".git").exists():
        return None
    try:
        sha = subprocess.run([git, "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run([git, "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("-dirty" if dirty else "")


_OPEN: dict[str, RunRef] = {}  # runs this process created and has not ended


def process_tags(pid: int | None = None) -> dict[str, str]:
    """Who owns a run: host, pid and the process's start time (a pid reused later is another process)."""
    import psutil

    pid = os.getpid() if pid is None else pid
    return {"qtuning.host": socket.gethostname(), "qtuning.pid": str(pid),
            "qtuning.pid_started": f"{psutil.Process(pid).create_time():.2f}"}


def create_run(uri: str, experiment: str, name: str, parent: RunRef | None = None, tags: Mapping[str, str] | None = None) -> RunRef:
    """A new RUNNING run (a child of `parent` when given), tagged with the git commit, qtuning's version and the
    process that owns it (process_tags)."""
    import qtuning

    all_tags = {"qtuning.version": qtuning.__version__, "mlflow.source.name": "qtuning", **process_tags()}
    if (commit := git_commit()) is not None:
        all_tags["mlflow.source.git.commit"] = commit
        all_tags["git_commit"] = commit
    if parent is not None:
        all_tags["mlflow.parentRunId"] = parent.run_id
    all_tags.update(tags or {})
    exp_id = experiment_id(uri, experiment)
    run = client(uri).create_run(exp_id, run_name=name, tags=all_tags)
    ref = RunRef(run_id=run.info.run_id, experiment_id=exp_id, tracking_uri=uri, name=name)
    _OPEN[ref.run_id] = ref
    return ref


def end_run(ref: RunRef, status: str = "FINISHED") -> None:
    ref.client.set_terminated(ref.run_id, status)
    _OPEN.pop(ref.run_id, None)


def close_open_runs(status: str = "KILLED") -> list[RunRef]:
    """End every run this process opened and has not ended (children first): for an interrupted command."""
    closed = []
    for ref in reversed(list(_OPEN.values())):
        with contextlib.suppress(Exception):
            set_tags(ref, {"qtuning.ended_by": f"interrupted: ended {status} by its own process {os.getpid()}"})
            end_run(ref, status)
            closed.append(ref)
    return closed


def alive(pid: int, started: str | None) -> bool:
    """Is the process that opened a run still there (same pid and start time) on this host?"""
    import psutil

    try:
        proc = psutil.Process(pid)
        return started is None or abs(proc.create_time() - float(started)) < 1.0
    except (psutil.NoSuchProcess, ValueError):
        return False


def close_orphan_runs(uri: str) -> list[tuple[str, str, str]]:
    """End KILLED the runs left RUNNING by a process of this host that no longer exists (killed -9, crashed);
    returns (run id, run name, pid) of each. Runs of other hosts, and runs without the owner tags, are left alone."""
    from mlflow.entities import ViewType

    c, host = client(uri), socket.gethostname()
    experiments = [e.experiment_id for e in c.search_experiments(view_type=ViewType.ALL)]
    closed = []
    for i in range(0, len(experiments), 100):
        runs = c.search_runs(experiments[i : i + 100], filter_string=f"attributes.status = 'RUNNING' and tags.`qtuning.host` = '{host}'",
                             run_view_type=ViewType.ALL, max_results=10000)
        for run in runs:
            tags = run.data.tags
            pid = tags.get("qtuning.pid", "")
            if not pid.isdigit() or alive(int(pid), tags.get("qtuning.pid_started")):
                continue
            c.set_tag(run.info.run_id, "qtuning.ended_by", f"orphan: its process {pid} on {host} is gone")
            c.set_terminated(run.info.run_id, "KILLED")
            closed.append((run.info.run_id, run.info.run_name, pid))
    return closed


@contextlib.contextmanager
def run_status(ref: RunRef) -> Iterator[RunRef]:
    """FINISHED when the block completes, FAILED (keeping everything logged so far) when it raises, KILLED when
    it is interrupted (Ctrl-C, SIGTERM)."""
    try:
        yield ref
    except BaseException as e:
        with contextlib.suppress(Exception):
            killed = isinstance(e, (KeyboardInterrupt, SystemExit)) or type(e).__name__ == "TerminationSignal"
            end_run(ref, "KILLED" if killed else "FAILED")
        raise
    end_run(ref, "FINISHED")


# --------------------------------------------------------------------------- logging helpers
def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{'training': {'lr': 1e-4}} -> {'training.lr': 1e-4}; lists become JSON strings."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, dict)) else v
    return out


def log_params(ref: RunRef, params: Mapping[str, Any]) -> None:
    """Log params, skipping keys already logged with the same value (MLflow refuses to change a param)."""
    from mlflow.entities import Param

    existing = ref.client.get_run(ref.run_id).data.params
    items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items() if existing.get(k) != str(v)[:MAX_PARAM_CHARS]]
    for i in range(0, len(items), 100):
        ref.client.log_batch(ref.run_id, params=items[i : i + 100])


METRICS_PER_REQUEST = 500  # values per log_batch request (MLflow takes up to 1,000)


def log_metrics(ref: RunRef, metrics: Mapping[str, float], step: int | None = None, timestamp_ms: int | None = None) -> None:
    log_steps(ref, {step or 0: metrics}, timestamp_ms)


def log_steps(ref: RunRef, steps: Mapping[int, Mapping[str, float]], timestamp_ms: int | None = None) -> None:
    """The metrics of several steps ({step: {key: value}}) in as few requests as the batch size allows: a replayed
    history of 2,000 steps is a hundred requests, not 2,000."""
    import time

    from mlflow.entities import Metric

    ts = timestamp_ms or int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step) for step, metrics in steps.items() for k, v in metrics.items() if v is not None]
    for i in range(0, len(items), METRICS_PER_REQUEST):
        ref.client.log_batch(ref.run_id, metrics=items[i : i + METRICS_PER_REQUEST])


def set_tags(ref: RunRef, tags: Mapping[str, Any]) -> None:
    from mlflow.entities import RunTag

    ref.client.log_batch(ref.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_artifact(ref: RunRef, path: str | Path, artifact_path: str | None = None) -> None:
    path = Path(path)
    if path.is_dir():
        ref.client.log_artifacts(ref.run_id, str(path), artifact_path)
    else:
        ref.client.log_artifact(ref.run_id, str(path), artifact_path)


def log_text(ref: RunRef, text: str, artifact_file: str) -> None:
    ref.client.log_text(ref.run_id, text, artifact_file)


def log_config(ref: RunRef, cfg: BaseModel, artifact_file: str, prefix: str = "") -> None:
    """The config as params (flattened dotted keys) and as the YAML file it round-trips through."""
    from qtuning.config import dump_yaml

    log_params(ref, {k: without_credentials(v) if isinstance(v, str) else v for k, v in flatten(cfg, prefix).items()})
    log_text(ref, without_credentials(dump_yaml(cfg)), artifact_file)


def log_dataset(ref: RunRef, df, name: str, source: str, context: str, digest: str | None = None) -> None:
    """A table (pandas) as an MLflow dataset input of the run, with its source and a context tag."""
    import warnings

    import mlflow.data
    from mlflow.entities import Dataset, DatasetInput, InputTag

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = mlflow.data.from_pandas(df, source=source, name=name, digest=digest[:36] if digest else None)
        entity = Dataset(**ds.to_dict())  # the documented entity of a dataset's dict (name, digest, source, schema, ...)
    ref.client.log_inputs(ref.run_id, datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])])


# --------------------------------------------------------------------------- MLflow's fluent API, on an existing run
FLUENT_URI_LOCK = threading.Lock()  # MLflow's fluent API reads one process-wide tracking URI


@contextlib.contextmanager
def fluent_run(ref: RunRef, log_system_metrics: bool = False) -> Iterator[None]:
    """`mlflow.start_run(run_id=...)` on an existing run, for the documented functions that log to the active run
    only (system metrics, `mlflow.transformers.log_model`). The active run is thread-local: call this in the
    thread that needs it (system metrics use a dedicated one). MLflow's process-wide tracking URI is set to the
    run's for the start and the end (every other call here names its URI explicitly). The run stays RUNNING: its
    end belongs to `run_status`."""
    import mlflow

    with FLUENT_URI_LOCK:
        mlflow.set_tracking_uri(ref.tracking_uri)
        mlflow.start_run(run_id=ref.run_id, log_system_metrics=log_system_metrics)
    try:
        yield
    finally:
        with FLUENT_URI_LOCK:
            mlflow.set_tracking_uri(ref.tracking_uri)
            mlflow.end_run(status="RUNNING")  # stops the system metrics monitor; the run's status is left as it was


@contextlib.contextmanager
def system_metrics(ref: RunRef | None, interval_s: float = 5.0) -> Iterator[None]:
    """MLflow's system metrics (CPU, memory, GPU when present) sampled into `ref` while the block runs, by the public
    `mlflow.start_run(run_id=..., log_system_metrics=True)` in a dedicated thread (its active run stays there)."""
    if ref is None:
        yield
        return
    import logging

    import mlflow.system_metrics

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    mlflow.system_metrics.set_system_metrics_sampling_interval(interval_s)
    started, stop = threading.Event(), threading.Event()

    def monitor() -> None:
        try:
            with fluent_run(ref, log_system_metrics=True):
                started.set()
                stop.wait()
        finally:
            started.set()

    thread = threading.Thread(target=monitor, name=f"system-metrics-{ref.run_id[:8]}", daemon=True)
    thread.start()
    started.wait(timeout=60)
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=60)


def ui_url(ref: RunRef) -> str:
    """Where a person opens the run: its page in the MLflow UI when the store is a server, else the store's file."""
    if ref.tracking_uri.startswith(("http://", "https://")):
        return f"{ref.tracking_uri.rstrip('/')}/#/experiments/{ref.experiment_id}/runs/{ref.run_id}"
    if ref.tracking_uri.startswith("sqlite:///"):
        return Path(unquote(ref.tracking_uri[len("sqlite:///") :])).resolve().as_uri()
    return ref.tracking_uri


def artifact_location(ref: RunRef, path: str) -> str:
    """An artifact of the run as a person can open it: its URL in the UI (server stores), else its file URI."""
    if ref.tracking_uri.startswith(("http://", "https://")):
        return f"{ui_url(ref)}/artifacts/{path}"
    root = ref.client.get_run(ref.run_id).info.artifact_uri
    return f"{root.rstrip('/')}/{path}"


def metric_steps(ref: RunRef, key: str) -> set[int]:
    """Steps at which `key` was already logged in the run (to replay a metrics file without duplicates)."""
    return {m.step for m in ref.client.get_metric_history(ref.run_id, key)}


def tmp_artifact(ref: RunRef, name: str, writer) -> None:
    """Write a file with `writer(path)` in a temporary folder and log it under its name."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / Path(name).name
        writer(path)
        ref.client.log_artifact(ref.run_id, str(path), str(Path(name).parent) if Path(name).parent != Path(".") else None)
