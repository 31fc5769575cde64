"""The deployments, defined here rather than in the UI, and the process that serves them.

- ``watch-landing``: every ``watch.interval_s`` seconds, ingest new landing batches and emit
  ``dataset.updated`` when the data changed.
- ``retrain``: triggered by ``dataset.updated`` (the event's data hash becomes a parameter)
  and on the ``retrain.cron`` schedule. Deployment concurrency 1 with ENQUEUE: two batches
  landing close together give queued retrains, never two at once.

``python -m flows.deploy`` serves both until interrupted (``make up`` starts it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger

from flows.retrain import retrain
from flows.watch import DATASET_EVENT, dataset_resource_id, watch_landing
from tasks.common import Workspace
from tasks.config import PipelineConfig, load_params


def build_deployments(ws: Workspace, cfg: PipelineConfig, interval_s: int | None = None) -> list[RunnerDeployment]:
    workspace = str(ws.root)
    watch = watch_landing.to_deployment(
        name="watch-landing",
        interval=interval_s or cfg.watch.interval_s,
        parameters={"workspace": workspace},
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
    return [watch, train]


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the watch-landing and retrain deployments.")
    parser.add_argument("--workspace", default=".", help="the git + DVC repository (default: .)")
    parser.add_argument("--interval", type=int, default=None, help="override watch.interval_s (seconds)")
    args = parser.parse_args()
    from flows.server import require_api

    require_api()
    ws = Workspace(Path(args.workspace).resolve())
    serve(*build_deployments(ws, load_params(ws.params), args.interval))


if __name__ == "__main__":
    main()
