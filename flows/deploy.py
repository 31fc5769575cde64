"""The deployments, defined here rather than in the UI, and the process that serves them.

- ``watch-landing``: every ``watch.interval_s`` seconds, ingest new landing batches and emit
  ``dataset.updated`` when the data changed.
- ``predict``: score a folder with a registered version, on demand or on ``predict.cron``.
- ``retrain``: triggered by ``dataset.updated`` (the event's data hash becomes a parameter)
  and on the ``retrain.cron`` schedule. Deployment concurrency 1 with ENQUEUE: two batches
  landing close together give queued retrains, never two at once.

``python -m flows.deploy`` serves both until interrupted (``make up`` starts it).
"""

from __future__ import annotations

import argparse
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger

from flows.predict import predict_folder
from flows.retrain import retrain
from flows.watch import (
    DATASET_EVENT,
    WATCH_DEPLOYMENT,
    dataset_resource_id,
    free_watch_slot,
    read_watch_deployment,
    watch_landing,
)
from flows.worker import HEARTBEAT_S, POLL_S
from tasks.common.config import PipelineConfig, load_params
from tasks.common.errors import PipelineError
from tasks.common.workspace import Workspace


def build_deployments(ws: Workspace, cfg: PipelineConfig, interval_s: int | None = None) -> list[RunnerDeployment]:
    workspace = str(ws.root)
    watch = watch_landing.to_deployment(
        name=WATCH_DEPLOYMENT,
        interval=interval_s or cfg.watch.interval_s,
        parameters={"workspace": workspace},
        # A tick that would overlap a running one is dropped: the next tick sees the same disk state.
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        description="Ingest new landing batches; emit dataset.updated when the data changed.",
        tags=["continuous-training"],
    )
    trigger = DeploymentEventTrigger(
        name="new-labeled-data",
        expect={DATASET_EVENT},
        match={"prefect.resource.id": dataset_resource_id(ws)},
        parameters={"workspace": workspace, "data_hash": "{{ event.payload.data_hash }}"},
    )
    train = retrain.to_deployment(
        name="retrain",
        cron=cfg.retrain.cron,
        parameters={"workspace": workspace},
        triggers=[trigger],
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        description="Validate, prepare, train, evaluate and register on the current data.",
        tags=["continuous-training"],
    )
    score = predict_folder.to_deployment(
        name="predict",
        cron=cfg.predict.cron,
        parameters={"workspace": workspace, "folder": cfg.predict.folder or "", "model": cfg.predict.model},
        description="Score a folder of images with the champion (or another version); CSV in predictions/.",
        tags=["continuous-training"],
    )
    return [watch, train, score]


#: Flow runs send a heartbeat every HEARTBEAT_S seconds (flows/worker.py); a run silent for this
#: long (its process was killed) is marked Crashed (``CTL_CRASH_AFTER_S`` overrides it when the
#: automation is first created).
SILENCE_S = 120
CRASH_AUTOMATION = "ctl: mark flow runs without heartbeats as crashed"
PENDING_AUTOMATION = "ctl: mark flow runs stuck in Pending as crashed"


def ensure_crash_detection() -> None:
    """Automations that mark a run Crashed when it is silent for too long, so the UI shows the
    truth and the concurrency slot it holds is freed for the next run:

    - a Running run whose heartbeats stop (its process or machine was killed mid-run);
    - a run that stays Pending (it took a concurrency slot, then its process never started:
      e.g. the database went away while a worker was submitting it, and the worker could not
      even mark it Crashed). Without this, such a tick holds the watch's concurrency slot and
      every later tick is cancelled (seen after a PostgreSQL restart), at best until Prefect's
      deployment lease (300 s by default) runs out.
    """
    silence = int(os.environ.get("CTL_CRASH_AFTER_S", SILENCE_S))
    heartbeat = int(os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", HEARTBEAT_S))
    if silence < 2 * heartbeat:  # a live run would be marked Crashed between two heartbeats
        raise PipelineError(f"CTL_CRASH_AFTER_S={silence} must be at least twice the heartbeat period ({heartbeat} s)")
    terminal = {f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled", "Crashed")}
    _crash_when_silent(CRASH_AUTOMATION, "prefect.flow-run.heartbeat", {"prefect.flow-run.heartbeat", *terminal},
                       silence, f"no heartbeat for {silence} s")  # fmt: skip
    later = ("Running", "Cancelling", "Scheduled", "AwaitingConcurrencySlot", "Paused", "Suspended")
    moved_on = {f"prefect.flow-run.{state}" for state in later}
    _crash_when_silent(PENDING_AUTOMATION, "prefect.flow-run.Pending", moved_on | terminal, silence,
                       f"Pending for {silence} s: its process never started")  # fmt: skip


def _crash_when_silent(name: str, after: str, expect: set[str], seconds: int, message: str) -> None:
    """Automation ``name`` (created once): a flow run with an ``after`` event and none of
    ``expect`` within ``seconds`` is set Crashed."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    try:
        Automation.read(name=name)
        return
    except ValueError:
        pass
    Automation(
        name=name,
        trigger=EventTrigger(
            after={after},
            expect=expect,
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=seconds),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=message)],
    ).create()


def crash_orphaned_runs(deployments: list[str]) -> list[str]:
    """Mark runs of our deployments still Running/Pending as Crashed, at serve start-up.

    Only one serve process runs these deployments (``make up`` refuses a second), so when it
    starts, a run that claims to be running was orphaned by a killed predecessor. Left alone
    it would hold the retrain concurrency slot forever and every new trigger would queue
    behind it.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    live = [StateType.RUNNING, StateType.PENDING, StateType.CANCELLING]
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=deployments)),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=live))),
        )
        for run in runs:
            client.set_flow_run_state(run.id, Crashed(message="orphaned: the serve process was restarted"), force=True)
    return [run.name for run in runs]


def drop_missed_ticks(deployment: str = WATCH_DEPLOYMENT) -> int:
    """Delete the watch ticks that fell due while nothing served them, at serve start-up.

    The server schedules ticks ahead; after a stop of hours every one of them is late at once,
    and the new serve process would submit them all together (hundreds: one every
    ``watch.interval_s``), each only to be cancelled by the deployment's concurrency limit, while
    the burst keeps the server too busy to answer. One tick finds whatever the missed ones would
    have: the first tick after start-up does.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    due = FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),  # Late is one too
        expected_start_time=FlowRunFilterExpectedStartTime(before_=datetime.now(UTC)),
    )
    dropped = 0
    with get_client(sync_client=True) as client:
        while missed := client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])),
            flow_run_filter=due,
            limit=200,
        ):
            for run in missed:
                client.delete_flow_run(run.id)
            dropped += len(missed)
    return dropped


def free_stale_tick_slot(deployment: str = WATCH_DEPLOYMENT) -> int:
    """Free the watch deployment's concurrency slot at serve start-up; the slots it freed (0: none
    were taken, or the server refused).

    Nothing of this workspace's can hold it now (only this process serves the deployments), but
    the count may say otherwise: the embedded server keeps leases in memory, so a retrain (or a
    tick) that held the slot when the services stopped left it taken, and every tick would be
    cancelled from then on."""
    found = read_watch_deployment(deployment)
    limit = found.global_concurrency_limit if found else None
    if limit is None or limit.active_slots == 0:
        return 0
    return limit.active_slots if free_watch_slot(limit.name, logging.getLogger(__name__)) else 0


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the watch-landing and retrain deployments.")
    parser.add_argument("--workspace", default=".", help="the git + DVC repository (default: .)")
    parser.add_argument("--interval", type=int, default=None, help="override watch.interval_s (seconds)")
    args = parser.parse_args()
    from flows.server import require_api

    require_api()
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_S))  # inherited by flow runs
    ensure_crash_detection()
    ws = Workspace(Path(args.workspace).resolve())
    deployments = build_deployments(ws, load_params(ws.params), args.interval)
    if orphans := crash_orphaned_runs([d.name for d in deployments]):
        print(f"marked orphaned runs as crashed: {', '.join(orphans)}")
    if taken := free_stale_tick_slot():
        print(f"freed the watch ticks' concurrency slot ({taken} taken by runs that ended with the services)")
    if missed := drop_missed_ticks():
        print(f"dropped {missed} watch tick(s) that fell due while nothing served them")
    serve(*deployments, query_seconds=POLL_S)


if __name__ == "__main__":
    main()
