"""`qtuning serve`: serve the experiment, compare (and sweep) flows as Prefect deployments on a schedule.

Needs a running Prefect server (`prefect server start`) and `PREFECT_API_URL` pointing at it. Default
parameters come from a CompareConfig YAML (as for `qtuning run --config`); the Prefect UI shows them as a
form. This process executes the runs (`limit` at a time) until stopped; the logic is in flows/deploy.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qtuning.config import CompareConfig, load_yaml

EPILOG = """\
examples:
  prefect server start &                                   # UI and API on http://127.0.0.1:4200
  export PREFECT_API_URL=http://127.0.0.1:4200/api
  qtuning serve --config compare.yaml --cron "0 3 * * *"   # every night at 03:00 (--timezone to set its zone)
  qtuning serve --interval 3600 --flows compare            # hourly, the embedded default comparison
  qtuning serve --flows experiment,compare                 # no schedule: runs only when triggered
  qtuning serve --config compare.yaml --dry-run            # print the deployments and exit

trigger a run by hand (the deployment's defaults, or a whole config in place of them):
  prefect deployment run 'compare/qtuning-compare'
  qtuning run --config compare.yaml --set training.lr=1e-4 --print-config \\
    | python -c 'import json,sys,yaml; print(json.dumps({"config": yaml.safe_load(sys.stdin)}))' \\
    | prefect deployment run 'compare/qtuning-compare' --params -
A parameter given at run time replaces that whole parameter (config), it is not merged field by field.

a team: deployments on a work pool, runs on workers (each with this package installed and the assets fetched):
  prefect work-pool create qtuning --type process
  qtuning serve --config compare.yaml --cron "0 3 * * *" --work-pool qtuning    # registers and exits
  prefect worker start --pool qtuning --limit 1                                  # on every training machine
"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="qtuning serve", description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", metavar="FILE", help="CompareConfig YAML: the default parameters (built-in defaults without it)")
    when = ap.add_mutually_exclusive_group()
    when.add_argument("--cron", metavar="EXPR", help='cron schedule, e.g. "0 3 * * *" (none: runs only when triggered)')
    when.add_argument("--interval", type=float, metavar="SECONDS", help="interval schedule in seconds")
    ap.add_argument("--timezone", metavar="TZ", help="IANA time zone of the schedule, e.g. Europe/Berlin (default UTC)")
    ap.add_argument("--flows", metavar="NAMES",
                    help="comma-separated flows to serve from experiment, compare, sweep, health "
                         "(default: experiment,compare and sweep where flows/sweep.py exists)")
    ap.add_argument("--sweep-config", metavar="FILE", help="the sweep flow's config YAML (its default parameters)")
    ap.add_argument("--limit", type=int, default=1, metavar="N",
                    help="flow runs this process executes at once; the rest wait (default 1: one training at a time)")
    ap.add_argument("--paused", action="store_true", help="register the schedules paused (resume them in the UI)")
    ap.add_argument("--dry-run", action="store_true", help="build the deployments, print them and exit (no server needed)")
    pool = ap.add_argument_group("a team's set-up: a work pool and workers instead of this process")
    pool.add_argument("--work-pool", metavar="NAME",
                      help="register the deployments on this work pool and exit; `prefect worker start --pool NAME` runs them")
    pool.add_argument("--source", metavar="DIR_OR_GIT_URL",
                      help="where workers get the code (--work-pool): a checkout every worker sees at the same path, "
                           "or a git URL (default: this checkout)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.interval is not None and args.interval <= 0:
        print(f"--interval: must be > 0 seconds (got {args.interval:g})", file=sys.stderr)
        return 2
    if args.source and not args.work_pool:
        print("--source: only with --work-pool (a served deployment runs this checkout)", file=sys.stderr)
        return 2
    if args.limit < 1:
        print(f"--limit: must be >= 1 (got {args.limit})", file=sys.stderr)
        return 2
    try:
        config = load_yaml(CompareConfig, args.config) if args.config else CompareConfig()
        from flows import deploy  # Prefect loads only now (qtuning itself never imports it)

        names = deploy.resolve_flow_names([n.strip() for n in args.flows.split(",") if n.strip()] if args.flows else None)
        source = (args.source or str(Path(deploy.__file__).resolve().parents[1])) if args.work_pool else None
        deployments = deploy.build_deployments(names, config, cron=args.cron, interval=args.interval, timezone=args.timezone,
                                               sweep_config=args.sweep_config, paused=args.paused, source=source)
        print("qtuning serve: deployments\n" + deploy.describe(deployments), flush=True)
        if args.dry_run:
            return 0
        url = deploy.check_server()
        from tasks.flow_runs import ensure_heartbeat_automation

        ensure_heartbeat_automation()  # runs whose process or machine stops reporting are set CRASHED by the server
        if args.work_pool:
            deploy.deploy_to_pool(deployments, args.work_pool)
            print(f"registered on work pool {args.work_pool!r} at {url} (code from {source}); run them with:\n"
                  f"  prefect worker start --pool {args.work_pool}")
            return 0
    except ValueError as e:  # ConfigError, or a schedule prefect refuses (a bad cron expression or time zone)
        print(f"qtuning serve: {e}", file=sys.stderr)
        return 2
    print(f"serving on {url} (Ctrl-C stops; the schedules are paused on exit)", flush=True)
    deploy.serve(deployments, limit=args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
