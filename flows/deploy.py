"""Serve qtuning's flows as Prefect deployments: a schedule, and default parameters from a config file.

    qtuning serve --config compare.yaml --cron "0 3 * * *"     # = python -m commands.serve ...

Each flow becomes the deployment `<flow>/qtuning-<flow>` (`compare/qtuning-compare`, ...), served by this
process (`prefect.serve`): it polls the server for due runs and executes each in a subprocess, `limit` at a
time. Its parameters are the flow's pydantic configs, so the Prefect UI shows them as a form pre-filled
with the defaults below; `prefect deployment run` and the UI's "Custom run" override them.

Default parameters, from one `CompareConfig` file (the built-in defaults without one):

- compare:    config = the file;
- experiment: config = the file's first pruned arm as one experiment (`CompareConfig.experiment`), with the
              file's evaluation, pipeline and the arm's mode;
- sweep:      config = the `--sweep-config` file, typed by the flow's own annotation (flows/sweep.py);
- health:     model, data, evaluation and pipeline of the file (flows/health.py, seconds, nothing trained).

With `--work-pool` the deployments are registered on a Prefect work pool instead, and `prefect worker start`
processes (on this machine or others) run them; the code comes from `--source` (this checkout by default).

Schedules need a real Prefect server (`prefect server start`, `PREFECT_API_URL`); the temporary server that
Prefect starts when no URL is set refuses them and would stop with this process anyway.

Only the standard library and qtuning.config are imported at module level; Prefect loads on use.
"""

from __future__ import annotations

import importlib
import inspect
import os
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qtuning.config import CompareConfig, ConfigError, load_yaml

# flow name -> "module:function"
FLOWS: dict[str, str] = {
    "experiment": "flows.experiment:experiment",
    "compare": "flows.compare:compare",
    "sweep": "flows.sweep:sweep",
    "health": "flows.health:health",
}
DEFAULT_FLOWS = ("experiment", "compare", "sweep")
DEPLOYMENT_PREFIX = "qtuning"

PREFECT_DEFAULTS = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def resolve_flow_names(requested: Sequence[str] | None) -> list[str]:
    """`--flows` -> flow names: unknown names are refused; with none given, the defaults."""
    if not requested:
        return list(DEFAULT_FLOWS)
    unknown = [n for n in requested if n not in FLOWS]
    if unknown:
        raise ConfigError(f"--flows: unknown flow(s) {', '.join(unknown)}; choose from {', '.join(FLOWS)}")
    return list(dict.fromkeys(requested))


def load_flow(name: str, source: str | None = None):
    """The flow object; with `source` (a checkout folder or a git URL), loaded from there as a worker will."""
    module, _, attr = FLOWS[name].partition(":")
    if source is None:
        return getattr(importlib.import_module(module), attr)
    from prefect import Flow

    return Flow.from_source(source=source, entrypoint=f"{module.replace('.', '/')}.py:{attr}")


def _config_type(fn) -> tuple[type, bool]:
    """The annotation of a flow function's `config` parameter, and whether it has a default."""
    param = inspect.signature(fn).parameters["config"]
    return typing.get_type_hints(fn)["config"], param.default is not inspect.Parameter.empty


def default_parameters(name: str, config: CompareConfig, sweep_config: str | Path | None = None) -> dict[str, Any]:
    """The deployment's default parameters (JSON-ready dicts) for flow `name`, from one CompareConfig."""
    def js(model) -> Any:
        return model.model_dump(mode="json")

    if name == "compare":
        return {"config": js(config)}
    if name == "experiment":
        arm = config.reference_arm
        return {"config": js(config.experiment(arm)), "evaluation": js(config.evaluation),
                "pipeline": js(config.pipeline), "mode": arm.mode,
                "static_batch": arm.static_batch}
    if name == "health":
        return {"model": js(config.model), "data": js(config.data), "evaluation": js(config.evaluation),
                "pipeline": js(config.pipeline)}
    if name == "sweep":
        cls, has_default = _config_type(load_flow("sweep").fn)
        if sweep_config is not None:
            return {"config": js(load_yaml(cls, sweep_config))}
        if not has_default:
            raise ConfigError(f"the sweep flow needs a {cls.__name__}: pass --sweep-config FILE, or leave sweep out of --flows")
        return {}
    raise KeyError(name)


def build_deployments(
    names: Sequence[str],
    config: CompareConfig,
    *,
    cron: str | None = None,
    interval: float | None = None,
    timezone: str | None = None,
    sweep_config: str | Path | None = None,
    prefix: str = DEPLOYMENT_PREFIX,
    paused: bool = False,
    source: str | None = None,
) -> list:
    """One RunnerDeployment per flow: `<prefix>-<flow>`, the schedule (none: runs only when triggered), defaults.

    Without `source` they are for `serve` (this process runs them; entrypoints by module path). With `source`,
    a checkout folder every worker sees at the same path or a git URL, they are for `deploy_to_pool`: a
    worker fetches the code from there for each run.
    """
    if cron and interval:
        raise ConfigError("give --cron or --interval, not both")
    if sweep_config is not None and "sweep" not in names:
        raise ConfigError(f"--sweep-config {sweep_config} is for the sweep flow, which is not served; add sweep to --flows")
    for k, v in PREFECT_DEFAULTS.items():
        os.environ.setdefault(k, v)
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron, Interval

    from tasks.tracking import git_commit

    schedules = [Cron(cron, timezone=timezone)] if cron else [Interval(interval, timezone=timezone)] if interval else []
    params = {n: default_parameters(n, config, sweep_config) for n in names}  # every config problem before any deployment
    # served: by module path, so the runner's subprocess imports the installed package from any working directory
    how = {"entrypoint_type": EntrypointType.MODULE_PATH} if source is None else {}
    return [
        load_flow(n, source).to_deployment(
            name=f"{prefix}-{n}", schedules=schedules, paused=paused, parameters=params[n], tags=["qtuning"],
            version=git_commit(), **how,
        )
        for n in names
    ]


def check_server() -> str:
    """The URL of the Prefect server to serve on; ConfigError (saying how to start one) when none answers."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ConfigError("no Prefect server: schedules need one. Start it with `prefect server start` and set "
                          "PREFECT_API_URL=http://127.0.0.1:4200/api (or `prefect config set PREFECT_API_URL=...`)")
    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
    if error is not None:
        raise ConfigError(f"the Prefect server at {url} does not answer ({error}); is `prefect server start` running?")
    return url


def describe(deployments: Sequence) -> str:
    """One line per deployment: its full name, schedule and default parameter names."""
    def when(s) -> str:
        tz = f" ({s.timezone})" if getattr(s, "timezone", None) not in (None, "UTC") else ""
        if getattr(s, "cron", None):
            return f"cron '{s.cron}'{tz}"
        return f"every {s.interval.total_seconds():g} s{tz}" if getattr(s, "interval", None) else str(s)

    lines = []
    for d in deployments:
        sched = ", ".join(when(s.schedule) for s in d.schedules or []) or "none (triggered by hand)"
        lines.append(f"  {d.flow_name}/{d.name}: schedule {sched}; parameters {', '.join(d.parameters) or '(flow defaults)'}")
    return "\n".join(lines)


def serve(deployments: Sequence, limit: int | None = 1) -> None:
    """Register the deployments and execute their runs until interrupted (schedules are paused on exit)."""
    from prefect import serve as prefect_serve

    prefect_serve(*deployments, limit=limit)


def deploy_to_pool(deployments: Sequence, work_pool: str) -> None:
    """Register deployments built with a `source` on a work pool (it must exist); its workers run them."""
    from prefect import deploy as prefect_deploy
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(work_pool)
        except ObjectNotFound:
            raise ConfigError(f"no work pool {work_pool!r}; create it with `prefect work-pool create {work_pool} "
                              f"--type process`") from None
    prefect_deploy(*deployments, work_pool_name=work_pool, build=False, push=False, ignore_warnings=True,
                   print_next_steps_message=False)
