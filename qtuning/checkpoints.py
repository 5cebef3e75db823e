"""A training run's state on disk: what a resume needs (TrainState), checkpoints written atomically and
rotated, the disk-space check before each, and the resume that passes over a damaged checkpoint.

`checkpoints/step-N` holds accelerate's state (model, optimizer, scheduler, RNG of every process) and
`trainer_state.json` (TrainState). It is written as `step-N.partial` and renamed when complete, after checking
that the disk has room; older ones are deleted only then (`training.keep_checkpoints`).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

@dataclass
class TrainState:
    """Everything a resume needs beyond model/optimizer/scheduler (explicit, JSON-serialisable)."""

    step: int = 0  # optimizer steps done
    pools_done: int = 0  # global pools consumed (all processes)
    loss_tokens: int = 0  # tokens that carried loss so far
    samples_trained: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0  # steps whose kept rows carried no loss token: no optimizer or scheduler step
    nonfinite: int = 0  # rows left out of their pool for non-finite scores (pruning.on_nonfinite: exclude)
    score_seconds: float = 0.0  # stages 1-3: scoring forward, triage, token pruning
    learn_seconds: float = 0.0  # stage 4: forward/backward of the kept rows and the optimizer step
    last_loss: float = math.nan  # the last step's loss: summary.json's final_loss, also after a resume at the end
    loop_cpu_seconds: float = 0.0  # this process's CPU time in stages 1-4 (steadier than wall time on a shared CPU)
    fed_tokens: int = 0  # positions the forwards computed (scoring and training, all processes)
    fed_real_tokens: int = 0  # of which real tokens (the rest is padding)
    budget_tokens: int = 0  # pruning.budget: equal_tokens: the loss tokens Q-Tuning would have trained on these pools
    # sample: infobatch: each data set row's loss when last scored (row index -> loss), InfoBatch's score table
    seen_loss: dict[str, float] = field(default_factory=dict)


_STEP_DIR = re.compile(r"step-(\d+)")


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints (renamed from step-N.partial once written), oldest first."""
    found = [p for p in (out / "checkpoints").glob("step-*")
             if _STEP_DIR.fullmatch(p.name) and (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


class DiskSpaceError(OSError):
    """Not enough free space for the next checkpoint; the message names the folder and the bytes needed."""


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def checkpoint_bytes(out: Path, model) -> int:
    """What the next checkpoint will take: the last one's size, else parameters x 3 (weights + AdamW's two moments)."""
    if ckpts := checkpoints(out):
        return _dir_bytes(ckpts[-1])
    return 3 * sum(p.numel() * p.element_size() for p in model.parameters())


def check_free_space(folder: Path, needed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DiskSpaceError(
            f"not enough disk space for a checkpoint in {folder}: {needed:,} bytes needed, {free:,} free; "
            f"free some space (or lower training.keep_checkpoints) and resume with --resume "
            f"(the last complete checkpoint is intact)"
        )


def save_checkpoint(accelerator, out: Path, state: TrainState, keep: int, model=None) -> Path:
    """checkpoints/step-N, written as step-N.partial and renamed when complete; then the oldest beyond `keep` go."""
    # Not accelerate's ProjectConfiguration(automatic_checkpoint_naming, total_limit): its checkpoint_N folders are
    # numbered by save count, not optimizer step, written in place (a killed save leaves a folder that looks
    # complete) and rotated before the new one is known good; here a save is atomic and the last good one stays.
    root = out / "checkpoints"
    ckpt, partial = root / f"step-{state.step}", root / f"step-{state.step}.partial"
    if accelerator.is_main_process:
        for stale in root.glob("step-*.partial"):  # a save interrupted earlier
            shutil.rmtree(stale, ignore_errors=True)
        if model is not None:
            check_free_space(root, checkpoint_bytes(out, model))
    accelerator.wait_for_everyone()
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        # accelerate logs the tied weights it stores once ("Removed shared tensor ..."): above the progress bar,
        # not through it
        with logging_redirect_tqdm():
            accelerator.save_state(str(partial))
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise DiskSpaceError(f"writing the checkpoint {partial} failed ({e}); the last complete checkpoint is intact") from e
    # every process writes its own files (its RNG state; its shards under FSDP/ZeRO-3): all are done before the rename
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / "trainer_state.json").write_text(json.dumps(asdict(state)))
        if ckpt.exists():  # the same step saved again (a stop right after a periodic checkpoint, a resume at the end)
            shutil.rmtree(ckpt)
        partial.rename(ckpt)
        for old in checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return ckpt


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from: which folder, why, and what to do. `damaged`: a file of it cannot
    be read (an older checkpoint may still serve); else it was written for another model."""

    def __init__(self, ckpt: Path | str, reason: str = "", damaged: bool = False):
        super().__init__(f"checkpoint {ckpt} {reason}; remove {Path(ckpt).parent} to start afresh, or run without --resume"
                         if reason else str(ckpt))
        self.ckpt, self.reason, self.damaged = ckpt, reason, damaged


def resume_from(accelerator, ckpts: list[Path]) -> tuple[TrainState, Path]:
    """The newest checkpoint that loads; a damaged one is said and passed over for the one before it."""
    for ckpt in reversed(ckpts[1:]):
        try:
            return load_checkpoint(accelerator, ckpt), ckpt
        except CheckpointError as e:
            if not e.damaged:
                raise
            accelerator.print(f"checkpoint {ckpt} {e.reason}; resuming from the checkpoint before it")
    return load_checkpoint(accelerator, ckpts[0]), ckpts[0]  # the oldest: its error, if any, is the run's


def load_checkpoint(accelerator, ckpt: Path) -> TrainState:
    """Model, optimizer, scheduler and RNG states from `ckpt` (accelerate), and the loop's TrainState."""
    try:
        accelerator.load_state(str(ckpt))
        return TrainState(**json.loads((ckpt / "trainer_state.json").read_text()))
    except Exception as e:
        if isinstance(e, RuntimeError) and "loading state_dict" in str(e):  # torch names every key: hundreds of lines
            raise CheckpointError(ckpt, f"does not fit this model: {_mismatch(str(e))}. It was written for another model, "
                                  "or by a qtuning from before 2026-12 (whose weights were not under `model.`)") from None
        damaged = (OSError, ValueError, EOFError, TypeError, RuntimeError)  # a missing or damaged file: torch, json
        if not isinstance(e, damaged) and type(e).__module__.split(".")[0] not in ("safetensors", "pickle", "_pickle"):
            raise
        raise CheckpointError(ckpt, f"cannot be read ({type(e).__name__}: {str(e)[:300]})", damaged=True) from e


def _mismatch(message: str) -> str:
    """torch's load_state_dict error in one line: how many weights were missing, unexpected or of another shape."""
    parts = []
    for kind in ("Missing", "Unexpected"):
        m = re.search(rf"{kind} key\(s\) in state_dict: ([^\n]*)", message)
        keys = re.findall(r'"([^"]+)"', m.group(1)) if m else []
        if keys:
            parts.append(f"{len(keys)} {kind.lower()} weight(s) (e.g. {keys[0]})")
    if sizes := re.findall(r"size mismatch for ([^:]+):", message):
        parts.append(f"{len(sizes)} of another shape (e.g. {sizes[0]})")
    return "; ".join(parts) or message.splitlines()[0]
