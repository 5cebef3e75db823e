"""`qtuning sweep FILE`: run a SweepConfig (grid or list of arms, several seeds) as one Prefect flow.

The full-data baseline is always included and trained once per seed (through the cache, also across sweeps
that share it). A sweep interrupted halfway and started again redoes only what is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from qtuning.config import ConfigError, SweepConfig, load_yaml, parse_overrides, with_overrides


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="qtuning sweep", description=__doc__.split("\n\n")[0],
                                 epilog="example sweep files: configs/sweeps/*.yaml")
    ap.add_argument("config", metavar="FILE", help="SweepConfig YAML")
    ap.add_argument("--json", metavar="FILE", help="write {parent_run_id, arms: [aggregated rows], runs: [(arm, seed) rows]}")
    ap.add_argument("--list", action="store_true", help="print the arms and seeds the sweep would run, and exit")
    ap.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI (pipeline.tracking_uri); default: "
                    "$MLFLOW_TRACKING_URI, else the project's store under mlflow/")
    ap.add_argument("--work-pool", metavar="POOL", help="pipeline.work_pool: train the (seed, arm) runs in parallel as "
                    "runs of the experiment deployment on this Prefect work pool")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="dotted overrides of the sweep file, applied last, e.g. training.epochs=2 evaluation.limit=50")
    args = ap.parse_args(argv)
    try:
        cfg = load_yaml(SweepConfig, args.config)
        overrides = parse_overrides(args.set)
        if args.tracking_uri:
            overrides = {"pipeline.tracking_uri": args.tracking_uri, **overrides}
        if args.work_pool:
            overrides = {"pipeline.work_pool": args.work_pool, **overrides}
        if overrides:
            cfg = with_overrides(cfg, overrides)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    arms = cfg.arms()
    print(f"qtuning sweep: {cfg.name}: {len(arms)} arms x {len(cfg.seeds)} seed(s) = {len(arms) * len(cfg.seeds)} runs")
    for a in arms:
        p = a.pruning
        print(f"  {a.name:<40} {p.sample}/{p.token} r_s={p.sample_ratio:g} r_t={p.token_ratio:g} lam={p.lam:g} {a.mode}")
    if args.list:
        return 0
    from commands.lifecycle import check_data, check_work_pool, guard_run

    if (code := check_data(cfg.data, "qtuning sweep")) is not None:  # before Prefect, a server or a model
        return code

    from commands.settings import apply_prefect_defaults

    apply_prefect_defaults()  # Prefect's start-up settings, then the flow
    from flows.sweep import sweep
    from tasks.flow_runs import owned_by_this_process

    if (code := check_work_pool(cfg.pipeline, "qtuning sweep")) is not None:  # the pool's deployment, before any work
        return code
    uri = guard_run(cfg.pipeline.tracking_uri, "qtuning sweep")
    if cfg.pipeline.tracking_uri:  # a password in it is in the environment now: no flow parameter carries it
        cfg = with_overrides(cfg, {"pipeline.tracking_uri": uri})

    start = time.perf_counter()
    with owned_by_this_process():  # an interrupted run's flow runs are closed by the next (tasks/flow_runs)
        result = sweep(cfg)
    print()
    print(result.table)
    print(f"\nfinished in {(time.perf_counter() - start) / 60:.1f} min; MLflow parent run {result.parent_run_id}")
    print(f"open the MLflow UI:  {result.ui_command}")
    if args.json:
        Path(args.json).write_text(json.dumps(result.model_dump(), indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
