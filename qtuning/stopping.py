"""Stopping a training run cleanly: a signal (SIGTERM, SIGINT) or the death of the process that started it
($QTUNING_PARENT_PID) ends the loop at the next step boundary; one process then keeps that step in a checkpoint,
writes no final model and raises TrainingStopped (exit code 128 + signal)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

from qtuning.checkpoints import TrainState, checkpoints, save_checkpoint

class StopRequest:
    """Why the loop should stop at the next step boundary: a signal (SIGTERM, SIGINT) or the death of the process
    that started training ($QTUNING_PARENT_PID, so a killed pipeline never leaves a trainer running)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.reason = ""

    def __bool__(self) -> bool:
        return self.signum is not None

    def request(self, signum: int, reason: str) -> None:
        if self.signum is None:
            self.signum, self.reason = signum, reason

    def install(self) -> None:
        """Handle SIGTERM/SIGINT and watch $QTUNING_PARENT_PID. A SIGINT after the first request interrupts at once
        (a second Ctrl-C); a repeated SIGTERM does not: launchers pass their own SIGTERM on to a trainer that
        is already stopping (accelerate launch does), and it must still reach its step boundary and save."""

        def handler(signum, frame):
            if self and signum == signal.SIGINT:  # asked again from a terminal: stop now
                raise KeyboardInterrupt
            if self:
                return
            self.request(signum, signal.Signals(signum).name)
            print(f"qtuning.train: {self.reason}: stopping at the next step boundary", file=sys.stderr, flush=True)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)
        if pid := os.environ.get("QTUNING_PARENT_PID"):
            threading.Thread(target=self._watch, args=(int(pid),), daemon=True, name="parent-watch").start()

    def _watch(self, pid: int, every_s: float = 1.0) -> None:
        import psutil

        try:
            parent = psutil.Process(pid)
        except psutil.NoSuchProcess:
            parent = None
        while not self:
            try:
                gone = parent is None or not parent.is_running() or parent.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                gone = True
            if gone:  # killed outright (kill -9): nobody will read our output or stop us
                self.request(signal.SIGTERM, f"the process that started training ({pid}) is gone")
                print(f"qtuning.train: {self.reason}: stopping at the next step boundary", file=sys.stderr, flush=True)
                return
            time.sleep(every_s)


class TrainingStopped(Exception):
    """The loop stopped early on request (signal, parent gone); `signum` gives the exit code 128 + signum."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def stop_early(accelerator, out: Path, state: TrainState, keep: int, model, save: bool, stop: StopRequest) -> None:
    """The loop was asked to stop: keep this step in a checkpoint (one process: every rank is at the same step
    only when they share one signal, which a lone process always does) and raise TrainingStopped."""
    where = ""
    if state.step == 0:  # nothing trained yet: no checkpoint to keep
        where = "; no step had completed, so no checkpoint was written (a rerun starts from the beginning)"
    elif save and accelerator.num_processes == 1 and not (out / "checkpoints" / f"step-{state.step}").exists():
        where = f"; checkpoint {save_checkpoint(accelerator, out, state, keep, model)}"
    elif ckpts := checkpoints(out):
        where = f"; last checkpoint {ckpts[-1]}"
    accelerator.end_training()
    raise TrainingStopped(f"stopped at step {state.step} ({stop.reason}), no final model written{where}; "
                          "continue with --resume", stop.signum or signal.SIGTERM)
