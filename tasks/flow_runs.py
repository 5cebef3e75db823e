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
