"""The model registry: an arm's final model logged to its MLflow run (pipeline.log_model) and the best arm of a
comparison registered (pipeline.register_best), by MLflow's documented functions."""

from __future__ import annotations

import math

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.records import ArmResult, TrainRecord
from tasks.tracking import FLUENT_URI_LOCK, RunRef, fluent_run, set_tags

MODEL_ARTIFACT = "model"


@task(name="log_model", cache_policy=NO_CACHE)
def log_model(run: RunRef, trained: TrainRecord) -> str:
    """The final model folder as an MLflow transformers model of the arm's run (a copy of the weights); its URI is
    tagged on the run (qtuning.model_uri) for register_best."""
    import mlflow.transformers

    with fluent_run(run):
        info = mlflow.transformers.log_model(transformers_model=trained.final_dir, name=MODEL_ARTIFACT, task="text-generation")
    set_tags(run, {"qtuning.model_uri": info.model_uri})
    get_run_logger().info(f"{trained.name}: model logged as {info.model_uri}")
    return info.model_uri


def best_arm(arms: list[ArmResult]) -> ArmResult | None:
    """The trained arm with a logged model and the highest benchmark average; ties go to the lower held-out loss."""
    candidates = [a for a in arms if a.model_uri and a.final_dir]
    if not candidates:
        return None
    return max(candidates, key=lambda a: (a.average, -(a.heldout_loss if a.heldout_loss is not None else math.inf)))


@task(name="register_best", cache_policy=NO_CACHE)
def register_best(parent: RunRef, arms: list[ArmResult]) -> str | None:
    """Register the best arm's logged model as '<comparison>-best' (mlflow.register_model: a new version each time)."""
    import mlflow

    best = best_arm(arms)
    if best is None:
        get_run_logger().warning("pipeline.register_best: no arm has a logged model (pipeline.log_model); nothing registered")
        return None
    name = f"{parent.name}-best"
    with FLUENT_URI_LOCK:  # the registry function reads MLflow's process-wide URI
        mlflow.set_tracking_uri(parent.tracking_uri)
        version = mlflow.register_model(best.model_uri, name, tags={"arm": best.name, "comparison_run": parent.run_id})
    set_tags(parent, {"qtuning.registered_model": f"{name}/{version.version}", "qtuning.best_arm": best.name})
    get_run_logger().info(f"registered {best.name} ({best.model_uri}) as {name} version {version.version}")
    return f"{name}/{version.version}"
