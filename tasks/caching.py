"""Cache keys for the pipeline's tasks: every input that matters, the code that runs, and nothing else.

Prefect's default policy keys on the flow run (no reuse across runs) and `TASK_SOURCE` sees only the task's
own lines, not the library it calls. A `StageCache` key is the sha256 of:

- the ingredients the task names (configs as JSON, content fingerprints of files and folders), never model
  objects or tensors;
- the source of the task's module (the task and its helpers);
- the source files of the `qtuning` modules the stage runs, plus the package version and the versions of the
  third-party libraries whose numbers matter (torch, transformers, lm-eval). Source content, not the git
  commit: an unrelated commit keeps the caches, an uncommitted edit invalidates them.

A cached record is only valid while the files it points to exist: when a stage's expected output is gone
(a deleted checkpoint, a cleaned `runs/`), the policy forgets the record, so the task runs again instead of
returning paths to nothing. Records are persisted in Prefect's result storage (`$PREFECT_HOME/storage` by
default), so hits survive across flow runs and processes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from pydantic import BaseModel

import qtuning
from qtuning.config import BUNDLED_MODEL, DATA_PRESETS, DataConfig, ModelConfig

# The qtuning modules each stage executes (their files are hashed into the stage's key).
DATA_MODULES = ("qtuning.config", "qtuning.data", "qtuning.modeling", "qtuning.assets")
SCORE_MODULES = (*DATA_MODULES, "qtuning.scoring")
PRUNE_MODULES = (*SCORE_MODULES, "qtuning.pruning", "qtuning.train", "qtuning.pipeline", "qtuning.report")
TRAIN_MODULES = (*SCORE_MODULES, "qtuning.pruning", "qtuning.train")
EVAL_MODULES = ("qtuning.config", "qtuning.evaluation")


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


# --------------------------------------------------------------------------- fingerprints of files
@lru_cache(maxsize=256)
def _file_sha(path: str, size: int, mtime_ns: int) -> str:
    """Content hash of one file; memoised on (path, size, mtime) so a process hashes a file once."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def file_fingerprint(path: str | Path) -> str:
    p = Path(path)
    st = p.stat()
    return _file_sha(str(p.resolve()), st.st_size, st.st_mtime_ns)


def dir_fingerprint(path: str | Path, hash_limit_bytes: int = 16 << 20) -> str:
    """A folder's identity: names and content hashes of its files; files over `hash_limit_bytes` (weights)
    count by name, size and modification time, which changes whenever they are rewritten."""
    root = Path(path)
    entries = []
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        st = p.stat()
        rel = str(p.relative_to(root))
        ident = file_fingerprint(p) if st.st_size <= hash_limit_bytes else f"{st.st_size}:{st.st_mtime_ns}"
        entries.append((rel, ident))
    return digest(entries)


def path_fingerprint(path: str | Path) -> str:
    p = Path(path)
    return dir_fingerprint(p) if p.is_dir() else file_fingerprint(p)


def source_fingerprint(data: DataConfig) -> str:
    """What the data source holds: a preset's or local file's content hash, or the hub id as given."""
    if data.source in DATA_PRESETS:
        from qtuning.assets import preset_path

        return "preset:" + file_fingerprint(preset_path(data.source))
    p = Path(data.source).expanduser()
    if p.exists():
        return "local:" + path_fingerprint(p)
    return f"hub:{data.source}@{data.split}"


def model_fingerprint(model: ModelConfig) -> str:
    """Which weights (and architecture) a ModelConfig loads, without loading them."""
    if model.name == BUNDLED_MODEL:
        from qtuning.assets import model_dir

        where = dir_fingerprint(model_dir(model.name))
    elif Path(model.name).expanduser().exists():
        where = dir_fingerprint(Path(model.name).expanduser())
    else:
        where = f"hub:{model.name}"
    if model.random_init:  # weights come from the seed; only the architecture and tokenizer files matter
        where = "random:" + where
    return digest({"config": model, "weights": where})


# --------------------------------------------------------------------------- fingerprints of code
def _module_files(name: str) -> list[Path]:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return []
    origin = Path(spec.origin)
    if spec.submodule_search_locations:  # a package: every .py file and YAML under it
        root = origin.parent
        return sorted(p for p in root.rglob("*") if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts)
    return [origin]


@lru_cache(maxsize=64)
def library_fingerprint(modules: tuple[str, ...], packages: tuple[str, ...] = ()) -> str:
    """qtuning's version, the content of the named qtuning modules, and the installed versions of `packages`."""
    root = Path(qtuning.__file__).resolve().parent.parent
    files = {str(p.resolve().relative_to(root)): file_fingerprint(p) for m in modules for p in _module_files(m)}
    versions = {}
    for pkg in packages:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return digest({"qtuning": qtuning.__version__, "files": files, "versions": versions})


def task_module_fingerprint(fn: Callable) -> str:
    """The source of the module that defines `fn` (the task and the helpers it calls)."""
    module = sys.modules.get(fn.__module__)
    try:
        return hashlib.sha256(inspect.getsource(module).encode()).hexdigest()
    except (OSError, TypeError):
        return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()


# --------------------------------------------------------------------------- the policy
@dataclass
class StageCache(CachePolicy):
    """Key = sha256(ingredients(**inputs), task module source, library fingerprint).

    `ingredients` maps the task's inputs to what the result depends on (configs, fingerprints) and must
    leave out inputs that do not change the result (MLflow run ids, progress flags). `outputs` maps the
    inputs to the files the result needs; if any is missing, the record is forgotten and the task runs.
    """

    ingredients: Callable[..., Any] = None  # type: ignore[assignment]
    modules: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()
    outputs: Callable[..., Iterable[Path]] | None = None

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        key = stage_key(self.ingredients(**inputs), self.modules, self.packages, task_ctx.task.fn)
        if self.outputs is not None:
            missing = [p for p in self.outputs(**inputs, key=key) if not Path(p).exists()]
            if missing:
                forget(task_ctx, key)
        return key


def stage_key(ingredients: Any, modules: tuple[str, ...], packages: tuple[str, ...], fn: Callable) -> str:
    """The cache key a StageCache computes; the task body calls it too, to name its output folder."""
    return digest(
        {
            "ingredients": ingredients,
            "task": f"{fn.__module__}.{fn.__qualname__}",
            "task_source": task_module_fingerprint(fn),
            "library": library_fingerprint(tuple(modules), tuple(packages)),
        }
    )


def forget(task_ctx: TaskRunContext, key: str) -> None:
    """Invalidate the cache record under `key`: an empty record reads as absent in any Prefect storage."""
    store = task_ctx.result_store
    if store is None or not store.exists(key):
        return
    storage = store.metadata_storage or store.result_storage
    if storage is None:
        return
    storage.write_path(key, b"")
    store.cache.pop(getattr(store, "_resolved_key_path", lambda k: k)(key), None)


def runs_root(runs_dir: str) -> Path:
    """The pipeline's output folder, absolute (so cache keys and records do not depend on the caller's cwd)."""
    return Path(os.path.abspath(Path(runs_dir).expanduser()))
