"""Training as a subprocess (`accelerate launch -m qtuning.train --data DIR`), streamed into Prefect and MLflow.

The subprocess reads the data set `prepare_data` wrote (no second tokenization). The run folder is named by the
cache key, so a retry (or a later flow run after a crash) finds the same folder and resumes from its last
complete checkpoint with `--resume`. While the subprocess runs, its output goes to the Prefect log (progress
lines throttled) and each new line of `metrics.jsonl` goes to the arm's MLflow run as that step's metrics. The
cached record is valid while the folder's manifest (final model, summary, metrics; checkpoints left out) holds.

The launcher and its trainer(s) run in their own session (process group): stopping the task (an exception,
Ctrl-C, SIGTERM) stops the whole group, so no trainer outlives the launcher: the trainers get SIGTERM, stop at
a step boundary, save a checkpoint and exit, and the launcher ends with them (stop_processes); whatever is
left after STOP_GRACE_S is killed. The trainer also watches this process ($QTUNING_PARENT_PID) and
stops the same way when it is killed outright (kill -9).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.runtime import flow_run

from qtuning.config import ExperimentConfig, PipelineConfig
from qtuning.data import file_sha256
from tasks.processes import LAUNCHER, stop_processes
from tasks.records import DataRecord, TrainRecord
from tasks.stage import model_fingerprint, recipe, runs_root, stage
from tasks.tracking import (METRICS_PER_REQUEST, RunRef, log_artifact, log_metrics, log_params, log_steps, metric_steps, set_tags,
                            system_metrics)

_PROGRESS = re.compile(r"\d+%\|")  # a tqdm bar line
PROGRESS_LOG_SECONDS = 15.0  # at most one progress line per this many seconds in the Prefect log


def _ingredients(config: ExperimentConfig, data: DataRecord, run: RunRef | None, pipeline: PipelineConfig) -> dict:
    acc_cfg = config.training.accelerate_config
    return {
        # the run's name and folder are cosmetic: equal recipes share one training (a sweep's baseline, a rerun)
        "config": recipe(config),
        "data": data.fingerprint,
        "model": model_fingerprint(config.model),
        "world": pipeline.num_processes,
        "launcher": pipeline.launcher,
        "accelerate_config": file_sha256(acc_cfg) if acc_cfg else None,
    }


def output_dir(config: ExperimentConfig, data: DataRecord, run: RunRef | None, pipeline: PipelineConfig, *, key: str) -> Path:
    """runs/train/<name>-<key>; the key ignores the name, so a folder of an equal recipe under another name
    (a finished one first) is the same training and is reused."""
    root = runs_root(pipeline.runs_dir) / "train"
    own = root / f"{config.name}-{key[:12]}"
    if own.exists():
        return own
    others = sorted(root.glob(f"*-{key[:12]}"), key=lambda p: not (p / "summary.json").exists())
    return others[0] if others else own


def launch_command(run_yaml: Path, config: ExperimentConfig, pipeline: PipelineConfig, resume: bool, data: Path | None = None) -> list[str]:
    """`accelerate launch ... -m qtuning.train --config RUN.yaml [--data DIR] [--resume]` (or plain python), this interpreter.

    With training.accelerate_config the file decides what the pipeline leaves unset (num_processes always: the file's
    wins); the machine fields the pipeline sets (num_machines, machine_rank, main_process_ip, main_process_port) are
    passed and win over the file's (machine_flags)."""
    if pipeline.launcher == "python":
        cmd = [sys.executable, "-m", "qtuning.train"]
    else:
        # each process its share of the cores: left unset, accelerate gives a CPU process one thread (OMP_NUM_THREADS=1)
        cmd = [sys.executable, "-m", LAUNCHER, "--num_cpu_threads_per_process", str(cpu_share(pipeline))]
        if config.training.accelerate_config:
            cmd += ["--config_file", config.training.accelerate_config]
        else:
            cmd += ["--num_processes", str(pipeline.num_processes),
                    "--mixed_precision", "no", "--dynamo_backend", "no"]  # qtuning.train picks its precision itself
            if pipeline.num_processes > 1:
                cmd.append("--multi_gpu")
        cmd += machine_flags(config, pipeline)
        cmd += ["-m", "qtuning.train"]
    cmd += ["--config", str(run_yaml)]
    if data is not None:
        cmd += ["--data", str(data)]
    if resume:
        cmd.append("--resume")
    if not pipeline.progress:
        cmd.append("--no-progress")
    return cmd


MACHINE_FIELDS = ("num_machines", "machine_rank", "main_process_ip", "main_process_port")  # pipeline = accelerate names


def accelerate_file(config: ExperimentConfig) -> dict:
    """training.accelerate_config's settings (YAML or JSON, as accelerate reads it); {} without one."""
    import yaml

    path = config.training.accelerate_config
    if not path:
        return {}
    text = Path(path).expanduser().read_text()
    return (json.loads(text) if path.endswith(".json") else yaml.safe_load(text)) or {}


def machine_flags(config: ExperimentConfig, pipeline: PipelineConfig) -> list[str]:
    """`--num_machines N [--machine_rank R] [--main_process_ip IP] [--main_process_port P]`: the pipeline's machine
    fields that are set (without an accelerate config, --num_machines is always given: 1 by default). Refuses, before
    anything starts, a launch whose settings (the pipeline's over the file's) cannot meet: a rank beyond the
    machines, several machines without machine 0's address, processes that do not split evenly over the machines."""
    file = accelerate_file(config)
    given = {k: getattr(pipeline, k) for k in MACHINE_FIELDS if getattr(pipeline, k) is not None}
    if not file:
        given = {"num_machines": 1, **given}
    want = {"num_machines": 1, "machine_rank": 0, **{k: file[k] for k in MACHINE_FIELDS if file.get(k) is not None}, **given}
    machines, rank = int(want["num_machines"]), int(want["machine_rank"])
    processes = int(file.get("num_processes") or pipeline.num_processes) if file else pipeline.num_processes
    where = f" (training.accelerate_config {config.training.accelerate_config} and pipeline)" if file else ""
    problems = []
    if rank >= machines:
        problems.append(f"machine_rank {rank} with num_machines {machines}{where}: ranks run from 0 to {machines - 1}; "
                        "set pipeline.machine_rank and pipeline.num_machines")
    if machines > 1 and not want.get("main_process_ip"):
        problems.append(f"num_machines {machines} needs machine 0's address: set pipeline.main_process_ip")
    if machines > 1 and (processes < machines or processes % machines):
        problems.append(f"{processes} process(es) over {machines} machines{where}: num_processes counts the processes "
                        "of all machines, the same number on each; use a multiple of num_machines")
    if problems:
        raise ValueError("; ".join(problems))
    return [arg for k, v in given.items() for arg in (f"--{k}", str(v))]


def cpu_share(pipeline: PipelineConfig) -> int:
    """Cores this process may use (its affinity, not the machine's count), divided among the training processes of
    this machine (pipeline.num_processes counts those of every machine)."""
    per_machine = max(1, pipeline.num_processes // (pipeline.num_machines or 1))
    return max(1, len(os.sched_getaffinity(0)) // per_machine)


def launch_env(run: RunRef | None, pipeline: PipelineConfig) -> dict[str, str]:
    import torch

    # PYTHONSAFEPATH (3.11+): `-m` leaves the working directory off sys.path, so a user's qtuning.py, or an
    # accelerate.py, there cannot replace the modules the launch names
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", QTUNING_PARENT_PID=str(os.getpid()),
               PYTHONSAFEPATH="1")
    if run is not None:  # for anything in the child that logs to MLflow (e.g. an accelerate tracker)
        env.update(MLFLOW_RUN_ID=run.run_id, MLFLOW_TRACKING_URI=run.tracking_uri)
    if not torch.cuda.is_available():
        # DDP over gloo on CPU. Set for every launch, not only pipeline.num_processes > 1: accelerate's torchrun
        # launch (several processes, also a training.accelerate_config's) does not set it, and without it each
        # process finds no device backend, takes itself for the only one and trains alone into the same folder
        env["ACCELERATE_USE_CPU"] = "true"
        if pipeline.num_processes // (pipeline.num_machines or 1) > 1:
            env["OMP_NUM_THREADS"] = str(cpu_share(pipeline))  # the same share as --num_cpu_threads_per_process
    return env


_LIVE: set[subprocess.Popen] = set()  # training process groups this process started and has not reaped
STOP_GRACE_S = 60.0  # how long a stopped trainer may take to reach a step boundary and save its checkpoint


def stop_group(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """Stop the launcher's process group (stop_processes: the trainers first), then SIGKILL anything still in it."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    stop_processes(children, grace_s, leader=proc)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything started after the look above (the leader is not reaped yet)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10.0)
    _LIVE.discard(proc)


def stop_trainers(grace_s: float = STOP_GRACE_S) -> int:
    """Stop every training this process started and is still running (for a command's Ctrl-C handler)."""
    procs = list(_LIVE)
    for proc in procs:
        stop_group(proc, grace_s)
    return len(procs)


def has_checkpoint(out: Path) -> bool:
    return any(p.name[5:].isdigit() and (p / "trainer_state.json").exists() for p in (out / "checkpoints").glob("step-*"))


@stage("train", ingredients=_ingredients, folder=output_dir, resumable=True, packages=("torch", "transformers", "accelerate", "peft"),
       exclude=lambda rel: rel.startswith("checkpoints/"), retries=1, retry_delay_seconds=2)
def train_arm(config: ExperimentConfig, data: DataRecord, run: RunRef | None, pipeline: PipelineConfig, *, out: Path, key: str) -> TrainRecord:
    """Train one arm on the prepared data set in a subprocess; stream its log and per-step metrics; return the checkpoint."""
    log = get_run_logger()
    start = time.perf_counter()
    cfg = config.model_copy(update={"training": config.training.model_copy(update={"output_dir": str(out)})})
    run_yaml = cfg.save(out / "run.yaml")
    resume = has_checkpoint(out)
    cmd = launch_command(run_yaml, cfg, pipeline, resume, data=Path(data.path))
    log.info(("resuming from the last checkpoint: " if resume else "") + " ".join(cmd))

    tail: deque[str] = deque(maxlen=40)
    # its own session: a terminal's Ctrl-C reaches this process only, which stops the whole group (finally below)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=launch_env(run, pipeline),
                            start_new_session=True)
    _LIVE.add(proc)
    # in this task's context: its run logger then sends to the Prefect API this task uses (settings are
    # context-local: a bare thread would fall back to the environment's, or start a temporary server of its own)
    reader = threading.Thread(target=contextvars.copy_context().run, args=(_stream, proc, log, tail, pipeline.progress),
                              daemon=True)
    reader.start()
    logged = metric_steps(run, "train/loss") if run else set()
    metrics_file = out / "metrics.jsonl"
    progress = TrainingProgress(cfg, data, pipeline) if TaskRunContext.get() else None  # artifacts belong to a run
    try:
        with system_metrics(run):
            while proc.poll() is None:
                time.sleep(1.0)
                if run:
                    _sync_metrics(run, metrics_file, logged, progress.update if progress else None)
    finally:  # interrupted (Ctrl-C, SIGTERM, a Prefect timeout): stop the launcher and its trainers, all of them
        if proc.poll() is None:
            log.warning(f"{config.name}: stopping the training process group {proc.pid}")
            stop_group(proc)
        _LIVE.discard(proc)
    reader.join(timeout=10)
    if run:
        _sync_metrics(run, metrics_file, logged)
    if proc.returncode != 0:
        raise RuntimeError(f"training {config.name} exited with code {proc.returncode}; last output:\n" + "\n".join(tail))
    summary = json.loads((out / "summary.json").read_text())
    wall = time.perf_counter() - start
    log.info(f"{config.name}: {summary['optimizer_steps']} steps, final loss {summary['final_loss']:.4f}, "
             f"{summary['loss_tokens']:,} loss tokens, {summary['loop_seconds']:.1f}s in the loop, {wall:.1f}s wall")
    return TrainRecord(
        key=key, produced_in=flow_run.id, name=config.name, output_dir=str(out), final_dir=str(out / "final"),
        config_path=str(out / "config.yaml"), metrics_path=str(metrics_file), summary=summary,
        wall_seconds=wall, resumed=resume,
    )


def _stream(proc: subprocess.Popen, log, tail: deque, echo_progress: bool) -> None:
    """Child output -> Prefect log, line by line; tqdm redraws ('\\r') are throttled, and echoed live to a terminal."""
    show_bar = echo_progress and sys.stderr.isatty()
    last_progress, pending = 0.0, ""
    buf = b""
    assert proc.stdout is not None
    while chunk := proc.stdout.read1(4096):
        buf += chunk
        *parts, buf = re.split(rb"[\r\n]", buf)
        for raw in parts:
            line = raw.decode("utf-8", "replace").rstrip()
            if not line:
                continue
            tail.append(line)
            if _PROGRESS.search(line):
                if show_bar:
                    sys.stderr.write("\r" + line[:200])
                    sys.stderr.flush()
                pending = line
                if time.monotonic() - last_progress >= PROGRESS_LOG_SECONDS:
                    log.info(line)
                    last_progress, pending = time.monotonic(), ""
            else:
                if show_bar:
                    sys.stderr.write("\n")
                log.info(line)
    if pending:
        log.info(pending)
    if show_bar:
        sys.stderr.write("\n")


class TrainingProgress:
    """A Prefect progress artifact of the training, from 0 to 100% of its optimizer steps, updated as metrics.jsonl
    grows (prefect.artifacts.create_progress_artifact / update_progress_artifact)."""

    def __init__(self, cfg: ExperimentConfig, data: DataRecord, pipeline: PipelineConfig):
        from prefect.artifacts import create_progress_artifact

        from qtuning.train import plan_steps
        from tasks.selection import prefect_key

        rows = data.rows
        if cfg.data.subset:  # a static arm trains on the kept ids only
            rows = sum(1 for line in Path(cfg.data.subset).read_text().splitlines() if line.strip())
        self.total = max(1, plan_steps(rows, cfg, pipeline.num_processes)[2])
        self.done = 0
        self.id = create_progress_artifact(progress=0.0, key=prefect_key("training", cfg.name),
                                           description=f"{cfg.name}: optimizer steps done of {self.total}")

    def update(self, step: int) -> None:
        from prefect.artifacts import update_progress_artifact

        if step > self.done:
            self.done = step
            update_progress_artifact(self.id, progress=100.0 * min(step, self.total) / self.total)


def _sync_metrics(run: RunRef, path: Path, logged: set[int], on_step=None) -> None:
    """Log the steps of metrics.jsonl that the run does not have yet (live during training, or a replay), whole
    steps batched into as few requests as the batch size allows (a cached arm's history replayed into a new run
    was a request a step: 14 s for 40 steps on a team's server); `on_step` hears the last step logged."""
    # Not accelerate's MLflow tracker in the trainer: qtuning imports no MLflow (issue 6), a trainer on a worker
    # may not reach the tracking server, and the file replays a cached or resumed run into a new MLflow run.
    if not path.exists():
        return
    batches: list[dict[int, dict[str, float]]] = [{}]
    values = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        step = int(row.pop("step"))
        if step in logged:
            continue
        metrics = {k: v for k, v in row.items() if isinstance(v, (int, float))}
        if batches[-1] and values + len(metrics) > METRICS_PER_REQUEST:
            batches.append({})
            values = 0
        batches[-1][step] = metrics
        values += len(metrics)
    for batch in filter(None, batches):
        log_steps(run, batch)
        logged.update(batch)  # a batch that fails is sent again at the next look, none of it twice
        if on_step is not None:
            on_step(max(batch))


@task(name="log_training", cache_policy=NO_CACHE)
def log_training(run: RunRef, record: TrainRecord) -> None:
    """Checkpoint location, summary and run files; the per-step metrics too when they came from the cache."""
    _sync_metrics(run, Path(record.metrics_path), metric_steps(run, "train/loss"))
    s = record.summary
    set_tags(run, {"checkpoint": record.final_dir, "output_dir": record.output_dir,
                   "qtuning.train.cached": str(record.produced_in != flow_run.id).lower()})
    log_params(run, {"checkpoint": record.final_dir, "train.world_size": s.get("world_size")})
    log_metrics(run, {
        "summary/optimizer_steps": s["optimizer_steps"], "summary/final_loss": s["final_loss"],
        "summary/loss_tokens": s["loss_tokens"], "summary/samples_trained": s["samples_trained"],
        "summary/loop_seconds": s["loop_seconds"], "summary/score_seconds": s["score_seconds"],
        "summary/learn_seconds": s["learn_seconds"], "summary/wall_seconds": s["wall_seconds"],
        "summary/task_seconds": record.wall_seconds,
        **{f"summary/{k}": s[k] for k in ("heldout_loss", "heldout_ppl", "heldout_rows") if k in s},
    })
    for name in ("config.yaml", "summary.json", "metrics.jsonl"):
        path = Path(record.output_dir) / name
        if path.exists():
            log_artifact(run, path, "training")
