"""`qtuning run`: compare full-data SFT with pruned arms, end to end, and print the comparison table.

With no arguments it runs the embedded default (SmolLM2-135M-Instruct, a slice of the ShareGPT preset,
full data vs Q-Tuning 25%x50%, a slice of each of the five benchmarks) in about 4 minutes on a
2-core CPU. Options and a YAML config (`CompareConfig`) scale it up; on a GPU training runs in bf16.
Every stage is a cached Prefect task and everything is logged to MLflow (`MLFLOW_TRACKING_URI` honoured).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from qtuning.config import CompareConfig, ConfigError, load_yaml, parse_overrides, validate, with_overrides

EPILOG = """\
examples:
  qtuning run                                  # the embedded default, ~4 min on 2 CPU cores
  qtuning run --json out.json                  # also write the table as JSON (for scripts)
  qtuning run --config compare.yaml            # a CompareConfig YAML (see --print-config)
  qtuning run --rows 2000 --max-length 1024 --epochs 2 --eval-limit 300 --zero-shot   # paper-like, on a GPU
  qtuning run --arm random-25x50=random/random/0.25/0.5 --arm qt-static=qtuning/qtuning/0.25/0.5/static
  qtuning run --set training.lr=1e-4 pipeline.num_processes=2

Precedence: built-in defaults < --config < options < --set. Repeating a run reuses every cached stage
(data, EU scores, plans, checkpoints, evaluations) whose inputs did not change; MLflow gets a new parent
run each time. Open the UI with the command printed at the end (or mlflow/ui.sh).
"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="qtuning run",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", metavar="FILE", help="CompareConfig YAML; options below override it")
    ap.add_argument("--json", metavar="FILE", help="write {parent_run_id, arms: [{name, scores, <benchmark>..., average, "
                    "ratio_to_full, loss_tokens, loop_seconds}]} to FILE")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")

    g = ap.add_argument_group("model and data")
    g.add_argument("--model", metavar="NAME", help="model.name: the bundled model, a local folder or a hub id")
    g.add_argument("--lora", action="store_true", help="model.finetune: lora (adapters merged after training)")
    g.add_argument("--data", metavar="SOURCE", help="data.source: a preset (sharegpt, arc), a .jsonl/.json/.parquet file or a hub id")
    g.add_argument("--rows", type=int, metavar="N", help="data.limit: training rows (after a seeded shuffle)")
    g.add_argument("--max-length", type=int, metavar="N", help="data.max_length: tokens per sample")

    g = ap.add_argument_group("training (shared by every arm)")
    g.add_argument("--epochs", type=float, metavar="F", help="training.epochs")
    g.add_argument("--max-steps", type=int, metavar="N", help="training.max_steps")
    g.add_argument("--lr", type=float, metavar="F", help="training.lr")
    g.add_argument("--micro-batch-size", type=int, metavar="N", help="training.micro_batch_size (the EU-plane pool by default)")

    g = ap.add_argument_group("arms")
    g.add_argument("--sample-ratio", type=float, metavar="F", help="pruning.sample_ratio of every pruned arm")
    g.add_argument("--token-ratio", type=float, metavar="F", help="pruning.token_ratio of every pruned arm with a token rule")
    g.add_argument("--arm", action="append", default=[], metavar="NAME=SAMPLE/TOKEN/RS/RT[/static]",
                   help="add an arm, e.g. random-25x50=random/random/0.25/0.5 (repeatable)")
    g.add_argument("--only-arms", nargs="+", metavar="NAME", help="keep only these arms (the full-data baseline is required)")

    g = ap.add_argument_group("evaluation")
    g.add_argument("--eval-limit", type=int, metavar="N", help="evaluation.limit: items per benchmark")
    g.add_argument("--tasks", nargs="+", metavar="TASK", help="evaluation.tasks: qt_* tasks, lm-eval task names or YAML paths")
    g.add_argument("--zero-shot", action="store_true", help="pipeline.zero_shot: also evaluate the untrained model")

    g = ap.add_argument_group("pipeline")
    g.add_argument("--runs-dir", metavar="DIR", help="pipeline.runs_dir: where stage outputs and checkpoints go")
    g.add_argument("--num-processes", type=int, metavar="N", help="pipeline.num_processes: training processes (accelerate)")
    g.add_argument("--launcher", choices=["accelerate", "python"], help="pipeline.launcher")
    g.add_argument("--tracking-uri", metavar="URI", help="pipeline.tracking_uri (default: $MLFLOW_TRACKING_URI, else mlflow/mlflow.db)")
    g.add_argument("--experiment", metavar="NAME", help="pipeline.experiment_name: the MLflow experiment")
    g.add_argument("--name", help="comparison name (the MLflow parent run)")
    g.add_argument("--no-progress", action="store_true", help="pipeline.progress: false (logs only, no bars)")
    g.add_argument("--work-pool", metavar="POOL", help="pipeline.work_pool: train the arms in parallel as runs of the "
                   "experiment deployment on this Prefect work pool (`qtuning serve --work-pool POOL --flows experiment`)")
    g.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="dotted overrides of the config, e.g. training.lr=1e-4 pipeline.zero_shot=true")
    return ap


def parse_arm(spec: str) -> dict[str, Any]:
    """'NAME=SAMPLE/TOKEN/RS/RT[/static]' -> an ArmConfig dict."""
    name, sep, rest = spec.partition("=")
    parts = rest.split("/")
    if not sep or len(parts) not in (4, 5) or (len(parts) == 5 and parts[4] not in ("static", "dynamic")):
        raise ConfigError(f"--arm {spec!r}: expected NAME=SAMPLE/TOKEN/RS/RT[/static], e.g. random-25x50=random/random/0.25/0.5")
    try:
        ratios = float(parts[2]), float(parts[3])
    except ValueError:
        raise ConfigError(f"--arm {spec!r}: RS and RT must be numbers, got {parts[2]!r} and {parts[3]!r}") from None
    return {"name": name, "mode": parts[4] if len(parts) == 5 else "dynamic",
            "pruning": {"sample": parts[0], "token": parts[1], "sample_ratio": ratios[0], "token_ratio": ratios[1]}}


def build_config(args: argparse.Namespace) -> CompareConfig:
    """Defaults < --config < options < --set; one ConfigError lists every problem."""
    cfg = load_yaml(CompareConfig, args.config) if args.config else CompareConfig()
    raw = cfg.model_dump(mode="json")
    sections = {
        "model": {"name": args.model, "finetune": "lora" if args.lora else None},
        "data": {"source": args.data, "limit": args.rows, "max_length": args.max_length},
        "training": {"epochs": args.epochs, "max_steps": args.max_steps, "lr": args.lr, "micro_batch_size": args.micro_batch_size},
        "evaluation": {"limit": args.eval_limit, "tasks": args.tasks},
        "pipeline": {"runs_dir": args.runs_dir, "num_processes": args.num_processes, "launcher": args.launcher,
                     "tracking_uri": args.tracking_uri, "experiment_name": args.experiment,
                     "zero_shot": True if args.zero_shot else None, "progress": False if args.no_progress else None,
                     "work_pool": args.work_pool},
    }
    for section, values in sections.items():
        raw[section].update({k: v for k, v in values.items() if v is not None})
    if args.name:
        raw["name"] = args.name
    for arm in raw["arms"]:
        p = arm["pruning"]
        if p["sample"] != "all" and args.sample_ratio is not None:
            p["sample_ratio"] = args.sample_ratio
        if p["token"] != "all" and args.token_ratio is not None:
            p["token_ratio"] = args.token_ratio
    raw["arms"] += [parse_arm(s) for s in args.arm]
    if args.only_arms:
        unknown = set(args.only_arms) - {a["name"] for a in raw["arms"]}
        if unknown:
            raise ConfigError(f"--only-arms: unknown arm(s) {', '.join(sorted(unknown))}; arms: {', '.join(a['name'] for a in raw['arms'])}")
        raw["arms"] = [a for a in raw["arms"] if a["name"] in args.only_arms]
    cfg = validate(CompareConfig, raw, args.config or "qtuning run options")
    if args.set:
        cfg = with_overrides(cfg, parse_overrides(args.set))
    return cfg


def result_json(result) -> dict[str, Any]:
    """The --json document: the parent run and one entry per arm."""
    return {
        "name": result.name,
        "parent_run_id": result.parent_run_id,
        "experiment_id": result.experiment_id,
        "tracking_uri": result.tracking_uri,
        "arms": result.arms,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = build_config(args)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    from commands.lifecycle import check_data, check_work_pool, guard_run

    if (code := check_data(cfg.data, "qtuning run")) is not None:  # before Prefect, a server or a model
        return code

    from commands.settings import apply_prefect_defaults

    apply_prefect_defaults()
    from flows.compare import compare  # Prefect and MLflow load only now
    from tasks.flow_runs import owned_by_this_process
    from tasks.tracking import without_credentials

    if (code := check_work_pool(cfg.pipeline, "qtuning run")) is not None:  # the pool's deployment, before any work
        return code
    uri = guard_run(cfg.pipeline.tracking_uri, "qtuning run")  # orphaned runs closed; Ctrl-C, SIGTERM, kill -9 handled
    if cfg.pipeline.tracking_uri:  # a password in it is in the environment now: no flow parameter carries it
        cfg = with_overrides(cfg, {"pipeline.tracking_uri": uri})
    start = time.perf_counter()
    print(f"qtuning run: {cfg.name}: {', '.join(a.name for a in cfg.arms)} on {cfg.model.name}, "
          f"{cfg.data.limit or 'all'} rows of {cfg.data.source}, eval limit {cfg.evaluation.limit}", flush=True)
    with owned_by_this_process():  # an interrupted run's flow runs are closed by the next (tasks/flow_runs)
        result = compare(cfg)
    minutes = (time.perf_counter() - start) / 60
    print()
    print(result.table)
    print()
    print(f"finished in {minutes:.1f} min; MLflow parent run {result.parent_run_id} ({without_credentials(result.tracking_uri)})")
    print(f"open the MLflow UI:  {result.ui_command}")
    if args.json:
        Path(args.json).write_text(json.dumps(result_json(result), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
