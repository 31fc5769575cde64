"""The watch-landing flow: ingest new landing batches and announce the new data.

Run on an interval by the ``watch-landing`` deployment (``make up``). A tick compares the
landing zone with ``data/raw`` by content hash, so its state lives on disk, never in memory:
a tick that failed (server down, crash) is simply redone by the next one. When the data
changed it emits ``dataset.updated``, which triggers the ``retrain`` deployment.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

from flows.logs import project_logs_to_run
from flows.stages import ingest, ingest_markdown
from tasks.common.dvc import dvc_data_hash
from tasks.common.errors import PipelineError, WorkspaceBusy
from tasks.common.files import read_json, write_json
from tasks.common.processes import stop_leftover_stage
from tasks.common.workspace import Workspace, workspace_lock
from tasks.fetch import params_sha256

DATASET_EVENT = "dataset.updated"
PIPELINE_LOCK = "pipeline"
WATCH_DEPLOYMENT = "watch-landing"
#: How long a retrain waits for a running tick to end before it goes on with ticks not paused.
TICK_WAIT_S = 30
#: The paused ticks' slot is leased for this long and renewed while the retrain runs; after a
#: kill -9 the server frees it within this plus its repossessor loop (15 s). Prefect's minimum.
PAUSE_LEASE_S = 60


def dataset_resource_id(ws: Workspace) -> str:
    return f"ctl.dataset.{ws.root.name}"


def announced_path(ws: Workspace) -> Path:
    return ws.cache / "announced.json"


def needs_announcement(ws: Workspace, data_hash: str | None) -> bool:
    """Whether this data hash has not been announced yet (at-least-once: the record is written
    only after the event was handed to Prefect, so a crash in between re-announces)."""
    if not data_hash:
        return False
    path = announced_path(ws)
    return not path.is_file() or read_json(path).get("data_hash") != data_hash


@contextmanager
def ticks_paused(ws: Workspace) -> Iterator[bool]:
    """Hold the ``watch-landing`` deployment's concurrency slot while a retrain holds ``ws``.

    A tick then could only find the workspace busy, yet it would still cost a process (Python,
    Prefect and this project imported: 3.5-5 CPU seconds) and the server's work for a flow run,
    taken from the training beside it. Holding the slot, the server cancels each tick due
    meanwhile ("Deployment concurrency limit reached.") before any process starts.

    Only for the watch that serves this same workspace (``make up``, the embedded profile), whose
    deployment has a concurrency limit; anywhere else (no server, a worker's checkout, the
    cluster profile's watch without a limit) nothing is held. Yields whether ticks are paused.
    The slot is an optimisation only: failing to take or renew it leaves the ticks running.

    The embedded server keeps leases in memory: one restarted while the slot is held forgets the
    lease but not the count, and no tick would run again. So the slot is also set free on the way
    out (``free_watch_slot``), and at serve start-up (flows/deploy.py)."""
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.concurrency.sync import concurrency
    from prefect.context import FlowRunContext

    logger = get_run_logger()
    name = watch_slot(ws, logger)
    if name is None:
        yield False
        return
    run = FlowRunContext.get()
    holder = ConcurrencyLeaseHolder(type="flow_run", id=run.flow_run.id) if run and run.flow_run else None
    paused, stack = False, ExitStack()
    try:
        stack.enter_context(concurrency(
            name, occupy=1, timeout_seconds=TICK_WAIT_S, lease_duration=PAUSE_LEASE_S, strict=True, holder=holder,
            raise_on_lease_renewal_failure=False,
        ))  # fmt: skip
        paused = True
        logger.info("watch ticks paused while this run holds the workspace (the server cancels them)")
    except Exception as exc:  # a tick still running after TICK_WAIT_S, a server error
        logger.info("watch ticks not paused during this run: %s", str(exc) or type(exc).__name__)
    try:
        yield paused
    finally:
        try:
            stack.close()  # releases the lease
        except Exception as exc:  # the server is down: never a reason to fail the run
            logger.warning("the watch ticks' lease was not released: %s", exc)
        if paused:
            free_watch_slot(name, logger)


def read_watch_deployment(deployment: str = WATCH_DEPLOYMENT) -> Any | None:
    """The watch flow's deployment of that name as the server has it; None when there is none."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(f"{watch_landing.name}/{deployment}")
        except ObjectNotFound:
            return None


def watch_slot(ws: Workspace, logger: Any) -> str | None:
    """The name of the concurrency limit of the watch deployment serving ``ws``, if there is one."""
    try:
        deployment = read_watch_deployment()
    except Exception as exc:  # no server to ask: nothing to pause
        logger.info("watch ticks not paused: %s", exc)
        return None
    if deployment is None or deployment.global_concurrency_limit is None:
        return None
    if (deployment.parameters or {}).get("workspace") != str(ws.root):
        return None
    return deployment.global_concurrency_limit.name


def free_watch_slot(name: str, logger: Any) -> bool:
    """Set the watch's concurrency limit to no slot taken; whether the server did. Harmless if a
    tick has just taken it: a second tick would find the workspace locked and end at once."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    try:
        with get_client(sync_client=True) as client:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=0))
    except Exception as exc:  # the server is down: serve start-up frees it
        logger.warning("could not free the watch ticks' slot %s (%s); `ctl up` frees it", name, exc)
        return False
    return True


def reported_invalid_path(ws: Workspace) -> Path:
    return ws.cache / "invalid-batches.json"


def first_reports(ws: Workspace, invalid: list[str]) -> list[str]:
    """The invalid batch names not reported before. All are recorded, so a misnamed folder left in
    the landing zone fails one tick, not every tick (as data/quarantine does for rejected batches)."""
    path = reported_invalid_path(ws)
    seen = set(read_json(path)) if path.is_file() else set()
    new = sorted(set(invalid) - seen)
    if new:
        write_json(path, sorted(seen | set(invalid)))
    return new


@flow(name="watch-landing", log_prints=True)
def watch_landing(workspace: str = ".") -> dict[str, Any]:
    """One tick: ingest whatever is new and emit ``dataset.updated`` when the data changed."""
    ws = Workspace(Path(workspace).resolve())
    logger = get_run_logger()
    try:
        # Never wait on a running retrain: its DVC stages read data/raw. The next tick retries.
        with project_logs_to_run(), workspace_lock(ws, PIPELINE_LOCK, blocking=False):
            stop_leftover_stage(ws)  # a retrain killed outright may have left a DVC stage reading data/raw
            result = ingest(str(ws.root))
    except WorkspaceBusy:
        logger.info("a retrain holds the workspace; new batches are picked up by a later tick")
        return {"busy": True, "ingested": [], "announced": False}
    announced = False
    if needs_announcement(ws, result["data_hash"]):
        payload = {
            "data_hash": result["data_hash"],
            "benchmark_hash": dvc_data_hash(ws.benchmark.with_suffix(".dvc")) or "",
            "params_sha256": params_sha256(ws),
            "batch_ids": result["ingested"],
            "workspace": str(ws.root),
        }
        emit_event(
            event=DATASET_EVENT,
            resource={"prefect.resource.id": dataset_resource_id(ws), "prefect.resource.name": ws.root.name},
            payload=payload,
        )
        write_json(announced_path(ws), payload)
        announced = True
        logger.info("new data %s (batches %s): emitted %s", result["data_hash"], result["ingested"], DATASET_EVENT)
    else:
        logger.info("nothing new in the landing zone")
    new_invalid = {name: result["invalid"][name] for name in first_reports(ws, list(result["invalid"]))}
    if reported := sorted(set(result["invalid"]) - set(new_invalid)):
        logger.warning("still in the landing zone, skipped (reported before): %s; rename them", reported)
    if problems := ingest_markdown({**result, "invalid": new_invalid}):
        create_markdown_artifact(problems, key="ingest-problems", description="Rejected and quarantined data")
    # Fail the tick (after announcing the good batches) so ops see it in the UI. A rejected batch
    # is recorded in data/quarantine and an invalid name in .cache, so later ticks do not fail on it again.
    failures = [f"batch(es) rejected: {result['rejected']}; see data/quarantine/"] if result["rejected"] else []
    if new_invalid:
        failures.append(f"invalid batch name(s) skipped: {sorted(new_invalid)}; rename the folder(s)")
    if failures:
        raise PipelineError("; ".join(failures))
    return {"busy": False, "ingested": result["ingested"], "announced": announced, "data_hash": result["data_hash"]}


def main() -> None:
    parser = argparse.ArgumentParser(description="Run one watch-landing tick.")
    parser.add_argument("--workspace", default=".")
    args = parser.parse_args()
    print(json.dumps(run_tick(Workspace(Path(args.workspace).resolve())), indent=2))


def run_tick(ws: Workspace) -> dict[str, Any]:
    """One tick from a command line, against the configured server (which must answer)."""
    from flows.server import require_api

    require_api()
    return watch_landing(workspace=str(ws.root))


if __name__ == "__main__":
    main()
