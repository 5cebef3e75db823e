"""One configuration end to end: prepare -> score -> prune -> train -> evaluate, tracked in one MLflow run.

    from flows.experiment import experiment
    experiment(ExperimentConfig.load("run.yaml"), EvalConfig(limit=50))
"""

from __future__ import annotations

from typing import Literal

from prefect import flow

from qtuning.config import ExperimentConfig, ModelConfig, PipelineConfig
from qtuning.config import EvalConfig
from qtuning.confine import check_confined
from tasks.comparison import arm_result
from tasks.data import fetch_assets, log_data, prepare_data
from tasks.evaluation import evaluate, log_evaluation
from tasks.fanout import ArmCall, arms_on_pool
from tasks.pruning import log_plan, prune
from tasks.records import ArmResult
from tasks.registry import log_model
from tasks.runs import open_run
from tasks.scoring import score_eu
from tasks.selection import log_selection
from tasks.tracking import RunRef, run_status
from tasks.training import log_training, train_arm


# persist_result: a parent that submitted this run to a work pool reads the ArmResult back (tasks/fanout.py)
@flow(name="experiment", flow_run_name="experiment-{config.name}", persist_result=True)
def experiment(
    config: ExperimentConfig,
    evaluation: EvalConfig = EvalConfig(),
    pipeline: PipelineConfig = PipelineConfig(),
    mode: Literal["dynamic", "static"] = "dynamic",
    parent: RunRef | None = None,
    static_batch: Literal["scaled", "same"] = "scaled",
) -> ArmResult:
    """Train and benchmark one configuration; its MLflow run is a child of `parent` when given."""
    check_confined(config=config, evaluation=evaluation, pipeline=pipeline)  # paths only under $QTUNING_ALLOWED_ROOTS
    run = open_run(config.name, pipeline, config, parent=parent, kind="arm")
    with run_status(run):
        fetch_assets(config.model, config.data, evaluation)
        data = prepare_data(config.data, config.model, pipeline)
        log_data(run, data)
        scores = score_eu(data, config.model, pipeline, config.pruning.entropy_scope, config.training.seed)
        plan = prune(config, mode, data, scores, pipeline, static_batch)
        log_plan(run, plan)
        trained = train_arm.with_options(retries=pipeline.train_retries)(plan.experiment, data, run, pipeline)
        log_training(run, trained)
        log_selection(run, trained, plan.experiment, mode)
        if pipeline.log_model:
            log_model(run, trained)
        evaluated = evaluate(trained.final_dir, evaluation, pipeline)
        log_evaluation(run, evaluated, evaluation)
        return arm_result(config.name, run, evaluated, trained)


def run_arms(calls: list[ArmCall], evaluation: EvalConfig, pipeline: PipelineConfig, parent: RunRef | None) -> list[ArmResult]:
    """The arms' results in the order given: trained on pipeline.work_pool's workers in parallel when it is set,
    else here, one after another."""
    if pipeline.work_pool:
        return arms_on_pool(calls, evaluation, pipeline, parent)
    return [experiment(c.config, evaluation, pipeline, c.mode, parent, c.static_batch) for c in calls]


@flow(name="zero-shot")
def zero_shot(model: ModelConfig, evaluation: EvalConfig, pipeline: PipelineConfig, parent: RunRef | None = None) -> ArmResult:
    """Benchmark the untrained model: the comparison's 'zero-shot' row."""
    check_confined(model=model, evaluation=evaluation, pipeline=pipeline)
    run = open_run("zero-shot", pipeline, model, parent=parent, kind="zero-shot")
    with run_status(run):
        evaluated = evaluate(model.name, evaluation, pipeline)
        log_evaluation(run, evaluated, evaluation)
        return arm_result("zero-shot", run, evaluated)
