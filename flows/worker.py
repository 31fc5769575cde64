"""Work pools and workers: how the cluster profile runs the deployments of ``prefect.yaml``.

Two pools of Prefect's ``process`` type:

- ``landing``: the watch-landing and predict deployments, on the machine where labelled batches
  land (``ctl up --stack cluster`` starts its worker in that workspace);
- ``gpu``: the retrain, on whichever machines train. Each runs ``ctl worker --pool gpu`` in its
  own checkout of the code, with its own DVC cache. It shares no filesystem with the landing
  machine: a run checks its checkout out at the deployment's commit (the pull step below),
  fetches the exact data the triggering event names from the DVC remote, runs the DVC stages,
  pushes the outputs and registers on the MLflow server.

The retrain deployment's concurrency limit (1, ENQUEUE) is the Prefect server's, so it holds across
every worker of the pool: two retrains never run at once, and a queued retrain of data that was
trained meanwhile finishes early (``retrain``'s ``data_hash`` check).

A Kubernetes or Docker pool (``prefect-kubernetes`` / ``prefect-docker``) takes the same
deployments: point ``work_pool.name`` in prefect.yaml at it and give its job an image with a
checkout of this repository at ``$CTL_WORKSPACE`` (README: Running on more than one machine).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from flows.watch import dataset_resource_id
from tasks.common.config import PipelineConfig, load_params
from tasks.common.dvc import CLUSTER_REMOTE_URL, default_remote, set_default_remote
from tasks.common.errors import PipelineError
from tasks.common.workspace import Workspace

#: The worker's checkout: where its flow runs work (set by ``ctl worker``).
WORKSPACE_ENV = "CTL_WORKSPACE"
#: The pools prefect.yaml names, and what runs on each.
POOLS = {"landing": "watch-landing and predict, where batches land", "gpu": "retrain, where models train"}
#: Flow runs (served or on workers) send a heartbeat this often; flows/deploy.py's automation
#: marks a run Crashed when they stop.
HEARTBEAT_S = 30
#: How often a worker asks the server for runs to start: a triggered retrain waits up to this long
#: (Prefect's default is 10 s; the embedded profile's serve process polls as often).
POLL_S = 2
#: What a run may have changed in its checkout and a new commit may overwrite: pipeline state that
#: is pushed to the DVC remote and logged on the registered version, never code.
PIPELINE_STATE = ("data/", "dvc.lock")


def _git(cwd: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} in {cwd} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout.strip()


def enter_workspace(commit: str, update: bool = False) -> dict[str, str]:
    """Prefect pull step (prefect.yaml): the flow run works in this worker's checkout.

    With ``update`` (the gpu pool) the checkout first moves to ``commit``, the one the deployment
    was made from, fetching it from ``origin`` when it is not there yet. Code changed in the
    checkout by hand is refused rather than overwritten; pipeline state (``data/*.dvc``, dvc.lock)
    is overwritten, since every run restores it from the event and the DVC remote. Without
    ``update`` (the landing workspace, where the deployment was made) a different HEAD is only
    reported: the code there is its owner's to commit and deploy again.
    """
    root = os.environ.get(WORKSPACE_ENV)
    if not root:
        raise RuntimeError(f"{WORKSPACE_ENV} is not set: start workers with `ctl worker --pool NAME -w CHECKOUT`")
    ws = Path(root).resolve()
    head = _git(ws, "rev-parse", "HEAD")
    if head != commit:
        if not update:
            print(f"warning: {ws} is at commit {head[:12]}, the deployment was made at {commit[:12]}; "
                  "`ctl up --stack cluster` deploys again")  # fmt: skip
        else:
            changed = _git(ws, "status", "--porcelain", "--untracked-files=no")
            code = [line[3:] for line in changed.splitlines() if not line[3:].startswith(PIPELINE_STATE)]
            if code:
                raise RuntimeError(f"{ws} has uncommitted code changes ({', '.join(code)}); commit or discard them")
            if subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ws, check=False).returncode:
                _git(ws, "fetch", "--quiet", "origin")
            _git(ws, "checkout", "--quiet", "--force", "--detach", commit)
            print(f"{ws}: checked out the deployment's commit {commit[:12]} (was {head[:12]})")
    os.chdir(ws)
    return {"directory": str(ws)}


def worker_command(pool: str, name: str) -> list[str]:
    """``prefect worker start`` for ``pool``. A gpu worker runs one flow run at a time (a machine
    trains one model); the landing worker runs a predict next to the watch ticks."""
    limit = ["--limit", "1"] if pool == "gpu" else []
    return [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process",
            "--name", name, *limit]  # fmt: skip


def worker_env(root: Path, env: dict[str, str]) -> dict[str, str]:
    """The worker's environment (its flow runs inherit it): ``env`` plus where it works and how
    often it polls and its runs send heartbeats (unless ``env`` says)."""
    defaults = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S), "PREFECT_WORKER_QUERY_SECONDS": str(POLL_S)}
    return {**defaults, **env, WORKSPACE_ENV: str(root)}


# --- deploy (`ctl up --stack cluster` runs this against the profile's Prefect server) ----------


def create_pools() -> list[str]:
    """The pools prefect.yaml names, as Prefect process pools; an existing pool is left as it is
    (an operator may have tuned it, or pointed it at another worker type)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    created = []
    template = ProcessWorker.get_default_base_job_template()
    with get_client(sync_client=True) as client:
        for pool, what in POOLS.items():
            try:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template,
                                                       description=what))  # fmt: skip
                created.append(pool)
            except ObjectAlreadyExists:
                pass
    return created


def deploy(ws: Workspace) -> None:
    """``prefect deploy --all`` of this checkout's prefect.yaml, its trigger matching this workspace's dataset."""
    env = {**os.environ, "CTL_DATASET_RESOURCE": dataset_resource_id(ws)}
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"]
    proc = subprocess.run(cmd, cwd=ws.root, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise PipelineError(f"prefect deploy --all failed in {ws.root}:\n{(proc.stdout + proc.stderr)[-3000:]}")


def set_schedules(cfg: PipelineConfig, interval_s: int | None = None) -> dict[str, str]:
    """params.yaml's schedules on the deployed deployments (replacing any they had), as ``serve``
    sets them in the embedded profile."""
    from datetime import timedelta

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule

    wanted = {
        "watch-landing/watch-landing": IntervalSchedule(interval=timedelta(seconds=interval_s or cfg.watch.interval_s)),
        "retrain/retrain": CronSchedule(cron=cfg.retrain.cron, timezone="UTC") if cfg.retrain.cron else None,
        "predict/predict": CronSchedule(cron=cfg.predict.cron, timezone="UTC") if cfg.predict.cron else None,
    }
    with get_client(sync_client=True) as client:
        for name, schedule in wanted.items():
            deployment = client.read_deployment_by_name(name)
            for old in deployment.schedules:
                client.delete_deployment_schedule(deployment.id, old.id)
            if schedule is not None:
                client.create_deployment_schedules(deployment.id, [(schedule, True)])
    return {name: str(schedule) if schedule else "none" for name, schedule in wanted.items()}


def deploy_all(ws: Workspace, interval_s: int | None = None) -> None:
    """Pools, deployments, schedules and the crash detection, against the configured server."""
    from flows.deploy import ensure_crash_detection

    create_pools()
    deploy(ws)
    set_schedules(load_params(ws.params), interval_s)
    ensure_crash_detection()


# --- workers ------------------------------------------------------------------------------------


def prepare_checkout(ws: Workspace) -> None:
    """What a training machine's checkout needs before its worker starts: a git checkout of the
    code, the services' addresses in the environment, and the DVC remote they name."""
    if not (ws.root / ".git").exists() or not (ws.root / ".dvc").is_dir():
        raise PipelineError(f"{ws.root} is not a git + DVC checkout of this repository: `git clone` it first")
    missing = [name for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI") if not os.environ.get(name)]
    if missing:
        raise PipelineError(f"{', '.join(missing)} not set: export the cluster's endpoints.env and credentials.env")
    if endpoint := os.environ.get("AWS_ENDPOINT_URL_S3"):  # the profile's S3 store
        set_default_remote(ws.root, CLUSTER_REMOTE_URL, endpoint)
    elif not default_remote(ws.root):  # AWS itself: the bucket is this checkout's own setting
        raise PipelineError(
            f"{ws.root} has no DVC remote: set AWS_ENDPOINT_URL_S3 (the cluster's S3 store) or "
            "`dvc remote add --local --default cluster s3://BUCKET/dvc` there"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description="Deploy prefect.yaml with the pools and schedules (ctl up runs this).")
    parser.add_argument("command", choices=["deploy"])
    parser.add_argument("--workspace", "-w", default=".")
    parser.add_argument("--interval", type=int, default=None, help="override watch.interval_s")
    args = parser.parse_args()
    try:
        deploy_all(Workspace(Path(args.workspace).resolve()), args.interval)
    except PipelineError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
