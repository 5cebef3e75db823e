"""The arms of a comparison or a sweep as flow runs on a Prefect work pool, gathered back into one list.

`pipeline.work_pool` set: each (seed, arm) becomes a run of the `experiment` deployment registered on that pool
(`prefect.deployments.run_deployment`, submitted without waiting, linked to this flow run as a subflow), the pool's
workers train them in parallel, and `arms_on_pool` waits for every one (polling its state, as run_deployment does) and
returns their results in the order the arms were given, exactly what the serial path returns. How many train at
once is Prefect's concurrency: the workers' `--limit`, the pool's or a queue's concurrency limit.

What the workers need, beyond the server: the deployment on that pool (`qtuning serve --work-pool POOL --flows
experiment`); the runs folder (`pipeline.runs_dir`) at a path every worker and this process see (cache records are
relocated when it is mounted elsewhere, tasks/stage.py); and the experiment flow's result, which this process reads
back from Prefect's result storage (PREFECT_LOCAL_STORAGE_PATH on a shared folder, or a storage block set as
PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK).
"""

from __future__ import annotations

from typing import Literal

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from qtuning.config import ConfigError, EvalConfig, ExperimentConfig, PipelineConfig
from tasks.records import ArmResult
from tasks.tracking import RunRef

ARM_TIMEOUT_S = 7 * 24 * 3600  # how long the parent waits for one arm: a week, i.e. as long as the arm takes
POLL_S = 5.0  # seconds between two looks at an arm's state (run_deployment's own default)


class ArmCall(BaseModel):
    """One arm as the `experiment` flow takes it: the run's config, its scoring mode and static batch rule."""

    model_config = ConfigDict(frozen=True)

    config: ExperimentConfig
    mode: Literal["dynamic", "static"] = "dynamic"
    static_batch: Literal["scaled", "same"] = "scaled"


def check_pool(pipeline: PipelineConfig) -> None:
    """ConfigError, before anything is submitted, when the pool's deployment cannot take the arms: no server, no
    such deployment, or the deployment is on another pool. The message says what to run."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    pool, name = pipeline.work_pool, pipeline.experiment_deployment
    if not PREFECT_API_URL.value():
        raise ConfigError(f"pipeline.work_pool: {pool!r} needs a Prefect server the workers reach; start one "
                          "(`prefect server start`) and set PREFECT_API_URL=http://HOST:4200/api here and on the workers")
    register = f"`qtuning serve --work-pool {pool} --flows experiment`"
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise ConfigError(f"pipeline.work_pool: {pool!r}: no deployment {name!r} on the Prefect server; register it "
                              f"with {register}") from None
    from tasks.flow_runs import ensure_heartbeat_automation

    ensure_heartbeat_automation()  # a dead worker's arm is set CRASHED, and this flow stops waiting for it
    if deployment.work_pool_name != pool:
        raise ConfigError(f"pipeline.work_pool: the deployment {name!r} runs on work pool "
                          f"{deployment.work_pool_name!r}, not {pool!r}; register it on {pool!r} with {register}, or set "
                          f"pipeline.work_pool: {deployment.work_pool_name}")


def wait_for_end(flow_run_id, poll_s: float = POLL_S):
    """The flow run once its state is final (completed, failed, crashed, cancelled), polled as run_deployment
    polls when it waits; TimeoutError after ARM_TIMEOUT_S."""
    import time

    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + ARM_TIMEOUT_S
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"flow run {run.name} ({flow_run_id}) still {run.state.name if run.state else 'new'} "
                                   f"after {ARM_TIMEOUT_S} s")
            time.sleep(poll_s)


@task(name="arms_on_pool", cache_policy=NO_CACHE)
def arms_on_pool(calls: list[ArmCall], evaluation: EvalConfig, pipeline: PipelineConfig,
                 parent: RunRef | None) -> list[ArmResult]:
    """Submit every arm to `pipeline.work_pool`, wait for all of them, and return their results in order.

    An arm that fails does not stop the others (each is a run of its own on its own worker): when all have ended,
    a RuntimeError names every arm that did not complete, its flow run and its final state. A re-run of the parent
    finds the finished arms' stages in their caches and redoes only what is missing."""
    from prefect.deployments import run_deployment

    log = get_run_logger()
    check_pool(pipeline)
    child = pipeline.model_copy(update={"work_pool": None})  # an arm runs where it lands, and fans out nothing
    submitted = []
    for call in calls:
        params = {"config": call.config.model_dump(mode="json"), "evaluation": evaluation.model_dump(mode="json"),
                  "pipeline": child.model_dump(mode="json"), "mode": call.mode, "static_batch": call.static_batch,
                  "parent": parent.model_dump(mode="json") if parent is not None else None}
        run = run_deployment(pipeline.experiment_deployment, parameters=params, timeout=0,
                             flow_run_name=f"experiment-{call.config.name}", tags=["qtuning", "qtuning.arm"])
        log.info(f"arm {call.config.name}: flow run {run.name} ({run.id}) submitted to work pool {pipeline.work_pool!r}")
        submitted.append((call, run))
    results: list[ArmResult | None] = []
    failed = []
    for call, run in submitted:
        final = wait_for_end(run.id)
        if final.state is None or not final.state.is_completed():
            failed.append(f"{call.config.name} (flow run {final.name}, {final.id}): "
                          f"{final.state.name if final.state else 'no state'}"
                          f"{': ' + final.state.message if final.state and final.state.message else ''}")
            results.append(None)
            continue
        results.append(final.state.result())
        log.info(f"arm {call.config.name}: completed on the pool ({final.total_run_time})")
    if failed:
        if parent is not None:  # the failed arms' MLflow runs, left RUNNING by a worker that died, end now
            from tasks.flow_runs import close_runs_of_ended_flow_runs

            for run_id, name, state in close_runs_of_ended_flow_runs(parent.tracking_uri):
                log.warning(f"MLflow run {name} ({run_id}) ended: its flow run is {state}")
        raise RuntimeError(f"{len(failed)} of {len(submitted)} arms on work pool {pipeline.work_pool!r} did not complete: "
                           + "; ".join(failed) + ". Run the same command again: the finished arms are cache hits.")
    return [r for r in results if r is not None]
