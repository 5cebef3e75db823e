"""Training as a subprocess (`accelerate launch -m qtuning.train`), streamed into Prefect and MLflow.

The run folder is named by the cache key, so a retry (or a later flow run after a crash) finds the same
folder and resumes from its last complete checkpoint with `--resume`. While the subprocess runs, its
output goes to the Prefect log (progress lines throttled) and each new line of `metrics.jsonl` goes to the
arm's MLflow run as that step's metrics. The cached record is valid only while `final/` still exists.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from qtuning.config import ExperimentConfig, PipelineConfig
from tasks.caching import TRAIN_MODULES, StageCache, file_fingerprint, model_fingerprint, runs_root, source_fingerprint, stage_key
from tasks.records import TrainRecord
from tasks.tracking import RunRef, log_artifact, log_metrics, log_params, metric_steps, set_tags, system_metrics

_PROGRESS = re.compile(r"\d+%\|")  # a tqdm bar line
PROGRESS_LOG_SECONDS = 15.0  # at most one progress line per this many seconds in the Prefect log


def _ingredients(config: ExperimentConfig, run: RunRef | None, pipeline: PipelineConfig) -> dict:
    acc_cfg = config.training.accelerate_config
    return {
        # the run's name and folder are cosmetic: equal recipes share one training (a sweep's baseline, a rerun)
        "config": config.model_copy(update={"name": "", "training": config.training.model_copy(update={"output_dir": ""})}),
        "data": source_fingerprint(config.data),
        "model": model_fingerprint(config.model),
        "world": pipeline.num_processes,
        "accelerate_config": file_fingerprint(acc_cfg) if acc_cfg else None,
        "runs": str(runs_root(pipeline.runs_dir)),
    }


def output_dir(config: ExperimentConfig, pipeline: PipelineConfig, key: str) -> Path:
    """runs/train/<name>-<key>; the key ignores the name, so a folder of an equal recipe under another name
    (a finished one first) is the same training and is reused."""
    root = runs_root(pipeline.runs_dir) / "train"
    own = root / f"{config.name}-{key[:12]}"
    if own.exists():
        return own
    others = sorted(root.glob(f"*-{key[:12]}"), key=lambda p: not (p / "summary.json").exists())
    return others[0] if others else own


def _outputs(config, run, pipeline, key) -> list[Path]:
    out = output_dir(config, pipeline, key)
    return [out / "final" / "config.json", out / "summary.json"]


CACHE = StageCache(ingredients=_ingredients, modules=TRAIN_MODULES, packages=("torch", "transformers", "accelerate", "peft"), outputs=_outputs)


def launch_command(run_yaml: Path, config: ExperimentConfig, pipeline: PipelineConfig, resume: bool) -> list[str]:
    """`accelerate launch ... -m qtuning.train --config RUN.yaml [--resume]` (or plain python), this interpreter."""
    if pipeline.launcher == "python":
        cmd = [sys.executable, "-m", "qtuning.train"]
    else:
        # each process its share of the cores: left unset, accelerate gives a CPU process one thread (OMP_NUM_THREADS=1)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_cpu_threads_per_process", str(cpu_share(pipeline))]
        if config.training.accelerate_config:
            cmd += ["--config_file", config.training.accelerate_config]
        else:
            cmd += ["--num_processes", str(pipeline.num_processes), "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no"]  # qtuning.train picks its precision itself
            if pipeline.num_processes > 1:
                cmd.append("--multi_gpu")
        cmd += ["-m", "qtuning.train"]
    cmd += ["--config", str(run_yaml)]
    if resume:
        cmd.append("--resume")
    if not pipeline.progress:
        cmd.append("--no-progress")
    return cmd


def cpu_share(pipeline: PipelineConfig) -> int:
    """Cores this process may use (its affinity, not the machine's count), divided among the training processes."""
    return max(1, len(os.sched_getaffinity(0)) // pipeline.num_processes)


def launch_env(run: RunRef | None, pipeline: PipelineConfig) -> dict[str, str]:
    import torch

    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if run is not None:  # for anything in the child that logs to MLflow (e.g. an accelerate tracker)
        env.update(MLFLOW_RUN_ID=run.run_id, MLFLOW_TRACKING_URI=run.tracking_uri)
    if pipeline.num_processes > 1 and not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"  # DDP over gloo on CPU
        env["OMP_NUM_THREADS"] = str(cpu_share(pipeline))  # the same share as --num_cpu_threads_per_process
    return env


def has_checkpoint(out: Path) -> bool:
    return any((p / "trainer_state.json").exists() for p in (out / "checkpoints").glob("step-*"))


@task(name="train", cache_policy=CACHE, persist_result=True, retries=1, retry_delay_seconds=2)
def train(config: ExperimentConfig, run: RunRef | None, pipeline: PipelineConfig) -> TrainRecord:
    """Train one arm in a subprocess; stream its log and per-step metrics; return the checkpoint."""
    log = get_run_logger()
    start = time.perf_counter()
    key = stage_key(_ingredients(config, run, pipeline), CACHE.modules, CACHE.packages, train.fn)
    out = output_dir(config, pipeline, key)
    cfg = config.model_copy(update={"training": config.training.model_copy(update={"output_dir": str(out)})})
    run_yaml = cfg.save(out / "run.yaml")
    resume = has_checkpoint(out)
    cmd = launch_command(run_yaml, cfg, pipeline, resume)
    log.info(("resuming from the last checkpoint: " if resume else "") + " ".join(cmd))

    tail: deque[str] = deque(maxlen=40)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=launch_env(run, pipeline))
    reader = threading.Thread(target=_stream, args=(proc, log, tail, pipeline.progress), daemon=True)
    reader.start()
    logged = metric_steps(run, "train/loss") if run else set()
    metrics_file = out / "metrics.jsonl"
    try:
        with system_metrics(run):
            while proc.poll() is None:
                time.sleep(1.0)
                if run:
                    _sync_metrics(run, metrics_file, logged)
    finally:  # interrupted (Ctrl-C, SIGTERM, a Prefect timeout): do not leave the trainer running
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
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


def _sync_metrics(run: RunRef, path: Path, logged: set[int]) -> None:
    """Log the steps of metrics.jsonl that the run does not have yet (live during training, or a replay)."""
    if not path.exists():
        return
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
        log_metrics(run, {k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)
        logged.add(step)


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
    })
    for name in ("config.yaml", "summary.json", "metrics.jsonl"):
        path = Path(record.output_dir) / name
        if path.exists():
            log_artifact(run, path, "training")
