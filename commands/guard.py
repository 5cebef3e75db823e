"""The guard of a pipeline command: `python -m commands.guard PID TRACKING_URI`, started by commands.lifecycle.

It polls the command's process every second and remembers its descendants. When the command is gone without
stopping them (kill -9, an out-of-memory kill), it stops those that are still running (trainers get SIGTERM
and save a checkpoint at their step boundary; Prefect's temporary server), then ends the MLflow runs the
command left RUNNING as KILLED. When the command ends normally there is nothing left to do.
"""

from __future__ import annotations

import sys
import time

TRAINER_GRACE_S = 60.0  # a stopped trainer finishes its step and saves a checkpoint


def main(argv: list[str] | None = None) -> int:
    import psutil

    argv = list(sys.argv[1:] if argv is None else argv)
    pid, uri = int(argv[0]), argv[1]
    try:
        watched = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return 0
    me = psutil.Process().pid
    seen: list[psutil.Process] = []
    while True:
        try:
            if not watched.is_running() or watched.status() == psutil.STATUS_ZOMBIE:
                break
            seen = [p for p in watched.children(recursive=True) if p.pid != me]
        except psutil.NoSuchProcess:
            break
        time.sleep(1.0)
    left = [p for p in seen if p.is_running()]  # is_running also checks the start time: a reused pid is not ours
    if left:
        from commands.lifecycle import stop_children

        stop_children(procs=left, grace_s=TRAINER_GRACE_S)
    from tasks.tracking import close_orphan_runs

    for run_id, name, run_pid in close_orphan_runs(uri):
        print(f"qtuning guard: MLflow run {name} ({run_id}) of process {run_pid}, which is gone: ended KILLED", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
