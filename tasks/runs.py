"""MLflow runs of a pipeline: one parent per comparison, one child per arm, opened with their config."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import BaseModel

from qtuning.config import PipelineConfig
from tasks.tracking import RunRef, create_run, log_config, resolve_tracking_uri, set_tags


@task(name="open_run", cache_policy=NO_CACHE)
def open_run(name: str, pipeline: PipelineConfig, config: BaseModel | None = None, parent: RunRef | None = None,
             kind: str = "arm") -> RunRef:
    """Create a RUNNING MLflow run (a child of `parent`) and log `config` as params and as its YAML."""
    uri = parent.tracking_uri if parent else resolve_tracking_uri(pipeline.tracking_uri)
    tags = {"qtuning.kind": kind, "prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name)}
    run = create_run(uri, pipeline.experiment_name, name, parent=parent, tags=tags)
    if config is not None:
        log_config(run, config, "config/config.yaml")
        set_tags(run, {"qtuning.config_class": type(config).__name__})
    return run
