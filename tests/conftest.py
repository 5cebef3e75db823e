"""Shared fixtures: the real SmolLM2 tokenizer and a tiny random llama built on it.

They need the embedded assets (`qtuning assets`); without them the tests fail with the message that says
how to fetch them, rather than skip, so a CI that forgot the set-up step cannot pass.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch

from qtuning.assets import AssetsMissing
from qtuning.config import ModelConfig
from qtuning.modeling import load_model, load_tokenizer, tiny_model_config


@pytest.fixture(scope="session")
def tiny_model_cfg() -> ModelConfig:
    """2 layers x 64 wide, random weights, the real 49,152-token vocabulary and tokenizer."""
    return tiny_model_config()


@pytest.fixture(scope="session")
def tokenizer(tiny_model_cfg: ModelConfig) -> Any:
    """The bundled SmolLM2 tokenizer (pad = eos = <|im_end|>). Shared: do not modify it in a test."""
    try:
        return load_tokenizer(tiny_model_cfg)
    except AssetsMissing as e:
        missing = str(e)
    pytest.fail(missing, pytrace=False)  # outside the except: no chained traceback around the message


@pytest.fixture
def tiny_model(tiny_model_cfg: ModelConfig, tokenizer: Any) -> torch.nn.Module:
    """A fresh tiny llama seeded with 0 for each test (~0.1 s), so tests that train it cannot leak into others."""
    torch.manual_seed(0)
    return load_model(tiny_model_cfg)


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[..., Path]:
    """write_jsonl(rows, name="train.jsonl") -> path; a str row is written verbatim (for broken lines)."""

    def write(rows: Iterable[dict[str, Any] | str], name: str = "train.jsonl") -> Path:
        path = tmp_path / name
        lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return path

    return write


# --------------------------------------------------------------------------- real servers (tests/test_deploy.py, tests/test_flow_e2e.py and every module that runs flows)
def free_port() -> int:
    """A free TCP port on loopback (free when asked; the server binds it a moment later)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_url(url: str, proc, timeout: float, log: Path | None = None) -> None:
    """Poll `url` until it answers 200; fail with the log's tail if `proc` exits first or time runs out."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    pytest.fail(f"{url} did not answer within {timeout:.0f}s (exit code {proc.poll()}):\n{tail}", pytrace=False)


def _end_groups(procs: list, grace_s: float = 10.0) -> None:
    """End each process's group, last started first (workers before their server): SIGTERM, then SIGKILL after
    `grace_s`, with a warning that names the process (one that does not stop on SIGTERM is worth knowing about)."""
    import os
    import signal
    import subprocess
    import warnings

    for proc in reversed(procs):
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)  # the group: the server's own workers and the runner's flow-run children
            except ProcessLookupError:
                break
            if sig == signal.SIGKILL:
                warnings.warn(f"{' '.join(map(str, proc.args))[:200]} did not end within {grace_s:g} s of SIGTERM: killed")
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue


def _starter(procs: list):
    import subprocess

    def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        out = open(log, "ab")
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        out.close()
        procs.append(proc)
        return proc

    return start


@pytest.fixture(scope="module")
def background():
    """background(cmd, log, env=None) -> Popen in its own process group; every group is ended at the module's
    teardown (SIGTERM, SIGKILL after 10 s), last started first."""
    procs: list = []
    yield _starter(procs)
    _end_groups(procs)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` (API, UI, scheduler every second) on a free loopback port with a temporary
    PREFECT_HOME, one per test process (a server takes about 8 s of CPU to start: every module that runs flows
    shares it); this process's Prefect client points at it. Yields {"api_url", "ui_url", "home", "env"}, where
    env is what a subprocess needs to use the same server. Tests that count what is on the server count their
    own flow runs (by id, or before and after): other modules' runs are there too."""
    import os
    import sys

    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

    home = prefect_home(tmp_path_factory.mktemp("prefect_server"))
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1", "PREFECT_UI_ENABLED": "true",
           "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}  # where the browser's UI calls (default :4200)
    env.pop("PREFECT_API_URL", None)
    prefect = str(Path(sys.executable).with_name("prefect"))
    procs: list = []
    proc = _starter(procs)([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], home / "server.log", env)
    try:
        wait_for_url(f"http://127.0.0.1:{port}/api/health", proc, timeout=120, log=home / "server.log")
        api_url = f"http://127.0.0.1:{port}/api"
        settings = {PREFECT_API_URL: api_url, PREFECT_HOME: str(home), PREFECT_SERVER_ANALYTICS_ENABLED: False}
        with temporary_settings(updates=settings):
            yield {"api_url": api_url, "ui_url": f"http://127.0.0.1:{port}", "home": home,
                   "env": {**env, "PREFECT_API_URL": api_url}}
            from prefect.logging.handlers import APILogHandler

            APILogHandler().flush()  # the flow runs' last logs reach the server before it stops, not after
    finally:
        _end_groups(procs)


@pytest.fixture(scope="session")
def tiny_compare_config():
    """tiny_compare_config(root, name="e2e") -> tests/test_flow_e2e.py's comparison: a tiny random llama on 16 ARC
    rows, one item per benchmark, full data vs Q-Tuning 25%x50%, runs and a SQLite MLflow store under `root`
    (about a minute and a half on 2 cores)."""
    from qtuning.config import CompareConfig, DataConfig, PipelineConfig, TrainingConfig
    from qtuning.config import EvalConfig
    from qtuning.modeling import tiny_model_config

    def build(root: Path, name: str = "e2e") -> CompareConfig:
        return CompareConfig(
            name=name,
            model=tiny_model_config(),
            data=DataConfig(source="arc", limit=16, max_length=96),
            training=TrainingConfig(micro_batch_size=8, lr=1e-3, epochs=1.0),
            evaluation=EvalConfig(limit=1, max_gen_toks=4, max_gen_toks_short=4, num_fewshot_gsm8k=1, batch_size=4),
            pipeline=PipelineConfig(runs_dir=str(root / "runs"), tracking_uri=mlflow_store(root / "mlflow.db"),
                                    progress=False, token_view_samples=2, train_retries=0),
        )

    return build


# --------------------------------------------------------------------------- float tolerances
FP32_EPS = torch.finfo(torch.float32).eps
GRAD_TOL = 16.0  # in units of eps32 * sqrt(terms) * max|want|: see assert_grads_close


def assert_grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], terms: int, tol: float = GRAD_TOL) -> None:
    """Two fp32 computations of the same gradients agree up to rounding, on any CPU.

    Each tensor's worst difference is bounded relative to the tensor's largest element: a gradient element is a
    sum over `terms` tokens (and more through the layers above), so its rounding error scales with the size of
    what was summed (~ eps32 * sqrt(terms) * max|want|, the usual statistical bound), not with its own value,
    which cancellation can make as small as it likes. An elementwise relative tolerance holds on the CPU whose
    summation order it was fitted to and fails on another (issue 18: another AVX level, another thread count)."""
    import os

    assert got.keys() == want.keys()
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape and g.dtype == w.dtype, name
        scale = float(w.abs().max()) * FP32_EPS * terms ** 0.5
        err = float((g.double() - w.double()).abs().max())
        if report := os.environ.get("QTUNING_NUMERICS_REPORT"):
            with open(report, "a") as f:
                f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0]} {name} {err / max(scale, 1e-30):.3f}\n")
        assert err <= tol * scale, f"{name}: max |diff| {err:.3e} > {tol:g} x eps32 x sqrt({terms}) x max|want| = {tol * scale:.3e}"


def skip_unless_bf16_attention_runs_here() -> None:
    """Skip when torch's bf16 SDPA kernel cannot run under this process's ATEN_CPU_CAPABILITY override.

    torch 2.13's CPU flash-attention kernel picks its bf16 path from the CPU's own features (AVX-512 BF16/AMX on
    an Intel Xeon) while ATEN_CPU_CAPABILITY=default/avx2 dispatches a build without AVX-512: the call raises
    "pack_vnni2 is only supported when avx512 is supported". A CPU that really lacks AVX-512 takes another path,
    so only the simulation of one (`make test-numerics` on such a Xeon) cannot run these; `make test` does."""
    import os

    if not os.environ.get("ATEN_CPU_CAPABILITY"):
        return
    q = torch.zeros(1, 1, 128, 16, dtype=torch.bfloat16)
    try:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    except RuntimeError as e:
        if "only supported when avx512" not in str(e):
            raise
        pytest.skip(f"ATEN_CPU_CAPABILITY={os.environ['ATEN_CPU_CAPABILITY']} on this CPU: torch's bf16 attention "
                    f"kernel fails ({e}); a CPU without AVX-512 takes another path, `make test` runs this test")


# --------------------------------------------------------------------------- stores migrated once
# A Prefect server on a new PREFECT_HOME and a new MLflow SQLite store each run their schema migrations first
# (about 8 and 5 s of CPU on 2 cores). Tests that are not about creating them start from a copy of stores
# migrated once per test process; the tests of store creation itself (two processes creating one MLflow store
# at once, the first `qtuning run` of a new user) still create theirs.
@functools.cache
def _migrated() -> Path:
    import atexit
    import os
    import sqlite3
    import subprocess
    import sys
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="qtuning-migrated-"))
    atexit.register(shutil.rmtree, root, True)
    env = {**os.environ, "PREFECT_HOME": str(root / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    prefect = str(Path(sys.executable).with_name("prefect"))
    subprocess.run([prefect, "server", "database", "upgrade", "-y"], env=env, check=True, capture_output=True)
    from mlflow import MlflowClient

    MlflowClient(f"sqlite:///{root / 'mlflow-live.db'}").search_experiments()  # the client migrates a new store
    for live, copy in ((root / "prefect" / "prefect.db", root / "prefect.db"), (root / "mlflow-live.db", root / "mlflow.db")):
        with sqlite3.connect(live) as src, sqlite3.connect(copy) as dst:
            src.backup(dst)  # one consistent file, whatever is still in a write-ahead log
    return root


def prefect_home(path: Path) -> Path:
    """`path` as a PREFECT_HOME whose database is already migrated (its server starts seconds sooner); a database
    already there is kept."""
    path.mkdir(parents=True, exist_ok=True)
    if not (path / "prefect.db").exists():
        shutil.copyfile(_migrated() / "prefect.db", path / "prefect.db")
    return path


def mlflow_store(path: Path) -> str:
    """An MLflow SQLite store at `path`, its schema already migrated when new (a store already there is kept);
    returns its tracking URI."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        shutil.copyfile(_migrated() / "mlflow.db", path)
    return f"sqlite:///{path}"


# --------------------------------------------------------------------------- the order the two processes take
# `make test` runs a file to a process (`--dist loadfile`) with xdist's own reordering off (by count of tests), so
# the files go out in this order: the longest first (from `--durations` on a fresh clone, 2 cores), and a process
# that finishes one takes the next longest. A long file handed out last would run alone at the end while the
# other process idles. Within a file the `slow` tests go first: xdist hands a process its next file when two tests
# of the current one are left, and that file then waits behind them.
LONGEST_FIRST = ("test_team.py", "test_faults.py", "test_sweep.py", "test_sharding.py", "test_flow_e2e.py",
                 "test_formats.py", "test_engine.py", "test_bench.py", "test_deploy.py", "test_tasks.py",
                 "test_hf_trainer.py", "test_train.py", "test_reference_run.py", "test_evaluate.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    first_seen: dict[Path, int] = {}
    for i, item in enumerate(items):
        first_seen.setdefault(item.path, i)
    position = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda it: (rank.get(it.path.name, len(rank)), first_seen[it.path],
                               it.get_closest_marker("slow") is None, position[id(it)]))
