"""`qtuning ui`: the MLflow UI on the store the pipeline logs to.

The store is resolved as the pipeline does (tasks/tracking.py): --tracking-uri, else $MLFLOW_TRACKING_URI,
else the repository's mlflow/mlflow.db with its artifacts/ folder. The Prefect UI comes with the Prefect
server (`prefect server start`, http://127.0.0.1:4200).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path

# Set unless the user set them: the server's job runner (7 huey worker processes, for GenAI judges and scorers
# qtuning does not use) stays off, and nothing is reported home from machines that are often offline.
MLFLOW_DEFAULTS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}

EPILOG = """\
examples:
  qtuning ui                                   # http://127.0.0.1:5000 on mlflow/mlflow.db
  qtuning ui --port 5001 --tracking-uri sqlite:////data/mlflow.db
  qtuning ui --host 0.0.0.0 -- --allowed-hosts 'gpu-box:5000'   # after --: more `mlflow server` options
"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qtuning ui", description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    ap.add_argument("--workers", type=int, default=1, help="server worker processes (default 1: enough for one team's UI)")
    ap.add_argument("--tracking-uri", metavar="URI", help="the store (default: $MLFLOW_TRACKING_URI, else mlflow/mlflow.db)")
    ap.add_argument("--experiment", default="qtuning", metavar="NAME",
                    help="the experiment to link to (pipeline.experiment_name; default qtuning)")
    ap.add_argument("--print-command", action="store_true", help="print the mlflow command and exit")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="after --: options passed on to `mlflow server`")
    return ap


def mlflow_command(uri: str, host: str, port: int, workers: int = 1, extra: list[str] | None = None) -> list[str]:
    """`mlflow server` on `uri`; for a SQLite store, new experiments keep artifacts beside it, as the pipeline's do."""
    from tasks.tracking import artifact_root  # no MLflow import: a path helper

    exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow") or "mlflow"
    cmd = [exe, "server", "--backend-store-uri", uri, "--host", host, "--port", str(port), "--workers", str(workers)]
    root = artifact_root(uri)
    if root is not None:
        cmd += ["--default-artifact-root", root]
    return cmd + list(extra or [])


def runs_url(uri: str, experiment: str, host: str, port: int) -> str:
    """The experiment's runs table. MLflow 3.17 opens in its GenAI view; `workflowType=machine_learning` (or the
    'Model training' switch, which the browser remembers) shows the runs with their metrics instead."""
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    try:
        from tasks.tracking import client

        exp = client(uri).get_experiment_by_name(experiment)  # also creates a new SQLite store's tables, before the server
    except Exception:  # a store this process cannot open: the server will say why
        exp = None
    where = f"experiments/{exp.experiment_id}/runs" if exp is not None else "experiments"
    return f"{base}/#/{where}?workflowType=machine_learning"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tasks.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    if uri.startswith(("http://", "https://", "databricks")):
        print(f"qtuning ui: the runs are on a tracking server; open {uri} in a browser")
        return 0
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    cmd = mlflow_command(uri, args.host, args.port, args.workers, extra)
    print("$ " + shlex.join(cmd), flush=True)
    if args.print_command:
        return 0
    print(f"MLflow UI: {runs_url(uri, args.experiment, args.host, args.port)}  (Ctrl-C stops it)", flush=True)
    for k, v in MLFLOW_DEFAULTS.items():
        os.environ.setdefault(k, v)
    os.execvp(cmd[0], cmd)  # the server replaces this process: signals and exit code are its own


if __name__ == "__main__":
    sys.exit(main())
