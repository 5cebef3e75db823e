"""`qtuning runs --close-orphans`: close the runs left RUNNING by processes of this host that are gone.

A `qtuning run` or `qtuning sweep` killed outright (kill -9, out of memory) cannot close its MLflow runs; its guard
process does, and the next run on the store checks again at start. Its Prefect flow runs (also an interrupted
one's: a Ctrl-C stops Prefect's temporary server too) are set CRASHED by the next run at start. This command does
both on demand: MLflow runs end KILLED, Prefect flow runs and their open task runs are set CRASHED. On any host, an
MLflow run whose Prefect flow run ended without completing (a dead worker machine's, set CRASHED by the server's
heartbeat automation: `qtuning serve` creates it) is ended too.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="qtuning runs", description=__doc__.split("\n\n")[0])
    ap.add_argument("--close-orphans", action="store_true", help="close the MLflow and Prefect runs whose process is gone (this host)")
    ap.add_argument("--tracking-uri", metavar="URI", help="the store (default: $MLFLOW_TRACKING_URI, else mlflow/mlflow.db)")
    args = ap.parse_args(argv)
    if not args.close_orphans:
        ap.print_help()
        return 2
    from tasks.tracking import close_orphan_runs, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    closed = close_orphan_runs(uri)
    for run_id, name, pid in closed:
        print(f"{name} ({run_id}): left RUNNING by process {pid}, which is gone: ended KILLED")
    print(f"{len(closed)} orphaned run(s) closed in {uri}")
    from commands.settings import apply_prefect_defaults

    apply_prefect_defaults()
    from tasks.flow_runs import close_orphan_flow_runs

    crashed = close_orphan_flow_runs()
    for run_id, name, pid in crashed:
        print(f"Prefect flow run {name} ({run_id}): left RUNNING by process {pid}, which is gone: set CRASHED")
    print(f"{len(crashed)} orphaned Prefect flow run(s) closed")
    from tasks.flow_runs import close_runs_of_ended_flow_runs

    ended = close_runs_of_ended_flow_runs(uri)  # any host: e.g. a dead worker's, set CRASHED by the heartbeat automation
    for run_id, name, state in ended:
        print(f"{name} ({run_id}): RUNNING, but its Prefect flow run is {state}: ended")
    print(f"{len(ended)} MLflow run(s) of ended flow runs closed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
