"""Prefect flow runs a command's process leaves open when it dies or is interrupted, and closing them.

`qtuning run` and `qtuning sweep` run their flow in their own process, against Prefect's temporary server unless
`PREFECT_API_URL` names one. A Ctrl-C reaches that server too, and the command leaves at once (commands/lifecycle);
a kill -9 leaves no time at all. Either way the flow run and its task runs stay RUNNING in Prefect's database,
and the UI and `prefect flow-run ls` show them running for ever.

So every flow run a command starts is tagged with its owner (`owned_by_this_process`): the host, and the pid with
the process's start time. `close_orphan_flow_runs` finds the runs of this host still RUNNING or PENDING whose owner
is gone and sets them, and their open task runs, CRASHED (Prefect's own state for a run whose process stopped
without reporting), saying which process was gone. The next `qtuning run` or `qtuning sweep` does it at start,
`qtuning runs --close-orphans` on demand.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

from tasks.tracking import alive, process_tags

HOST_TAG = "qtuning.host="  # + host name
OWNER_TAG = "qtuning.owner="  # + host/pid/process start time


def owner_tags() -> list[str]:
    t = process_tags()
    return [HOST_TAG + t["qtuning.host"], f"{OWNER_TAG}{t['qtuning.host']}/{t['qtuning.pid']}/{t['qtuning.pid_started']}"]


@contextlib.contextmanager
def owned_by_this_process() -> Iterator[None]:
    """Flow runs started inside the block (and their subflows and task runs) carry this process's owner tags."""
    from prefect import tags

    with tags(*owner_tags()):
        yield


def _owner(tag_list: list[str]) -> tuple[str, str, str] | None:
    """(host, pid, start time) from a run's owner tag, or None."""
    for tag in tag_list:
        if tag.startswith(OWNER_TAG):
            parts = tag[len(OWNER_TAG):].rsplit("/", 2)
            if len(parts) == 3 and parts[1].isdigit():
                return parts[0], parts[1], parts[2]
    return None


def close_orphan_flow_runs() -> list[tuple[str, str, str]]:
    """Set CRASHED the flow runs (and their open task runs) left RUNNING or PENDING by a process of this host that
    no longer exists; returns (flow run id, flow run name, pid) of each. Other hosts' runs and untagged runs (a
    deployment's, a user's own) are left alone."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter, FlowRunFilterId, FlowRunFilterState, FlowRunFilterStateType, FlowRunFilterTags, TaskRunFilter,
        TaskRunFilterState, TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    host = socket.gethostname()
    open_states = [StateType.RUNNING, StateType.PENDING]
    closed = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=open_states)),
            tags=FlowRunFilterTags(all_=[HOST_TAG + host])))
        for run in runs:
            owner = _owner(run.tags)
            if owner is None or owner[0] != host or alive(int(owner[1]), owner[2]):
                continue
            message = f"its process {owner[1]} on {host} is gone (killed or interrupted); closed by qtuning"
            open_tasks = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=open_states))))
            for task_run in open_tasks:
                client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
            closed.append((str(run.id), run.name, owner[1]))
    return closed


# --------------------------------------------------------------------------- liveness on any machine: heartbeats
HEARTBEAT_AUTOMATION = "qtuning: crash flow runs whose heartbeats stopped"
MISSED_HEARTBEATS = 3  # heartbeat periods without one before a run is declared crashed (Prefect's documented recipe)


def ensure_heartbeat_automation(within_s: float | None = None) -> str:
    """Prefect's documented zombie detection on the server PREFECT_API_URL names, created once (by name; updated
    when its window differs from this call's): every flow run emits a `prefect.flow-run.heartbeat` event each
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (the flow engine does, in a thread of the run's own process, on
    whichever machine it runs), and a run that sent one and
    then neither another nor a final state within `within_s` (default: 3 periods of this process's setting, which
    the workers should share) is set CRASHED by the server, with the reason. A worker machine that dies, a kill -9,
    a lost network: its runs stop reporting and are closed, whatever their host. Returns the automation's id."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification
    from prefect.settings import get_current_settings

    within = within_s or MISSED_HEARTBEATS * get_current_settings().flows.heartbeat_frequency
    try:
        existing = Automation.read(name=HEARTBEAT_AUTOMATION)
    except ValueError:  # not there yet
        existing = None
    if existing is not None and existing.trigger.within == timedelta(seconds=within):
        return str(existing.id)
    automation = Automation(
        name=HEARTBEAT_AUTOMATION,
        description="Sets CRASHED the flow runs that stopped sending heartbeats (qtuning: tasks/flow_runs.py); their "
                    "MLflow runs are ended by the next qtuning command or `qtuning runs --close-orphans`.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {within:g} s: its process or machine stopped reporting "
                                            "(closed by Prefect's heartbeat automation)")],
    )
    if existing is not None:  # the latest setting wins: a team sets one heartbeat frequency for all its machines
        existing.trigger = automation.trigger
        existing.actions = automation.actions
        existing.update()
        return str(existing.id)
    return str(automation.create().id)


def close_runs_of_ended_flow_runs(uri: str) -> list[tuple[str, str, str]]:
    """End the MLflow runs still RUNNING whose Prefect flow run (tag prefect.flow_run_id) has ended otherwise than
    by completing: CRASHED (by the heartbeat automation, or by `close_orphan_flow_runs`), CANCELLED or FAILED,
    on any host. The MLflow run ends KILLED (FAILED for a failed flow run) with the flow run's state and message
    as `qtuning.ended_by`. Flow runs the server does not know (another server's) are left alone. Returns (MLflow
    run id, run name, flow run state) of each run ended."""
    from uuid import UUID

    from mlflow.entities import ViewType
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    from tasks.tracking import client as mlflow_client

    c = mlflow_client(uri)
    experiments = [e.experiment_id for e in c.search_experiments(view_type=ViewType.ALL)]
    closed = []
    with get_client(sync_client=True) as prefect:
        for i in range(0, len(experiments), 100):
            runs = c.search_runs(experiments[i : i + 100], filter_string="attributes.status = 'RUNNING'",
                                 run_view_type=ViewType.ALL, max_results=10000)
            for run in runs:
                flow_run_id = run.data.tags.get("prefect.flow_run_id", "")
                try:
                    state = prefect.read_flow_run(UUID(flow_run_id)).state
                except (ValueError, ObjectNotFound):
                    continue
                if state is None or not state.is_final() or state.is_completed():
                    continue  # running, or completed (its flow ends the MLflow run itself)
                c.set_tag(run.info.run_id, "qtuning.ended_by",
                          f"its Prefect flow run {flow_run_id} is {state.name}: {state.message or 'no message'}")
                c.set_terminated(run.info.run_id, "FAILED" if state.is_failed() else "KILLED")
                closed.append((run.info.run_id, run.info.run_name, state.name))
    return closed
