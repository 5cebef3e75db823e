"""What a pipeline command does around its flow so that nothing is lost and nobody is confused.

Before Prefect is imported or any server or model starts:

- `check_data`: the training rows of a local file are read and validated (qtuning.data.load_rows, no tokenizer,
  no model): a bad row, a file that is not UTF-8 or an empty file is reported once, in seconds, with its file,
  row and field, and the command exits 2 like a config error, with nothing created in MLflow.

Then `guard_run`:

- runs left RUNNING on the store by processes of this host that no longer exist (killed -9, crashed,
  interrupted) are ended KILLED, and Prefect flow runs they left RUNNING are set CRASHED (tasks/flow_runs), and
  said so;
- a guard process watches this one: if it is killed outright, the guard stops what it had started (the
  trainers, Prefect's temporary server) and ends its MLflow runs KILLED;
- SIGINT (a terminal's Ctrl-C, which also reaches Prefect's temporary server) and SIGTERM end this process's
  open MLflow runs KILLED through the MLflow client, stop the trainers (each saves a checkpoint at its step
  boundary) and the temporary server, and exit 130/143 within seconds, without waiting for a Prefect API that
  may be gone. A signal that lands inside a write to the store (whose SQLite lock that suspended write holds)
  is taken again 50 ms later, for up to 2 s; then the runs are left to the guard, which outlives this process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from qtuning.config import DATA_PRESETS, DataConfig

EXIT_BAD_INPUT = 2  # config and data errors alike


def check_data(data: DataConfig, prog: str) -> int | None:
    """Validate a local data file's rows now; returns an exit code to stop with, or None when they are fine."""
    path = Path(data.source).expanduser()
    if data.source in DATA_PRESETS or not path.exists():  # presets are fetched (and known good); hub sets download later
        return None
    from qtuning.data import DataError, load_rows

    try:
        rows = load_rows(data)
    except DataError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if rows.skipped:
        print(f"{prog}: {sum(rows.skipped.values())} bad row(s) skipped (data.on_bad_row: skip): {rows.skipped}", file=sys.stderr)
    return None


def check_work_pool(pipeline, prog: str) -> int | None:
    """With pipeline.work_pool: the server and the pool's experiment deployment checked now (tasks/fanout.py); an
    exit code to stop with, naming what to run, or None when the arms can be submitted (or run here)."""
    if not pipeline.work_pool:
        return None
    from qtuning.config import ConfigError
    from tasks.fanout import check_pool

    try:
        check_pool(pipeline)
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return None


def guard_command(pid: int, uri: str) -> list[str]:
    """The guard's command line. `-m` would put the working directory first on sys.path, and a `commands.py`
    or `tasks.py` there would run instead of ours; -P (Python 3.11+) leaves it out."""
    safe = ["-P"] if sys.version_info >= (3, 11) else []
    return [sys.executable, *safe, "-m", "commands.guard", str(pid), uri]


def guard_run(tracking_uri: str | None, prog: str) -> str:
    """Close orphaned runs, start the guard process and install the SIGINT/SIGTERM handlers (module docstring).
    Returns the tracking URI without credentials (they are in this process's environment now)."""
    from tasks.tracking import close_orphan_runs, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    try:
        closed = close_orphan_runs(uri)
    except Exception as e:  # an unreachable store fails the run soon enough, with its own message
        print(f"{prog}: could not check {uri} for orphaned runs: {e}", file=sys.stderr)
        closed = []
    for run_id, name, pid in closed:
        print(f"{prog}: MLflow run {name} ({run_id}) was left RUNNING by process {pid}, which is gone: ended KILLED",
              file=sys.stderr)
    from tasks.flow_runs import close_orphan_flow_runs

    try:  # starts Prefect's temporary server when no PREFECT_API_URL is set: the flow would start it next anyway
        crashed = close_orphan_flow_runs()
    except Exception as e:  # an unreachable Prefect API fails the flow soon enough, with its own message
        print(f"{prog}: could not check Prefect for orphaned flow runs: {e}", file=sys.stderr)
        crashed = []
    for run_id, name, pid in crashed:
        print(f"{prog}: Prefect flow run {name} ({run_id}) was left RUNNING by process {pid}, which is gone: set CRASHED",
              file=sys.stderr)
    from tasks.flow_runs import close_runs_of_ended_flow_runs

    try:  # any host's: a worker machine that died, its flow runs set CRASHED by the heartbeat automation
        ended = close_runs_of_ended_flow_runs(uri)
    except Exception as e:
        print(f"{prog}: could not check the MLflow runs of ended flow runs: {e}", file=sys.stderr)
        ended = []
    for run_id, name, state in ended:
        print(f"{prog}: MLflow run {name} ({run_id}) was RUNNING, but its Prefect flow run is {state}: ended",
              file=sys.stderr)
    guard = subprocess.Popen(guard_command(os.getpid(), uri), start_new_session=True,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    first_signal: list[float] = []

    def interrupted(signum, frame):
        import time

        # The handler runs in the main thread, between two bytecodes of whatever it was doing, which is often a
        # write to the tracking store (the metrics it streams each second). Inside that call a SQLite store's write
        # lock may be held by the very transaction the signal suspended: the handler's own writes would wait for it
        # until they timed out (20 s each). So it comes back every 50 ms until the main thread is out of the store;
        # after 2 s it leaves the runs to the guard, which ends them KILLED once this process is gone.
        first_signal[:] = first_signal or [time.monotonic()]
        in_store = in_store_call(frame)
        if in_store and time.monotonic() < first_signal[0] + 2.0:
            threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
            return
        signal.signal(signal.SIGINT, lambda *a: os._exit(128 + signum))  # a second Ctrl-C: leave at once
        name = signal.Signals(signum).name
        print(f"\n{prog}: {name}: ending the open MLflow runs KILLED and stopping the training", file=sys.stderr, flush=True)
        from tasks.tracking import close_open_runs
        from tasks.training import stop_trainers

        if in_store:
            print(f"{prog}: this process is inside a write to the tracking store: its guard ends the runs KILLED once "
                  "it is gone", file=sys.stderr, flush=True)
        else:
            for ref in close_open_runs("KILLED"):
                print(f"{prog}: MLflow run {ref.name} ({ref.run_id}) ended KILLED", file=sys.stderr, flush=True)
        if n := stop_trainers():
            print(f"{prog}: stopped {n} training process group(s); rerun to resume from the last checkpoint",
                  file=sys.stderr, flush=True)
        stop_children(spare=guard.pid)  # the guard ends what this process could not
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(128 + signum)  # not through Prefect's engine: its temporary server may be gone already

    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)  # Prefect's own SIGTERM bridge re-sends the signal here when done
    return uri


def in_store_call(frame) -> bool:
    """Is `frame` (the one a signal interrupted) inside a call to a tracking store (MLflow's SQLAlchemy store)?"""
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith(("sqlalchemy.", "mlflow.store.")):
            return True
        frame = frame.f_back
    return False


def stop_children(pid: int | None = None, grace_s: float = 5.0, procs=None, spare: int | None = None) -> None:
    """Stop the descendants of `pid` (default: this process), e.g. Prefect's temporary server, or `procs`: SIGTERM
    (trainers first, launchers left to end with them: tasks.processes), SIGKILL after grace. `spare`: a pid left
    running."""
    import psutil

    from tasks.processes import stop_processes

    if procs is None:
        procs = [p for p in psutil.Process(pid or os.getpid()).children(recursive=True) if p.pid != spare]
    stop_processes(procs, grace_s)
