"""`qtuning` command line: one entry point, each subcommand in its own module (imported on use).

    qtuning assets            fetch the embedded model and data into the cache (idempotent)
    qtuning train --config F  one training run (same as python -m qtuning.train)
    qtuning run               compare full-data SFT with Q-Tuning on the embedded default
    qtuning sweep FILE        a grid of pruning budgets/methods/seeds, full-data baseline included
    qtuning serve             the flows as scheduled Prefect deployments
    qtuning ui                the MLflow UI on the project's store
    qtuning bench             time full-data vs pruned epochs, measure scoring memory
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line help); each module has main(argv) -> int
COMMANDS: dict[str, tuple[str, str]] = {
    "assets": ("qtuning.assets", "fetch the embedded model and data into the cache (idempotent)"),
    "train": ("qtuning.train", "one training run from an ExperimentConfig YAML"),
    "run": ("qtuning.run_cli", "run a comparison (default: full data vs Q-Tuning 25%x50% on the embedded default)"),
    "sweep": ("qtuning.sweep_cli", "run a grid of arms (and seeds) from a SweepConfig YAML as one flow"),
    "serve": ("qtuning.serve_cli", "serve the flows as Prefect deployments on a schedule"),
    "ui": ("qtuning.ui_cli", "start the MLflow UI on the project's tracking store"),
    "bench": ("qtuning.bench", "time full-data, Q-Tuning and Random epochs; scoring peak memory"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<8} {text}")
        print("\n`qtuning COMMAND --help` documents each command's options.")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"qtuning: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
