"""`qtuning ui`: the MLflow UI on the store the pipeline logs to.

The store is resolved as the pipeline does (tasks/tracking.py): --tracking-uri, else $MLFLOW_TRACKING_URI,
else the repository's mlflow/mlflow.db with its artifacts/ folder. The Prefect UI comes with the Prefect
server (`prefect server start`, http://127.0.0.1:4200).

Beyond loopback (--host 0.0.0.0) the server lets in whoever reaches it, so it needs --auth (MLflow's basic-auth
app: every request carries a user and password; the admin account is made on first start from
$MLFLOW_AUTH_ADMIN_USERNAME, default admin, and $MLFLOW_AUTH_ADMIN_PASSWORD) or, with an authenticating proxy in
front, --no-auth. Secrets travel by environment only, never on the command line.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

# Set unless the user set them: the server's job runner (7 huey worker processes, for GenAI judges and scorers
# qtuning does not use) stays off, and nothing is reported home from machines that are often offline.
MLFLOW_DEFAULTS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}

EPILOG = """\
examples:
  qtuning ui                                   # http://127.0.0.1:5000 on mlflow/mlflow.db
  qtuning ui --port 5001 --tracking-uri sqlite:////data/mlflow.db
  MLFLOW_AUTH_ADMIN_PASSWORD=... qtuning ui --host 0.0.0.0 --auth -- --allowed-hosts 'gpu-box:5000'
                                               # after --: more `mlflow server` options
  clients: MLFLOW_TRACKING_URI=http://gpu-box:5000 MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=...
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
    ap.add_argument("--auth", action="store_true",
                    help="MLflow's basic-auth app (needs mlflow[auth]): users and permissions in --auth-db; the admin is "
                    "created on first start from $MLFLOW_AUTH_ADMIN_USERNAME (default admin) and $MLFLOW_AUTH_ADMIN_PASSWORD")
    ap.add_argument("--auth-db", metavar="URI", help="where --auth keeps users and permissions (default: the store's own "
                    "database, in tables of their own)")
    ap.add_argument("--no-auth", action="store_true",
                    help="listen beyond loopback without authentication (only behind an authenticating proxy)")
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


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def auth_problem(uri: str, auth_db: str | None) -> str | None:
    """Why `--auth` cannot start on `uri`, with the fix; None when it can."""
    db = auth_db or uri
    if not db.startswith(("sqlite:", "postgresql", "mysql", "mssql")):
        return (f"--auth keeps users in a SQL database, and {uri!r} is not one: pass --auth-db URI "
                "(e.g. sqlite:////srv/mlflow/auth.db or postgresql://mlflow@DBHOST/mlflow)")
    if importlib.util.find_spec("flask_wtf") is None:  # MLflow's basic-auth app needs it for CSRF
        return "--auth needs MLflow's auth extra: pip install 'mlflow[auth]' (or -e '.[team]')"
    return None


def auth_environment(uri: str, auth_db: str | None, state: Path) -> dict[str, str]:
    """The environment of an authenticating `mlflow server --app-name basic-auth`: its config file (written to
    `state`, a private folder; no secret in it: the admin's password is read from the environment), and a CSRF
    key made here unless the operator set one (several servers behind one name must share theirs)."""
    import secrets

    ini = state / "basic_auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = {auth_db or uri}\n"
                   f"admin_username = {os.environ.get('MLFLOW_AUTH_ADMIN_USERNAME') or 'admin'}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(ini)}
    if not os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_hex(32)
    return env


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
    if args.host not in LOOPBACK and not (args.auth or args.no_auth):
        print(f"qtuning ui: --host {args.host} lets other machines in, and nothing would ask them who they are: add "
              "--auth (with MLFLOW_AUTH_ADMIN_PASSWORD set), or --no-auth if an authenticating proxy stands in front",
              file=sys.stderr)
        return 2
    if args.auth:
        if problem := auth_problem(uri, args.auth_db):
            print(f"qtuning ui: {problem}", file=sys.stderr)
            return 2
        extra = ["--app-name", "basic-auth", *extra]
    cmd = mlflow_command(uri, args.host, args.port, args.workers, extra)
    print("$ " + shlex.join(cmd), flush=True)
    if args.print_command:
        return 0
    if args.auth:
        os.environ.update(auth_environment(uri, args.auth_db, Path(tempfile.mkdtemp(prefix="qtuning-mlflow-auth-"))))
    print(f"MLflow UI: {runs_url(uri, args.experiment, args.host, args.port)}  (Ctrl-C stops it)", flush=True)
    for k, v in MLFLOW_DEFAULTS.items():
        os.environ.setdefault(k, v)
    os.execvp(cmd[0], cmd)  # the server replaces this process: signals and exit code are its own


if __name__ == "__main__":
    sys.exit(main())
