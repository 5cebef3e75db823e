"""Full-data SFT against pruned arms on the same model, data, steps and evaluation; the comparison table.

Shared steps run once: the data and the EU scores are computed here and are cache hits inside each arm, and
an arm whose inputs did not change (the full-data baseline, typically) is a cache hit across comparisons.

    from flows.compare import compare
    result = compare(CompareConfig.load("compare.yaml"))
    print(result.table)
"""

from __future__ import annotations

from prefect import flow

from qtuning.config import CompareConfig
from qtuning.confine import check_confined
from flows.experiment import run_arms, zero_shot
from tasks.comparison import compare_arms
from tasks.fanout import ArmCall
from tasks.data import fetch_assets, log_data, prepare_data
from tasks.records import ComparisonResult
from tasks.registry import register_best
from tasks.runs import open_run
from tasks.scoring import log_scores, score_eu
from tasks.tracking import run_status


@flow(name="compare", flow_run_name="compare-{config.name}")
def compare(config: CompareConfig = CompareConfig()) -> ComparisonResult:
    """Run every arm of `config` (and the zero-shot row if asked) and build the comparison table."""
    check_confined(config=config)  # a deployment's parameters: paths only under $QTUNING_ALLOWED_ROOTS
    pipeline, ref = config.pipeline, config.reference_arm
    parent = open_run(config.name, pipeline, config, kind="comparison")
    with run_status(parent):
        fetch_assets(config.model, config.data, config.evaluation)
        data = prepare_data(config.data, config.model, pipeline)
        log_data(parent, data)
        scores = score_eu(data, config.model, pipeline, ref.pruning.entropy_scope, config.training.seed)
        log_scores(parent, scores, ref.pruning.sample_ratio if ref.pruning.sample == "qtuning" else None, title="base model")
        calls = [ArmCall(config=config.experiment(arm), mode=arm.mode, static_batch=arm.static_batch) for arm in config.arms]
        arms = run_arms(calls, config.evaluation, pipeline, parent)  # here, or on pipeline.work_pool's workers
        if pipeline.zero_shot:
            arms.insert(0, zero_shot(config.model, config.evaluation, pipeline, parent))
        result = compare_arms(parent, arms, baseline=config.baseline_arm.name)
        if pipeline.register_best:
            register_best(parent, arms)
        return result
