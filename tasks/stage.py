"""The one helper every cached stage uses: its key, its output folder, the manifest of what it wrote, and the check
of a cached output before it is trusted.

A stage is a Prefect task declared with `@stage(...)`:

    @stage("score_eu", folder="scores", ingredients=lambda data, model, pipeline: {...}, packages=("torch",))
    def score_eu(data, model, pipeline, *, out: Path, key: str) -> ScoresRecord:
        ...write files into `out`...; return ScoresRecord(key=key, path=str(out / "scores.parquet"), ...)

- **Key** = sha256 of the ingredients the stage names (configs as JSON, content fingerprints, never model objects),
  the stage's own module source, the source of the whole `qtuning` package (every .py and .yaml file: a helper
  moved to another module cannot be missed) and the versions of the packages that matter. Prefect's default
  policy would key on the flow run and `TASK_SOURCE` sees only the task's lines, so neither is used.
- **Portable**: no absolute path of the machine is in a key (`portable`: paths under the runs folder or the
  home count relative to it; data, models and templates by content), and a record read back under another mount
  of the runs folder is `relocated` to it: a shared folder mounted at two paths hits the same cache.
- **Folder**: `runs/<folder>/<key[:16]>`, or a function of the inputs (training keeps one resumable folder).
- **Manifest**: `manifest.json`, written last, lists every file with its size and sha256. A folder without one
  is incomplete (the process died while writing it) and is rebuilt from scratch.
- **Check**: calling the task first verifies the manifest of the folder its key names. A missing or damaged file
  is reported with its path and the stage runs again (`refresh_cache`, Prefect's public option), replacing the
  record; a valid folder is a cache hit as usual.
- **Once**: the body runs under an exclusive file lock per key (`runs/.locks/<stage>-<key>.lock`). A second
  process (an identical run started at the same moment) waits for it, then finds the folder complete and
  returns the record the first one wrote beside it (`record.json`, covered by the manifest) instead of
  building the same outputs again into the same folder. The lock is flock(2), which Linux's NFS client emulates
  with byte-range locks the server holds, so it also holds between machines sharing the runs folder over NFS
  (not on file systems without locks, such as an object store mounted by FUSE).

Records are persisted in Prefect's result storage (`$PREFECT_HOME/storage`), so hits survive across flow runs
and processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib
import importlib.metadata
import inspect
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from pydantic import BaseModel

import qtuning
from qtuning.config import BUNDLED_MODEL, ExperimentConfig, ModelConfig, is_template_text
from qtuning.data import file_sha256

MANIFEST = "manifest.json"
RECORD = "record.json"  # the record the body returned, for a process that waited for it (see "Once")


# --------------------------------------------------------------------------- fingerprints
def digest(obj: Any) -> str:
    """sha256 of a JSON rendering of `obj` (pydantic models by their JSON dump, paths as strings)."""
    return hashlib.sha256(json.dumps(_jsonable(obj), sort_keys=True, default=str).encode()).hexdigest()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dir_fingerprint(path: str | Path, hash_limit_bytes: int = 16 << 20) -> str:
    """A folder's identity: names and content hashes of its files; files over `hash_limit_bytes` (weights)
    count by name, size and modification time, which changes whenever they are rewritten."""
    root = Path(path)
    entries = []
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        st = p.stat()
        ident = file_sha256(p) if st.st_size <= hash_limit_bytes else f"{st.st_size}:{st.st_mtime_ns}"
        entries.append((str(p.relative_to(root)), ident))
    return digest(entries)


def path_fingerprint(path: str | Path) -> str:
    p = Path(path)
    return dir_fingerprint(p) if p.is_dir() else file_sha256(p)


def model_fingerprint(model: ModelConfig) -> str:
    """Which weights (and architecture) a ModelConfig loads, without loading them. A local folder counts by its
    content and its name, not by where it lies; a chat template file by its content."""
    config = model
    if model.name == BUNDLED_MODEL:
        from qtuning.assets import model_dir

        where = dir_fingerprint(model_dir(model.name))
    elif Path(model.name).expanduser().exists():
        where = dir_fingerprint(Path(model.name).expanduser())
        config = config.model_copy(update={"name": Path(model.name).name})
    else:
        where = f"hub:{model.name}"
    template = model.chat_template
    if template and not is_template_text(template) and Path(template).expanduser().is_file():
        config = config.model_copy(update={"chat_template": "file:" + file_sha256(Path(template).expanduser())})
    if model.random_init:  # weights come from the seed; only the architecture and tokenizer files matter
        where = "random:" + where
    return digest({"config": config, "weights": where})


def library_fingerprint(root: str | Path | None = None, packages: tuple[str, ...] = ()) -> str:
    """qtuning's version, the content of every .py and .yaml file of the package at `root` (default: the installed
    one), and the installed versions of `packages`."""
    root = Path(root) if root is not None else Path(qtuning.__file__).resolve().parent
    files = sorted(p for p in root.rglob("*") if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts)
    versions = {}
    for pkg in packages:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return digest({"qtuning": qtuning.__version__, "files": {str(p.relative_to(root)): file_sha256(p) for p in files},
                   "versions": versions})


def runs_root(runs_dir: str) -> Path:
    """The pipeline's output folder, absolute (so records do not depend on the caller's cwd)."""
    return Path(os.path.abspath(Path(runs_dir).expanduser()))


# --------------------------------------------------------------------------- caches that travel
def portable(obj: Any, root: Path | None) -> Any:
    """`obj` (JSON-able) as a cache key may hold it: every absolute path under the runs folder `root` or the
    user's home written relative to it (`<runs>/...`, `~/...`). A shared runs folder mounted at /mnt/a on one
    machine and /shared/b on another, or two users' homes, give the same key; a path elsewhere stays as it is."""
    if isinstance(obj, dict):
        return {portable(k, root): portable(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [portable(v, root) for v in obj]
    if isinstance(obj, str) and obj.startswith("/"):
        for base, name in ((root, "<runs>"), (Path.home(), "~")):
            if base is not None and (obj == str(base) or obj.startswith(str(base).rstrip("/") + "/")):
                return name + obj[len(str(base).rstrip("/")):]
    return obj


def recipe(config: ExperimentConfig, keep_name: bool = False) -> ExperimentConfig:
    """`config` as a key holds it: what the other ingredients already count by content (the data source and
    held-out file: the data fingerprint; the model folder and template: `model_fingerprint`; the accelerate file:
    its hash) and what is cosmetic (the output folder; the run name unless `keep_name`) are left out, and with
    them every path of this machine."""
    data = config.data.model_copy(update={"source": "", "eval_source": None})
    model = config.model.model_copy(update={"name": "", "chat_template": None})
    training = config.training.model_copy(update={"output_dir": "", "accelerate_config": None})
    return config.model_copy(update={"name": config.name if keep_name else "", "data": data, "model": model,
                                     "training": training})


def relocated(record: Any, root: Path) -> Any:
    """`record` with every path under the runs folder it was written in (its `root`) moved under `root`: a record
    another machine wrote into a shared folder (read back from the folder or from shared result storage) points
    at this machine's mount of it. Records without a `root` are returned as they are."""
    old = getattr(record, "root", None)
    if not old or old == str(root) or not isinstance(record, BaseModel):
        return record
    prefix = old.rstrip("/") + "/"

    def move(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        if isinstance(v, list):
            return [move(x) for x in v]
        if isinstance(v, str) and (v == old or v.startswith(prefix)):
            return str(root) + v[len(old.rstrip("/")):]
        return v

    return type(record).model_validate(move(record.model_dump(mode="json")) | {"root": str(root)})


# --------------------------------------------------------------------------- manifests
def write_manifest(out: Path, exclude: Callable[[str], bool] = lambda rel: False) -> Path:
    """`out/manifest.json`: size and sha256 of every file under `out` (but excluded ones), written atomically, last."""
    files = {}
    for p in sorted(q for q in out.rglob("*") if q.is_file() and q.name != MANIFEST):
        rel = p.relative_to(out).as_posix()
        if not exclude(rel):
            files[rel] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=1))
    tmp.replace(out / MANIFEST)
    return out / MANIFEST


def check_manifest(out: Path) -> str | None:
    """None when every file the manifest lists is there with its size and checksum; else what is wrong, with paths."""
    manifest = out / MANIFEST
    if not manifest.is_file():
        return f"{out} is incomplete (no {MANIFEST}: its stage did not finish)" if out.exists() else f"{out} does not exist"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{manifest} is damaged"
    for rel, meta in files.items():
        p = out / rel
        if not p.is_file():
            return f"{p} is missing"
        if p.stat().st_size != meta["size"]:
            return f"{p} is damaged (size {p.stat().st_size} bytes, {meta['size']} when written)"
        if file_sha256(p) != meta["sha256"]:
            return f"{p} is damaged (its checksum differs from the one written with it)"
    return None


# --------------------------------------------------------------------------- one build at a time
def _logger():
    try:
        return get_run_logger()
    except Exception:  # outside a task run (task.fn in a script)
        return logging.getLogger("qtuning.stage")


@contextlib.contextmanager
def build_lock(out: Path, name: str, key: str):
    """Hold the exclusive lock of (stage, key) while the block runs; other processes wait for it."""
    locks = out.parent.parent / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{name}-{key[:16]}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _logger().info(f"{name}: another process is building {out}; waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield  # the lock goes with the file's close, also when this process dies


def write_record(out: Path, record: Any) -> None:
    if isinstance(record, BaseModel):
        cls = type(record)
        (out / RECORD).write_text(json.dumps({"type": f"{cls.__module__}:{cls.__qualname__}",
                                              "record": record.model_dump(mode="json")}))


def read_record(out: Path) -> Any | None:
    """The record a finished build left in `out`, or None (none written, or unreadable)."""
    try:
        meta = json.loads((out / RECORD).read_text())
        module, _, qualname = meta["type"].partition(":")
        cls = functools.reduce(getattr, qualname.split("."), importlib.import_module(module))
        return cls.model_validate(meta["record"])
    except Exception:
        return None


# --------------------------------------------------------------------------- the stage
@dataclass(frozen=True)
class Stage:
    """What makes one stage's cache key and output folder (see the module docstring)."""

    name: str  # the Prefect task's name
    ingredients: Callable[..., Any]  # the task's inputs -> what its result depends on
    packages: tuple[str, ...] = ()
    folder: str | Callable[..., Path] = ""  # runs/<folder>/<key[:16]>, or (inputs..., key=) -> output folder
    resumable: bool = False  # keep an unfinished folder (training resumes from its checkpoints) instead of clearing it
    exclude: Callable[[str], bool] = field(default=lambda rel: False)  # files the manifest leaves out (checkpoints)
    module: str = ""  # the task module, whose source is part of the key

    def key(self, inputs: dict[str, Any]) -> str:
        return digest({
            "stage": self.name,
            "ingredients": portable(_jsonable(self.ingredients(**inputs)), self.root(inputs)),
            "task_source": _module_source(self.module),
            "stage_source": _module_source(__name__),
            "library": _installed_library_fingerprint(self.packages),
        })

    @staticmethod
    def root(inputs: dict[str, Any]) -> Path | None:
        """The runs folder of the call (every stage takes the pipeline config)."""
        pipeline = inputs.get("pipeline")
        return runs_root(pipeline.runs_dir) if pipeline is not None else None

    def out_dir(self, inputs: dict[str, Any], key: str) -> Path:
        if callable(self.folder):
            return self.folder(**inputs, key=key)
        return runs_root(inputs["pipeline"].runs_dir) / (self.folder or self.name) / key[:16]


@lru_cache(maxsize=64)
def _module_source(module: str) -> str:
    mod = sys.modules.get(module)
    return hashlib.sha256(inspect.getsource(mod).encode()).hexdigest() if mod else ""


@lru_cache(maxsize=64)
def _installed_library_fingerprint(packages: tuple[str, ...]) -> str:
    return library_fingerprint(packages=packages)


@dataclass
class StageCache(CachePolicy):
    """Prefect cache policy: the stage's key from the task's inputs."""

    stage: Stage = None  # type: ignore[assignment]

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        return self.stage.key(inputs)


class StageTask:
    """A stage's Prefect task; calling it checks a cached output before trusting it (else refresh_cache)."""

    def __init__(self, prefect_task, spec: Stage, signature: inspect.Signature):
        self.task = prefect_task
        self.stage = spec
        self.signature = signature
        functools.update_wrapper(self, prefect_task.fn, updated=())

    @property
    def fn(self):
        """The stage body with key, folder and manifest handling, outside Prefect (tests, scripts)."""
        return self.task.fn

    @property
    def name(self) -> str:
        return self.task.name

    def inputs(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)

    def locate(self, *args, **kwargs) -> tuple[str, Path]:
        """(key, output folder) the call would use."""
        inputs = self.inputs(args, kwargs)
        key = self.stage.key(inputs)
        return key, self.stage.out_dir(inputs, key)

    def __call__(self, *args, **kwargs):
        inputs = self.inputs(args, kwargs)
        key = self.stage.key(inputs)
        out = self.stage.out_dir(inputs, key)
        problem = check_manifest(out)
        if problem is None:
            record = self.task(*args, **kwargs)  # a cache hit if Prefect has the record, else it runs
        else:
            if out.exists():
                get_run_logger().warning(f"{self.stage.name}: the cached output cannot be trusted, rebuilding: {problem}")
            record = self.task.with_options(refresh_cache=True)(*args, **kwargs)
        root = self.stage.root(inputs)
        return relocated(record, root) if root is not None else record  # a record written under another mount

    def with_options(self, **options) -> StageTask:
        return StageTask(self.task.with_options(**options), self.stage, self.signature)


def stage(
    name: str,
    *,
    ingredients: Callable[..., Any],
    packages: Iterable[str] = (),
    folder: str | Callable[..., Path] = "",
    resumable: bool = False,
    exclude: Callable[[str], bool] = lambda rel: False,
    **task_options: Any,
) -> Callable[[Callable[..., Any]], StageTask]:
    """Declare a cached stage: `body(*inputs, out: Path, key: str) -> Record` becomes a Prefect task named `name`
    whose callers pass only the inputs. The body writes into `out`; the manifest is written after it returns."""

    def decorate(body: Callable[..., Any]) -> StageTask:
        sig = inspect.signature(body)
        public = sig.replace(parameters=[p for p in sig.parameters.values() if p.name not in ("out", "key")])
        spec = Stage(name, ingredients, tuple(packages), folder, resumable, exclude, body.__module__)

        def run(*args, **kwargs):
            bound = public.bind(*args, **kwargs)
            bound.apply_defaults()
            inputs = dict(bound.arguments)
            key = spec.key(inputs)
            out = spec.out_dir(inputs, key)
            root = spec.root(inputs)
            with build_lock(out, name, key):
                if check_manifest(out) is None and (done := read_record(out)) is not None:
                    _logger().info(f"{name}: {out} was completed by another run (or machine); reusing it")
                    return relocated(done, root) if root is not None else done
                (out / MANIFEST).unlink(missing_ok=True)  # from here on the folder is being rewritten
                if not resumable:
                    shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True, exist_ok=True)
                record = body(*args, **kwargs, out=out, key=key)
                if root is not None and isinstance(record, BaseModel) and "root" in type(record).model_fields:
                    record = record.model_copy(update={"root": str(root)})  # what its paths are relative to
                write_record(out, record)
                write_manifest(out, exclude)
                return record

        functools.update_wrapper(run, body)
        del run.__wrapped__  # Prefect reads the parameters from __signature__: the inputs, without out and key
        run.__signature__ = public
        prefect_task = task(name=name, cache_policy=StageCache(stage=spec), persist_result=True, **task_options)(run)
        return StageTask(prefect_task, spec, public)

    return decorate
