"""`qtuning train` and `python -m qtuning.train`: the command line of one training run (the loop: qtuning.train).

Its options are parsed before torch, transformers and datasets load, so `--help` and a bad option answer at
once. Every error is one line and exit 2 (a config, data or device problem, named with its fix), as in
`qtuning run`, `sweep` and `serve`; a stop by signal exits 128+signal after its checkpoint; a disk or
checkpoint failure exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys

DESCRIPTION = "One Q-Tuning training run (score, triage, prune, step) from an ExperimentConfig YAML."
EPILOG = """\
examples:
  qtuning train --config configs/smoke-cpu.yaml
  qtuning train --config run.yaml --set pruning.sample_ratio=0.5 training.lr=1e-4
  accelerate launch -m qtuning.train --config run.yaml      # DDP / FSDP / DeepSpeed via accelerate
  qtuning train --config run.yaml --resume                  # continue from the last checkpoint
"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qtuning train", description=DESCRIPTION, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="ExperimentConfig YAML")
    ap.add_argument("--data", metavar="DIR", help="the tokenized data set (SFTData.save) the config's data section describes; "
                    "default: read and tokenize data.source here")
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint in training.output_dir")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides, e.g. pruning.sample_ratio=0.5")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from qtuning.config import ConfigError, ExperimentConfig, load_yaml, parse_overrides, with_overrides

    try:
        cfg = load_yaml(ExperimentConfig, args.config)
        if args.set:
            cfg = with_overrides(cfg, parse_overrides(args.set))
    except ConfigError as e:
        print(f"qtuning train: {e}", file=sys.stderr)
        return 2
    from qtuning import train as loop  # torch, transformers and datasets load only now
    from qtuning.checkpoints import CheckpointError, DiskSpaceError
    from qtuning.data import DataError, SFTData
    from qtuning.stopping import StopRequest, TrainingStopped

    stop = StopRequest()
    stop.install()
    try:
        data = SFTData.load(args.data) if args.data else None
        summary = loop.train(cfg, data=data, resume=args.resume, progress=not args.no_progress, stop=stop)
    except (ConfigError, DataError) as e:  # refused before anything trained: what to change, in one line
        print(f"qtuning train: {e}", file=sys.stderr, flush=True)
        return 2
    except TrainingStopped as e:
        print(f"qtuning train: {e}", file=sys.stderr, flush=True)
        return 128 + e.signum
    except (DiskSpaceError, CheckpointError) as e:
        print(f"qtuning train: {e}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
