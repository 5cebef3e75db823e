"""The faults qtuning survives, one test each, each with the real thing: a killed process, a second process on
the same store or folder, a broken file on disk. Read the test names as the list; each docstring says the
fault and what must happen.

The slow ones start real `qtuning run` commands (a temporary Prefect server each) or training subprocesses on
a tiny random llama (the real tokenizer) and 16 ARC rows; every process a test starts is ended at teardown.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from conftest import mlflow_store, prefect_home
from qtuning.config import CompareConfig, DataConfig, ExperimentConfig, PipelineConfig, TrainingConfig
from qtuning.modeling import tiny_model_config

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


# --------------------------------------------------------------------------- helpers
def _env(tmp: Path, migrated: bool = True, **extra: str) -> dict[str, str]:
    """The environment of a command a test starts; `migrated`: its PREFECT_HOME starts from a migrated database."""
    home = prefect_home(tmp / "prefect_home") if migrated else tmp / "prefect_home"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(home),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false", **extra}
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "QTUNING_PARENT_PID"):
        env.pop(key, None)
    return env


def wait_for(what: str, pred: Callable[[], object], timeout: float, proc: subprocess.Popen | None = None,
             log: Path | None = None, procs: list[psutil.Process] | None = None):
    """Poll `pred` until it is truthy; fail naming `what` (and the log's tail) when time runs out or `proc` ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := pred():
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
    left = "\n".join(alive(procs)) if procs else ""
    pytest.fail(f"{what}: not within {timeout:.0f}s (exit code {proc.poll() if proc else None})\n{tail}{left}", pytrace=False)


def alive(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.cmdline())[:160]}")
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.fixture
def spawn(tmp_path):
    """spawn(cmd, log, env) -> Popen in its own session, output to `log`. At teardown every process a test
    started, with every descendant seen by `spawn.watch`, is killed (SIGKILL), whatever the test did."""
    started: list[subprocess.Popen] = []
    watched: list[psutil.Process] = []

    def start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        started.append(proc)
        return proc

    def watch(pid: int) -> list[psutil.Process]:
        try:
            found = psutil.Process(pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        watched.extend(found)
        return found

    start.watch = watch
    yield start
    for proc in started:
        watch(proc.pid)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        with __import__("contextlib").suppress(Exception):
            proc.wait(10)
    for p in watched:
        with __import__("contextlib").suppress(psutil.NoSuchProcess):
            p.kill()


def tiny_experiment(tmp: Path, epochs: float = 2.0, **training) -> ExperimentConfig:
    return ExperimentConfig(
        name="arm", model=tiny_model_config(), data=DataConfig(source="arc", limit=16, max_length=96),
        training=TrainingConfig(micro_batch_size=8, lr=1e-3, epochs=epochs, output_dir=str(tmp / "out"), **training),
    )


def slow_step_experiment(tmp: Path, epochs: float) -> ExperimentConfig:
    """The tiny model on 16 whole ShareGPT conversations of up to 1,024 tokens a step: each step takes seconds
    (about 6 s on the developers' 2 cores), as a step of a real model does, or of the tiny one on a slow machine."""
    return ExperimentConfig(
        name="arm", model=tiny_model_config(), data=DataConfig(source="sharegpt", limit=16, max_length=1024),
        training=TrainingConfig(micro_batch_size=16, lr=1e-3, epochs=epochs, output_dir=str(tmp / "out")),
    )


def metric_steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# --------------------------------------------------------------------------- bad input
def test_a_data_file_that_is_not_utf8_is_named_by_row_and_byte_offset_not_dumped(tmp_path):
    """A Latin-1 line in a JSONL file used to fail with a bare UnicodeDecodeError (no file, no row) and put the
    file's bytes in the log. It is a DataError naming the file, the row and the byte offset, with no content."""
    from qtuning.data import DataError, load_rows

    good = json.dumps({"prompt": "q", "response": "a"}).encode() + b"\n"
    bad = '{"prompt": "caf\xe9 SECRET", "response": "a"}\n'.encode("latin-1")
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good + bad + good)
    with pytest.raises(DataError) as e:
        load_rows(DataConfig(source=str(path)))
    msg = str(e.value)
    assert str(path) in msg and "row 2" in msg and f"byte offset {len(good) + bad.index(0xE9)}" in msg
    assert "not UTF-8" in msg and "SECRET" not in msg
    rows = load_rows(DataConfig(source=str(path), on_bad_row="skip"))
    assert len(rows.examples) == 2 and rows.skipped == {"not UTF-8": 1}


@pytest.mark.parametrize("content,expected", [
    (b'{"prompt": "q", "response": "a"}\n{"prompt": "q", "response": 5}\n', ["row 2", "field 'response'", "got int"]),
    (b'{"prompt": "q", "response": "a"}\n{"prompt": "\xff\xfe", "response": "a"}\n', ["row 2", "not UTF-8", "byte offset 45"]),
    (b"", ["no usable rows"]),
], ids=["bad-row", "not-utf8", "empty"])
def test_bad_data_stops_qtuning_run_in_seconds_before_prefect_or_mlflow(tmp_path, content, expected):
    """A bad row used to surface after ~50 s (the Prefect server starts first), exit 1 and print its message three
    times in ~150 lines of tracebacks. `qtuning run` validates the rows first: one message with file, row and
    field, exit code 2 like a config error, within seconds, no Prefect home, no MLflow store created."""
    data = tmp_path / "train.jsonl"
    data.write_bytes(content)
    db = tmp_path / "mlflow.db"
    res = subprocess.run([PY, "-m", "commands.cli", "run", "--data", str(data), "--tracking-uri", f"sqlite:///{db}",
                          "--runs-dir", str(tmp_path / "runs")], env=_env(tmp_path, migrated=False), cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-3000:]  # before any server: nothing of Prefect or MLflow exists (below)
    assert str(data) in res.stderr
    for part in expected:
        assert res.stderr.count(part) == 1, (part, res.stderr)
    assert "Traceback" not in res.stderr
    assert not db.exists() and not (tmp_path / "prefect_home").exists() and not (tmp_path / "runs").exists()


def test_rows_cut_to_max_length_are_counted(tmp_path, tokenizer, write_jsonl):
    """A row longer than data.max_length used to be cut silently. The cut rows are counted in SFTData (saved with
    it), in the data stage's record (logged to MLflow as data/truncated_rows) and in its log line."""
    from prefect.logging import disable_run_logger

    from qtuning.data import SFTData, build_sft_dataset
    from tasks.data import prepare_data

    long = " ".join(["word"] * 200)
    path = write_jsonl([{"prompt": "q", "response": long}] * 3 + [{"prompt": "q", "response": "short"}] * 2)
    cfg = DataConfig(source=str(path), max_length=48)
    sft = build_sft_dataset(cfg, tokenizer, progress=False)
    assert sft.truncated == 3 and len(sft.dataset) == 5 and max(sft.dataset["length"]) == 48
    assert SFTData.load(sft.save(tmp_path / "ds")).truncated == 3
    with disable_run_logger():
        record = prepare_data.fn(cfg, tiny_model_config(), PipelineConfig(runs_dir=str(tmp_path / "runs")))
    assert record.truncated_rows == 3


# --------------------------------------------------------------------------- checkpoints, final model, disk
def test_resuming_at_the_last_step_reports_the_last_loss(tmp_path):
    """Resuming from a checkpoint taken at the last step used to report final_loss NaN (summary.json, MLflow).
    The last step's loss is part of TrainState, saved with the checkpoint."""
    import math
    import shutil

    from qtuning.train import train

    cfg = tiny_experiment(tmp_path, keep_checkpoints_after_training=True)
    first = train(cfg, progress=False)
    out = Path(cfg.training.output_dir)
    shutil.rmtree(out / "final")
    (out / "summary.json").unlink()
    again = train(cfg, resume=True, progress=False)
    assert again["optimizer_steps"] == first["optimizer_steps"] == 4
    assert not math.isnan(again["final_loss"]) and again["final_loss"] == pytest.approx(first["final_loss"])
    assert json.loads((out / "summary.json").read_text())["final_loss"] == pytest.approx(first["final_loss"])


@pytest.mark.parametrize("damage", ["old weight names", "truncated weights"])
def test_a_checkpoint_that_cannot_be_resumed_is_named_with_the_fix(tmp_path, damage):
    """A checkpoint from before the ChunkedLM wrapper (weights not under `model.`) used to fail the resume with torch's
    list of every missing and unexpected key (over 500 names for the 135M model); a damaged file with a bare
    safetensors error. Either way the error now names the folder, says what is wrong in one line and the fix."""
    import shutil

    from safetensors.torch import load_file, save_file

    from qtuning.checkpoints import CheckpointError
    from qtuning.train import train

    cfg = tiny_experiment(tmp_path, keep_checkpoints_after_training=True)
    train(cfg, progress=False)
    out = Path(cfg.training.output_dir)
    shutil.rmtree(out / "final")
    (ckpt,) = list((out / "checkpoints").glob("step-4"))
    weights = ckpt / "model.safetensors"
    if damage == "old weight names":
        save_file({k.removeprefix("model."): v for k, v in load_file(str(weights)).items()}, str(weights), metadata={"format": "pt"})
    else:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        train(cfg, resume=True, progress=False)
    msg = str(e.value)
    assert str(ckpt) in msg and "run without --resume" in msg and len(msg) < 1000, msg
    if damage == "old weight names":
        assert "missing weight(s) (e.g. model." in msg and "unexpected weight(s)" in msg and "written for another model" in msg
    else:
        assert "cannot be read" in msg


def test_resuming_passes_over_a_damaged_checkpoint_for_the_one_before(tmp_path, capsys):
    """Two checkpoints kept (steps 2 and 4); the newest's weights truncated on disk: the resume says so, loads
    step 2 and trains steps 3 and 4 again, to the same final loss as the run that was never damaged."""
    import shutil

    from qtuning.train import train

    cfg = tiny_experiment(tmp_path, keep_checkpoints_after_training=True, checkpoint_every_steps=2, keep_checkpoints=2)
    first = train(cfg, progress=False)
    out = Path(cfg.training.output_dir)
    shutil.rmtree(out / "final")
    weights = out / "checkpoints" / "step-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    capsys.readouterr()
    again = train(cfg, resume=True, progress=False)
    said = capsys.readouterr().out
    assert f"checkpoint {weights.parent} cannot be read" in said and "resuming from the checkpoint before it" in said
    assert f"resumed from {out / 'checkpoints' / 'step-2'} (step 2/4)" in said
    assert again["optimizer_steps"] == 4 and again["final_loss"] == pytest.approx(first["final_loss"], rel=1e-4)


def test_a_finished_arm_keeps_its_final_model_and_drops_its_checkpoints(tmp_path):
    """A finished arm used to keep two resumable checkpoints (1.6 GB each for the 135M model) beside its final
    model. By default (training.keep_checkpoints_after_training: false) only the final model stays, and it is
    written as final.partial/ and renamed, so a final/ folder is always whole."""
    from qtuning.train import train

    cfg = tiny_experiment(tmp_path, checkpoint_every_steps=1)
    train(cfg, progress=False)
    out = Path(cfg.training.output_dir)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "final", "metrics.jsonl", "selection.parquet", "summary.json"]
    assert (out / "final" / "model.safetensors").stat().st_size > 0 and (out / "final" / "tokenizer.json").exists()


def test_a_full_disk_stops_training_naming_the_folder_and_bytes_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """A checkpoint used to be written without looking at free space (a full disk broke it half-way). The free space
    is checked first (estimate: the last checkpoint's size, else parameters x 3); too little stops the run with
    the folder and the bytes needed, and the last complete checkpoint stays intact, with no partial one."""
    import shutil as real_shutil

    import qtuning.train as train_mod
    from qtuning.checkpoints import DiskSpaceError

    cfg = tiny_experiment(tmp_path, checkpoint_every_steps=1)
    out = Path(cfg.training.output_dir)
    usage = real_shutil.disk_usage

    def disk_usage(path):  # room for the first checkpoint only
        real = usage(path)
        full = any((out / "checkpoints").glob("step-1"))
        return type(real)(real.total, real.used, 1000 if full else real.free)

    monkeypatch.setattr(train_mod.shutil, "disk_usage", disk_usage)
    with pytest.raises(DiskSpaceError) as e:
        train_mod.train(cfg, progress=False)
    step1 = out / "checkpoints" / "step-1"
    needed = sum(p.stat().st_size for p in step1.rglob("*") if p.is_file())
    msg = str(e.value)
    assert str(out / "checkpoints") in msg and f"{needed:,} bytes needed" in msg and "1,000 free" in msg
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]
    assert (step1 / "trainer_state.json").exists() and not (out / "final").exists()


# --------------------------------------------------------------------------- stopping a trainer
def test_a_trainer_stopped_by_sigterm_saves_a_checkpoint_and_writes_no_final_model(tmp_path, spawn):
    """A trainer killed while saving used to leave a final/ with only config.json. On SIGTERM (or SIGINT) the
    trainer stops at the next step boundary, saves a checkpoint of that step, writes no final model and exits
    143; a resume continues from there."""
    cfg = tiny_experiment(tmp_path, epochs=500)
    run_yaml = cfg.save(tmp_path / "run.yaml")
    log = tmp_path / "train.log"
    proc = spawn([PY, "-m", "qtuning.train", "--config", str(run_yaml), "--no-progress"], log, _env(tmp_path))
    out = Path(cfg.training.output_dir)
    wait_for("a first training step", lambda: metric_steps(out / "metrics.jsonl"), 120, proc, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    step = metric_steps(out / "metrics.jsonl")[-1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{step}"]
    assert not (out / "final").exists() and not (out / "final.partial").exists() and not (out / "summary.json").exists()
    assert f"stopped at step {step} (SIGTERM)" in log.read_text()


def test_a_stop_before_the_first_step_says_so_and_writes_no_checkpoint(tmp_path):
    """A stop that came before any step had completed used to save a `step-0` checkpoint of the untrained model
    and call it the step it stopped at. Nothing is kept, and the message says a rerun starts from the beginning."""
    from qtuning.stopping import StopRequest, TrainingStopped
    from qtuning.train import train

    cfg = tiny_experiment(tmp_path)
    stop = StopRequest()
    stop.request(signal.SIGTERM, "SIGTERM")
    with pytest.raises(TrainingStopped) as e:
        train(cfg, progress=False, stop=stop)
    out = Path(cfg.training.output_dir)
    assert "stopped at step 0 (SIGTERM)" in str(e.value) and "no step had completed, so no checkpoint was written" in str(e.value)
    assert e.value.signum == signal.SIGTERM and not (out / "checkpoints").exists() and not (out / "final").exists()


def test_a_repeated_sigterm_lets_the_trainer_save_and_a_second_ctrl_c_stops_it_now():
    """`accelerate launch` passes its own SIGTERM on to a trainer that the pipeline has already asked to stop; that
    second SIGTERM used to interrupt the trainer before its checkpoint (a second Ctrl-C still does)."""
    from qtuning.stopping import StopRequest

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    stop = StopRequest()
    try:
        stop.install()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher's: no exception
        assert stop and stop.signum == signal.SIGTERM and stop.reason == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


TRAIN_TASK = """
import os, signal, sys, time
from pathlib import Path
from prefect.logging import disable_run_logger
from qtuning.config import ExperimentConfig, PipelineConfig
from tasks import training, tracking
from tasks.records import DataRecord

work = Path(sys.argv[1])
cfg = ExperimentConfig.load(work / "run.yaml")
pipe = PipelineConfig.model_validate_json((work / "pipeline.json").read_text())
data = DataRecord.model_validate_json((work / "data.json").read_text())
run = None
if uri := os.environ.get("FAULT_TRACKING_URI"):  # an MLflow run this process owns
    run = tracking.create_run(uri, "faults", "arm")
    (work / f"run-{os.getpid()}").write_text(run.run_id)
signal.signal(signal.SIGTERM, lambda s, f: sys.exit(128 + s))  # raise, as Prefect's SIGTERM bridge does
if parties := int(os.environ.get("FAULT_BARRIER", "0")):  # start together: once every process is ready to
    (work / f"ready-{os.getpid()}").touch()               # train (imports done), not at a time fitted to one CPU
    while len(list(work.glob("ready-*"))) < parties:
        time.sleep(0.05)
with disable_run_logger():
    record = training.train_arm.fn(cfg, data, run, pipe)
(work / f"record-{os.getpid()}.json").write_text(record.model_dump_json())
"""


@pytest.fixture
def train_task(tmp_path, spawn):
    """train_task(epochs, launcher, n=1, **env) -> the processes running tasks.training.train_arm.fn on prepared
    tiny data, all in one runs folder (the same stage key), and the folder where the training goes."""
    from prefect.logging import disable_run_logger

    from tasks.data import prepare_data

    def start(epochs: float, launcher: str, n: int = 1, slow_steps: bool = False, **env: str):
        cfg = (slow_step_experiment if slow_steps else tiny_experiment)(tmp_path, epochs=epochs)
        pipe = PipelineConfig(runs_dir=str(tmp_path / "runs"), launcher=launcher, progress=False)
        with disable_run_logger():
            data = prepare_data.fn(cfg.data, cfg.model, pipe)
        cfg.save(tmp_path / "run.yaml")
        (tmp_path / "pipeline.json").write_text(pipe.model_dump_json())
        (tmp_path / "data.json").write_text(data.model_dump_json())
        (tmp_path / "task.py").write_text(TRAIN_TASK)
        procs = [spawn([PY, str(tmp_path / "task.py"), str(tmp_path)], tmp_path / f"task-{i}.log", _env(tmp_path, **env))
                 for i in range(n)]
        return procs, tmp_path / "runs" / "train"

    return start


def _training_started(train_root: Path) -> Path | None:
    for d in train_root.glob("arm-*"):
        if metric_steps(d / "metrics.jsonl"):
            return d
    return None


@pytest.mark.slow
@pytest.mark.parametrize("slow_steps", [False, True], ids=["steps-of-milliseconds", "steps-of-seconds"])
def test_stopping_the_training_task_stops_the_trainer_under_accelerate_launch(train_task, spawn, tmp_path, slow_steps):
    """Stopping `qtuning run` used to stop the `accelerate launch` wrapper but not the `python -m qtuning.train`
    under it, which trained on with parent 1. The launcher runs in its own process group and the task stops
    the whole group: nothing it started survives, and no half-written final model is left.

    The stop then often left no checkpoint at all (always, on another machine): the launcher, signalled with the
    trainer, signalled it again, which interrupted it at once, and kills it 5 s later, which a step of seconds
    (a slow machine, a real model) outlasts. Now only the trainer is signalled; it finishes its step, saves it
    and exits, and the launcher with it."""
    (proc,), root = train_task(epochs=500, launcher="accelerate", slow_steps=slow_steps)
    out = wait_for("a first training step", lambda: _training_started(root), 240, proc, tmp_path / "task-0.log")
    tree = spawn.watch(proc.pid)
    assert any("qtuning.train" in " ".join(p.cmdline()) for p in tree) and any("accelerate" in " ".join(p.cmdline()) for p in tree)
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)
    wait_for("every process of the training gone", lambda: not alive(tree), 30)
    assert not (out / "final").exists() and not (out / "final.partial").exists()
    step = metric_steps(out / "metrics.jsonl")[-1]
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{step}"]


@pytest.mark.slow
def test_a_trainer_whose_pipeline_is_killed_stops_and_its_run_is_closed_as_orphan(train_task, spawn, tmp_path):
    """`kill -9` of the pipeline process used to leave the trainer training (parent 1) and its MLflow run RUNNING
    forever. The trainer watches the process that started it and stops at a step boundary with a checkpoint;
    `qtuning runs --close-orphans` (also run at the start of every `qtuning run`) ends the run KILLED."""
    from mlflow import MlflowClient

    uri = mlflow_store(tmp_path / "mlflow.db")
    (proc,), root = train_task(epochs=500, launcher="accelerate", FAULT_TRACKING_URI=uri)
    out = wait_for("a first training step", lambda: _training_started(root), 180, proc, tmp_path / "task-0.log")
    tree = spawn.watch(proc.pid)
    run_id = next(tmp_path.glob("run-*")).read_text()
    proc.kill()
    proc.wait(10)  # reaped, as a shell does
    wait_for("the trainer to stop after its parent died", lambda: not alive(tree), 60, procs=tree)
    assert not (out / "final").exists() and len(list((out / "checkpoints").glob("step-*"))) == 1
    assert MlflowClient(uri).get_run(run_id).info.status == "RUNNING"
    res = subprocess.run([PY, "-m", "commands.cli", "runs", "--close-orphans", "--tracking-uri", uri], env=_env(tmp_path),
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and run_id in res.stdout and "1 orphaned run(s) closed" in res.stdout, res.stderr
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "KILLED" and str(proc.pid) in run.data.tags["qtuning.ended_by"]


# --------------------------------------------------------------------------- two processes, one store or folder
RACE = """
import os, sys, time
from pathlib import Path
from tasks.tracking import create_run
barrier = Path(sys.argv[2])  # both start at once, as soon as both have imported mlflow
(barrier / f"ready-{os.getpid()}").touch()
while len(list(barrier.glob("ready-*"))) < 2:
    time.sleep(0.01)
create_run(sys.argv[1], "race", f"run-{os.getpid()}")
"""


@pytest.mark.slow
def test_two_runs_creating_a_new_mlflow_store_at_once_both_succeed(tmp_path):
    """Two runs started at the same moment on a SQLite store that did not exist raced in its schema creation
    ('table label_schemas already exists'): one died, the store could be left half-migrated. The store is
    created once, under a file lock beside it; both processes get their run."""
    from mlflow import MlflowClient

    script = tmp_path / "race.py"
    script.write_text(RACE)
    for attempt in range(1):  # the unlocked store failed on every attempt of two
        uri = f"sqlite:///{tmp_path}/store-{attempt}/mlflow.db"
        barrier = tmp_path / f"barrier-{attempt}"
        barrier.mkdir()
        procs = [subprocess.Popen([PY, str(script), uri, str(barrier)], env=_env(tmp_path), cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        outputs = [p.communicate(timeout=120)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("race")
        assert len(client.search_runs([exp.experiment_id])) == 2


@pytest.mark.slow
def test_identical_runs_started_together_train_an_arm_once(train_task, tmp_path):
    """Two identical runs started together used to train the same arm at once into the same folder, and its
    metrics.jsonl held every step twice. A stage's body runs under a lock per cache key: the second process
    waits, then reuses what the first wrote (its record), and every step is in the metrics file once."""
    procs, root = train_task(epochs=5, launcher="python", n=2, FAULT_BARRIER="2")
    for i, p in enumerate(procs):
        assert p.wait(300) == 0, (tmp_path / f"task-{i}.log").read_text()[-3000:]
    (out,) = list(root.glob("arm-*"))
    assert metric_steps(out / "metrics.jsonl") == list(range(1, 11))
    records = [json.loads(p.read_text()) for p in tmp_path.glob("record-*.json")]
    assert len(records) == 2 and records[0] == records[1]  # the second is the first's record (its timings too), read back


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_truncated_cached_file_is_reported_and_rebuilt_by_the_engine(tmp_path, prefect_server):
    """A cached stage used to be trusted as long as its files existed: a truncated tokenized data file was reused
    and failed later. Through Prefect's engine: the second call finds the file damaged, says which file, and
    rebuilds the stage."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_HOME, temporary_settings

    from tasks.data import prepare_data

    data_cfg, model = DataConfig(source="arc", limit=16, max_length=96), tiny_model_config()
    pipe = PipelineConfig(runs_dir=str(tmp_path / "runs"), progress=False)

    @flow(name="prepare")
    def prepare():
        return prepare_data(data_cfg, model, pipe)

    with temporary_settings(updates={PREFECT_HOME: str(tmp_path / "prefect_home")}):
        first = prepare()
        (arrow,) = Path(first.path).glob("data-*.arrow")
        size = arrow.stat().st_size
        with arrow.open("r+b") as f:
            f.truncate(size // 2)
        again = prepare()
        assert again.produced_in != first.produced_in  # rebuilt in the second flow run, not a cache hit
        assert arrow.stat().st_size == size

        def reported():  # logs reach the API in batches; the server is shared: the second flow run's logs
            only = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[again.produced_in]))
            with get_client(sync_client=True) as client:
                return any("cannot be trusted, rebuilding" in log.message and f"{arrow} is damaged" in log.message
                           for log in client.read_logs(log_filter=only))

        wait_for("the damaged file reported in the flow run's log", reported, 30)
        third = prepare()
        assert third.produced_in == again.produced_in  # and then a cache hit again


# --------------------------------------------------------------------------- interrupting `qtuning run`
def _start_qtuning_run(tmp_path: Path, spawn, tiny_compare_config):
    cfg = tiny_compare_config(tmp_path, name="faults")
    cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"epochs": 500.0})})
    path = cfg.save(tmp_path / "compare.yaml")
    log = tmp_path / "run.log"
    proc = spawn([PY, "-m", "commands.cli", "run", "--config", str(path)], log, _env(tmp_path))
    root = tmp_path / "runs" / "train"
    wait_for("`qtuning run` training its first arm", lambda: any(
        metric_steps(d / "metrics.jsonl") for d in root.glob("*-*")) if root.exists() else None, 400, proc, log)
    wait_for("the first step's metrics in the arm's MLflow run", lambda: _logged(cfg, "train/loss"), 60, proc, log)
    return proc, log, cfg


def _logged(cfg: CompareConfig, metric: str) -> bool:
    from mlflow import MlflowClient

    client = MlflowClient(cfg.pipeline.tracking_uri)
    exp = client.get_experiment_by_name(cfg.pipeline.experiment_name)
    return exp is not None and any(metric in r.data.metrics for r in client.search_runs([exp.experiment_id]))


def _runs(cfg: CompareConfig) -> dict[str, str]:
    from mlflow import MlflowClient

    client = MlflowClient(cfg.pipeline.tracking_uri)
    exp = client.get_experiment_by_name(cfg.pipeline.experiment_name)
    return {r.info.run_name: r.info.status for r in client.search_runs([exp.experiment_id])}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("how", ["ctrl-c-to-the-group", "sigterm-to-the-process"])
def test_ctrl_c_or_sigterm_ends_qtuning_run_killed_within_seconds(tmp_path, spawn, tiny_compare_config, how):
    """A terminal Ctrl-C (SIGINT to the whole process group) also kills Prefect's temporary server; `qtuning run`
    used to retry its API for ~4 minutes, exit with a connection error and leave the parent run FAILED; SIGTERM
    to the process stopped the `accelerate launch` wrapper but not the trainer under it. Either way the runs
    end KILLED through the MLflow client, the trainer saves a checkpoint and stops, the server is stopped, and
    the command exits 130/143 within seconds, leaving no process behind."""
    proc, log, cfg = _start_qtuning_run(tmp_path, spawn, tiny_compare_config)
    tree = spawn.watch(proc.pid)
    if how == "ctrl-c-to-the-group":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    # the bug retried a dead server's API for ~4 minutes: a wait far shorter than that, but no speed assertion
    code = proc.wait(120)
    assert code == 128 + (signal.SIGINT if how.startswith("ctrl-c") else signal.SIGTERM), log.read_text()[-3000:]
    assert _runs(cfg) == {"faults": "KILLED", "full": "KILLED"}
    wait_for("no process of the run left (the guard ends once it has seen the command gone)", lambda: not alive(tree), 60)
    (out,) = list((tmp_path / "runs" / "train").glob("full-*"))
    assert not (out / "final").exists() and len(list((out / "checkpoints").glob("step-*"))) == 1
    if how == "ctrl-c-to-the-group":  # the temporary server died with the group, before the flow run could end
        closed = _close_orphans(tmp_path, cfg)
        flow_runs = [line for line in closed.splitlines() if line.startswith("Prefect flow run ")]
        assert flow_runs and all(f"left RUNNING by process {proc.pid}, which is gone: set CRASHED" in line for line in flow_runs), closed
        assert "0 orphaned Prefect flow run(s) closed" in _close_orphans(tmp_path, cfg)  # they are no longer open


STORE_WRITER = """
import sys, time
from pathlib import Path
from sqlalchemy import event
from sqlalchemy.engine import Engine
from commands.lifecycle import guard_run
from tasks.tracking import create_run, log_metrics
uri = guard_run(sys.argv[1], "qtuning run")
run = create_run(uri, "writes", "arm")

@event.listens_for(Engine, "after_cursor_execute")
def slow_disk(conn, cursor, statement, *args):  # each row written takes 50 ms before the transaction goes on
    if statement.lstrip().upper().startswith("INSERT"):
        time.sleep(0.05)

log_metrics(run, {"m": 0.0}, step=0)
(Path(sys.argv[2]) / "run_id").write_text(run.run_id)
step = 0
while True:  # the main thread nearly always inside a write transaction, as it streams a trainer's metrics
    step += 1
    log_metrics(run, {"loss": 1.0 / step, "lr": 1e-3}, step=step)
"""


@pytest.mark.slow
def test_a_signal_that_lands_inside_a_store_write_exits_at_once_and_the_run_ends_killed(tmp_path, spawn, prefect_server):
    """The SIGINT/SIGTERM handler runs in the main thread, in the middle of whatever it was doing: often a write to
    a SQLite store (the metrics streamed each second), whose write lock the suspended transaction holds. The
    handler's own writes waited for that lock until they timed out (~25 s after Ctrl-C), and the runs were left
    RUNNING: it had also stopped the guard that would have closed them. Now the handler does not write while the
    main thread is inside the store; the command exits 143 without waiting on the lock, and the run ends KILLED
    (by the handler, or by the guard once the command is gone)."""
    from mlflow import MlflowClient

    uri = mlflow_store(tmp_path / "mlflow.db")
    script, log = tmp_path / "writer.py", tmp_path / "writer.log"
    script.write_text(STORE_WRITER)
    env = {**_env(tmp_path), "PREFECT_API_URL": prefect_server["api_url"]}  # guard_run asks Prefect for orphans
    proc = spawn([PY, "-P", str(script), uri, str(tmp_path)], log, env)
    run_id = wait_for("the run opened", lambda: (tmp_path / "run_id").exists() and (tmp_path / "run_id").read_text(),
                      180, proc, log)
    client = MlflowClient(uri)
    wait_for("its metrics streaming", lambda: "loss" in client.get_run(run_id).data.metrics, 60, proc, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    assert "database is locked" not in log.read_text(), log.read_text()[-3000:]
    run = wait_for("the run ended KILLED", lambda: (r := client.get_run(run_id)).info.status == "KILLED" and r, 60,
                   log=log)
    assert run.data.tags["qtuning.ended_by"] in (f"interrupted: ended KILLED by its own process {proc.pid}",
                                                 f"orphan: its process {proc.pid} on {socket.gethostname()} is gone")


def _close_orphans(tmp_path: Path, cfg: CompareConfig) -> str:
    res = subprocess.run([PY, "-m", "commands.cli", "runs", "--close-orphans", "--tracking-uri", cfg.pipeline.tracking_uri],
                         env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill_9_of_qtuning_run_leaves_no_orphan_process_or_running_run(tmp_path, spawn, tiny_compare_config):
    """`kill -9` of `qtuning run` used to leave its MLflow parent and arm runs RUNNING forever and the trainer and
    Prefect's temporary server as orphans. Its guard process stops them and ends the runs KILLED, saying which
    process was gone."""
    from mlflow import MlflowClient

    proc, log, cfg = _start_qtuning_run(tmp_path, spawn, tiny_compare_config)
    tree = spawn.watch(proc.pid)
    assert any("uvicorn" in " ".join(p.cmdline()) for p in tree) and any("qtuning.train" in " ".join(p.cmdline()) for p in tree)
    proc.kill()
    proc.wait(10)  # reaped, as a shell does
    wait_for("the trainer and the temporary server gone", lambda: not alive(tree), 90)
    wait_for("the runs ended KILLED", lambda: _runs(cfg) == {"faults": "KILLED", "full": "KILLED"}, 60)
    client = MlflowClient(cfg.pipeline.tracking_uri)
    exp = client.get_experiment_by_name(cfg.pipeline.experiment_name)
    for run in client.search_runs([exp.experiment_id]):
        assert f"its process {proc.pid}" in run.data.tags["qtuning.ended_by"]


def test_the_guard_runs_ours_from_a_folder_holding_commands_and_tasks_modules(tmp_path):
    """A user's commands.py and tasks.py in the working directory: the guard `qtuning run` starts is still ours
    (`python -m` puts the working directory first on sys.path; the guard's command leaves it out)."""
    from commands.lifecycle import guard_command

    for name in ("commands.py", "tasks.py"):
        (tmp_path / name).write_text(f"open({str(tmp_path / 'shadowed')!r}, 'w').write({name!r})\nraise SystemExit(3)\n")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    res = subprocess.run(guard_command(dead.pid, f"sqlite:///{tmp_path}/m.db"), cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert not (tmp_path / "shadowed").exists()
    # and the command itself, as a user types it there: the console script imports ours, not the folder's
    (tmp_path / "flows.py").write_text((tmp_path / "tasks.py").read_text())
    qtuning = Path(sys.executable).with_name("qtuning")
    for args in (["--version"], ["run", "--print-config"], ["sweep", str(REPO / "configs" / "sweeps" / "baselines.yaml"), "--list"]):
        res = subprocess.run([str(qtuning), *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, (args, res.stderr[-2000:])
    assert not (tmp_path / "shadowed").exists()
