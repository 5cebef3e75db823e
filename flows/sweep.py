"""A sweep: the full-data baseline and a grid of pruned arms, per seed, under one MLflow parent run.

Every arm is the `experiment` flow (here, or on pipeline.work_pool's workers in parallel), so every stage is cached by content: the baseline of a seed trains once
(also across sweeps that share it), and a sweep interrupted halfway and started again redoes only what is
missing.

    from flows.sweep import sweep
    sweep(SweepConfig.load("configs/sweeps/paper-grid.yaml"))
"""

from __future__ import annotations

from prefect import flow

from flows.experiment import run_arms
from qtuning.config import SweepConfig
from qtuning.confine import check_confined
from tasks.fanout import ArmCall
from tasks.data import fetch_assets, log_data, prepare_data
from tasks.records import SweepResult
from tasks.runs import open_run
from tasks.comparison import summarize_sweep
from tasks.tracking import run_status


@flow(name="sweep", flow_run_name="sweep-{config.name}")
def sweep(config: SweepConfig = SweepConfig()) -> SweepResult:
    """Train and benchmark every (seed, arm) of `config`; the result is the aggregated table."""
    check_confined(config=config)  # a deployment's parameters: paths only under $QTUNING_ALLOWED_ROOTS
    pipeline, comparisons = config.pipeline, config.comparisons()
    several = len(comparisons) > 1
    parent = open_run(config.name, pipeline, config, kind="sweep")
    with run_status(parent):
        fetch_assets(config.model, config.data, config.evaluation)
        log_data(parent, prepare_data(config.data, config.model, pipeline))
        calls, keys = [], []
        for cmp in comparisons:
            seed = cmp.training.seed
            for arm in cmp.arms:
                run_cfg = cmp.experiment(arm)
                if several:
                    run_cfg = run_cfg.model_copy(update={"name": f"{arm.name}-seed{seed}"})
                calls.append(ArmCall(config=run_cfg, mode=arm.mode, static_batch=arm.static_batch))
                keys.append((seed, arm.name))
        arms = run_arms(calls, config.evaluation, pipeline, parent)  # here, or on pipeline.work_pool's workers
        results = [(seed, r.model_copy(update={"name": name})) for (seed, name), r in zip(keys, arms)]
        return summarize_sweep(parent, results, baseline="full")
