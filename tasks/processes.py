"""Stopping what a pipeline started: trainers first, so each saves its checkpoint; their launchers end with them.

Only the standard library and psutil: the guard process (commands.guard) imports this without loading Prefect.
"""

from __future__ import annotations

import contextlib
import subprocess
import time

LAUNCHER = "accelerate.commands.launch"  # launch_command's module: how a launcher is told from its trainers


def _is_launcher(p) -> bool:
    import psutil

    try:
        return LAUNCHER in p.cmdline()
    except psutil.Error:
        return False


def stop_processes(procs: list, grace_s: float, leader: subprocess.Popen | None = None) -> None:
    """Stop these processes (psutil.Process; `leader`: a child of ours, reaped through its Popen) and wait up to
    `grace_s` for them to end; SIGKILL whatever is left.

    Trainers get SIGTERM and stop at their step boundary, saving a checkpoint. A launcher with a child is not
    signalled: `accelerate launch` answers SIGTERM by terminating its child and killing it 5 s later (accelerate
    1.16), which a step and its checkpoint outlast on a slow machine or a large model; it ends by itself when
    its trainers have. A launcher that has not started its trainer yet has nothing to lose and is signalled."""
    import psutil

    if leader is not None:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs = [psutil.Process(leader.pid), *procs]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if not (_is_launcher(p) and p.children()):
                p.terminate()

    def running(p) -> bool:
        if leader is not None and p.pid == leader.pid:
            return leader.poll() is None
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + grace_s
    while (alive := [p for p in procs if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
