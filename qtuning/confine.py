"""Parameters from outside confined to what the operator allows: every path a config names under allowed roots,
and no password in a parameter.

A deployment parameter sent through a reachable Prefect API is as good as a shell if it is trusted: a task YAML
anywhere makes lm-eval import the Python module beside it, a chat template naming any file reads that file into
the training text and the logged model, a folder name with `..` writes outside the runs folder. Run names are
checked by the configs themselves (letters, digits, '.', '_', '-'). Paths are checked here, against the roots
the operator sets on the machines that run flows:

    QTUNING_ALLOWED_ROOTS=/data/sft:/models:/srv/qtuning/runs   (os.pathsep-separated)

When the variable is set, each local path a config names (the data files, a model folder, a chat-template file,
an lm-eval task YAML, an accelerate config file, the runs folder and a run's output folder) must resolve, links
followed, inside one of the roots; lm-eval tasks are the bundled qt_* tasks, a name of lm-eval's own registry
(code that ships with the installed package) or a YAML inside a root. Unset, nothing is confined: one user on
their own machine. Set it in the environment of `qtuning serve` and of every `prefect worker start` once their
server is reachable by others (README, "Beyond one machine"); the flows check their parameters first.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel

from qtuning.config import BUNDLED_MODEL, DATA_PRESETS, ConfigError, is_template_text

ROOTS_ENV = "QTUNING_ALLOWED_ROOTS"


def allowed_roots(value: str | None = None) -> list[Path] | None:
    """The operator's roots (resolved), or None when nothing is confined."""
    value = os.environ.get(ROOTS_ENV) if value is None else value
    if not value or not value.strip():
        return None
    return [Path(p).expanduser().resolve() for p in value.split(os.pathsep) if p.strip()]


def _inside(path: Path, roots: list[Path]) -> bool:
    resolved = path.expanduser().resolve()  # links followed: a link inside a root to /etc is outside
    return any(resolved == r or resolved.is_relative_to(r) for r in roots)


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "~", ".")) or os.sep in value or value.endswith((".yaml", ".yml", ".jsonl", ".json", ".parquet"))


def _paths(cfg: BaseModel) -> Iterable[tuple[str, str, bool]]:
    """(field, value, always_a_path) for each field of `cfg` that can name a local path, at any depth."""
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        kind = type(cfg).__name__
        if isinstance(value, BaseModel):
            for field, v, always in _paths(value):
                yield f"{name}.{field}", v, always
        elif value is None:
            continue
        elif kind == "ModelConfig" and name == "name" and value != BUNDLED_MODEL:
            yield name, value, False  # a folder, or a hub id (which names no local file)
        elif kind == "ModelConfig" and name == "chat_template" and not is_template_text(value):
            yield name, value, True
        elif kind == "DataConfig" and name in ("source", "eval_source") and value not in DATA_PRESETS:
            yield name, value, False
        elif kind == "EvalConfig" and name == "tasks":
            for i, task in enumerate(value):
                if _looks_like_path(task):
                    yield f"{name}[{i}]", task, True
        elif kind == "TrainingConfig" and name in ("accelerate_config", "output_dir"):
            yield name, value, True
        elif kind == "PipelineConfig" and name == "runs_dir":
            yield name, value, True


def confinement_problems(configs: dict[str, BaseModel], roots: list[Path] | None) -> list[str]:
    """One message per path outside the roots (none when `roots` is None)."""
    if roots is None:
        return []
    problems = []
    for prefix, cfg in configs.items():
        for field, value, always in _paths(cfg):
            path = Path(value)
            # a model or data source that names nothing on disk and is not written as a path is a hub id
            local = always or path.expanduser().exists() or value.startswith(("/", "~", "."))
            if local and not _inside(path, roots):
                problems.append(f"{prefix}.{field}: {value!r} is outside the allowed roots")
    return problems


def credential_problems(configs: dict[str, BaseModel]) -> list[str]:
    """One message per tracking URI of `configs` that carries a password. A flow's parameters are stored by
    Prefect's server (and shown in its UI) before the flow can do anything about them: credentials belong in the
    environment of the machines that run flows. `qtuning run` and `qtuning sweep` move a URI's password there
    before they call a flow, so only a parameter sent through the API can carry one."""
    from urllib.parse import urlsplit

    problems = []
    for prefix, cfg in configs.items():
        pipeline = cfg if type(cfg).__name__ == "PipelineConfig" else getattr(cfg, "pipeline", None)
        uri = getattr(pipeline, "tracking_uri", None)
        if uri and urlsplit(uri).password is not None:
            where = prefix if pipeline is cfg else f"{prefix}.pipeline"
            problems.append(f"{where}.tracking_uri carries a password, which Prefect stores with the run's parameters; "
                            "send the URI without it and set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD (an "
                            "MLflow server) or PGPASSWORD (PostgreSQL) in the environment of the machines that run flows")
    return problems


def check_confined(**configs: BaseModel | None) -> None:
    """Refuse, all at once and before any work, the paths of `configs` outside $QTUNING_ALLOWED_ROOTS and a
    tracking URI with a password in it."""
    given = {k: v for k, v in configs.items() if v is not None}
    if secrets := credential_problems(given):
        raise ConfigError("; ".join(secrets))
    roots = allowed_roots()
    problems = confinement_problems(given, roots)
    if problems:
        where = os.pathsep.join(str(r) for r in roots or [])
        raise ConfigError(
            "; ".join(problems) + f" ({ROOTS_ENV}={where}); put the file under an allowed root, or have the operator "
            f"add its folder to {ROOTS_ENV} on the machines that run flows"
        )
