"""`qtuning` command line: one entry point, each subcommand in its own module (imported on use).

    qtuning assets            fetch the embedded model and data into the cache (idempotent)
    qtuning train --config F  one training run (same as python -m qtuning.train)
    qtuning bench             time full-data vs pruned epochs, measure scoring memory
    qtuning doctor            check this machine: every CPU/GPU path once, one table (first command on a new GPU machine)
    qtuning run               compare full-data SFT with Q-Tuning on the embedded default
    qtuning sweep FILE        a grid of pruning budgets/methods/seeds, full-data baseline included
    qtuning serve             the flows as scheduled Prefect deployments
    qtuning ui                the MLflow UI on the project's store
    qtuning runs --close-orphans   end KILLED the MLflow runs left RUNNING by processes that are gone

The first four are the library's own entry points (qtuning/); the others drive the pipeline (flows/, tasks/)
and need its extra: pip install 'qtuning[pipeline]'.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys

PIPELINE_PACKAGES = ("prefect", "mlflow", "lm_eval")

# subcommand -> (module, needs the pipeline extra, one-line help); each module has main(argv) -> int
COMMANDS: dict[str, tuple[str, bool, str]] = {
    "assets": ("qtuning.assets", False, "fetch the embedded model and data into the cache (idempotent)"),
    "train": ("qtuning.train_cli", False, "one training run from an ExperimentConfig YAML"),
    "bench": ("qtuning.bench", False, "time full-data, Q-Tuning and Random epochs; scoring peak memory"),
    "doctor": ("qtuning.doctor", False, "check this machine: every CPU/GPU path once, one table (first command on a new GPU machine)"),
    "run": ("commands.run", True, "run a comparison (default: full data vs Q-Tuning 25%x50% on the embedded default)"),
    "sweep": ("commands.sweep", True, "run a grid of arms (and seeds) from a SweepConfig YAML as one flow"),
    "serve": ("commands.serve", True, "serve the flows as Prefect deployments on a schedule"),
    "ui": ("commands.ui", True, "start the MLflow UI on the project's tracking store"),
    "runs": ("commands.runs", True, "runs --close-orphans: end KILLED the MLflow runs whose process is gone"),
}


def usage() -> str:
    """The commands, once each, then what needs the pipeline extra."""
    lines = ["usage: qtuning COMMAND [options]   (qtuning COMMAND --help: its options; qtuning --version)", "", "commands:"]
    lines += [f"  {name:<8} {text}" for name, (_, _, text) in COMMANDS.items()]
    library = [name for name, (_, pipeline, _) in COMMANDS.items() if not pipeline]
    lines += ["", f"{', '.join(library)} are the library's own; the others drive the Prefect/MLflow pipeline and need "
              "its extra: pip install 'qtuning[pipeline]'."]
    return "\n".join(lines)


def missing_pipeline_packages() -> list[str]:
    """The pipeline extra's packages that are not installed (without importing them)."""
    return [p for p in PIPELINE_PACKAGES if importlib.util.find_spec(p) is None]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        print(f"qtuning {importlib.metadata.version('qtuning')}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"qtuning: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, pipeline, _ = COMMANDS[name]
    if pipeline and (missing := missing_pipeline_packages()):
        print(f"qtuning {name} drives the Prefect/MLflow pipeline, which is not installed ({', '.join(missing)} missing); "
              "install it with: pip install 'qtuning[pipeline]'", file=sys.stderr)
        return 2
    module = importlib.import_module(module_name)
    return int(module.main(rest) or 0)


USAGE = usage()

if __name__ == "__main__":
    sys.exit(main())
