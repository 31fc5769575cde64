"""The cluster profile with a training machine apart, on the demo's data.

A landing workspace (a clone of this checkout, retrain cron off) brings the profile up on free
loopback ports without a local gpu worker; a second clone with its own DVC cache runs
``ctl worker --pool gpu``, as a training machine would. The demo's first batch (20,000
Fashion-MNIST images, with the 10,000-image benchmark) lands; measured: bringing the profile up,
the watch tick that ingests and pushes the batch, landing to the retrain Running on the worker,
and the worker's fetch (``dvc pull`` of exactly that data into its empty cache). The retrain is
then cancelled and the profile stopped (stopping is timed too).

    uv run python bench/cluster.py [--dir /tmp/cluster-bench] [--interval 15]

Prints one JSON object and writes bench/out/cluster.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flows import cluster  # noqa: E402
from tasks.common.dvc import dvc_add  # noqa: E402
from tasks.common.workspace import Workspace  # noqa: E402
from tasks.data.fashion_mnist import deliver_batch, find_source, write_benchmark  # noqa: E402


def ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def wait_for(predicate, timeout: float, what: str, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise SystemExit(f"error: {what}: not within {timeout:.0f} s")
        time.sleep(every)
    return result


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


class Api:
    def __init__(self, url: str, auth: str) -> None:
        self.url, self.auth = url, tuple(auth.split(":", 1))

    def post(self, path: str, body: dict) -> Any:
        resp = httpx.post(f"{self.url}{path}", json=body, auth=self.auth, timeout=30)
        resp.raise_for_status()
        return resp.json()

    def runs(self, deployment: str) -> list[dict[str, Any]]:
        body = {"deployments": {"name": {"any_": [deployment]}}, "sort": "START_TIME_ASC", "limit": 200}
        return [r for r in self.post("/flow_runs/filter", body) if r["start_time"]]

    def task(self, run_id: str, name: str) -> dict[str, Any] | None:
        tasks = self.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}, "limit": 200})
        done = [t for t in tasks if t["name"].startswith(f"{name}-") and t["state_type"] == "COMPLETED"]
        return done[0] if done else None


def landing_workspace(root: Path) -> Workspace:
    """A clone of this checkout's committed code, the retrain cron off, the benchmark added."""
    git(root.parent, "clone", "-q", str(REPO), str(root))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["retrain"]["cron"] = None
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(root, "-c", "user.email=bench@example.invalid", "-c", "user.name=bench", "commit", "-qam", "bench: no cron")
    ws = Workspace(root)
    write_benchmark(ws.benchmark, find_source(ws.cache))
    dvc_add(ws.benchmark, ws.root)
    return ws


def measure(base: Path, interval: int) -> dict[str, Any]:
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    base.chmod(0o755)  # PostgreSQL runs as the user 'postgres' when this runs as root
    ws = landing_workspace(base / "landing")
    started = time.monotonic()
    endpoints = cluster.up(ws, cluster.Ports.free(), interval=interval, train_worker=False)
    up_s = time.monotonic() - started
    worker = None
    try:
        env = {**os.environ, **cluster.client_env(ws)}
        api = Api(endpoints.prefect_api, env["PREFECT_API_AUTH_STRING"])
        train = base / "train"
        git(base, "clone", "-q", str(ws.root), str(train))
        log = (base / "worker.log").open("ab")
        cmd = [sys.executable, "-m", "flows.cli", "worker", "--pool", "gpu", "-w", str(train)]
        worker = subprocess.Popen(cmd, cwd=train, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: len(api.runs("watch-landing")) >= 2, 300, "two watch ticks")
        deliver_batch(ws.root / "landing", find_source(ws.cache), 1, 20_000, 10_000)
        landed = time.time()
        retrain = wait_for(lambda: next(iter(api.runs("retrain")), None), 900, "the triggered retrain", every=0.5)
        fetched = wait_for(lambda: api.task(retrain["id"], "fetch"), 900, "the worker's fetch", every=2)
        ticks = [r for r in api.runs("watch-landing")
                 if r["state_type"] == "COMPLETED" and ts(r["end_time"]) <= ts(retrain["created"])]  # fmt: skip
        ingesting = ticks[-1]
        api.post(f"/flow_runs/{retrain['id']}/set_state", {"state": {"type": "CANCELLING"}, "force": True})
        figures = {
            "interval_s": interval,
            "batch_images": 20_000,
            "benchmark_images": 10_000,
            "up_s": round(up_s, 1),
            "landed_to_retrain_running_s": round(ts(retrain["start_time"]) - landed, 1),
            "ingest_tick_wall_s": round(ts(ingesting["end_time"]) - ts(ingesting["start_time"]), 1),
            "tick_end_to_retrain_running_s": round(ts(retrain["start_time"]) - ts(ingesting["end_time"]), 1),
            "worker_fetch_s": round(ts(fetched["end_time"]) - ts(fetched["start_time"]), 1),
        }
        time.sleep(5)
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(60)
        started = time.monotonic()
        cluster.down(ws)
    figures["down_s"] = round(time.monotonic() - started, 1)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/cluster-bench"))
    parser.add_argument("--interval", type=int, default=15)
    args = parser.parse_args()
    figures = measure(args.dir, args.interval)
    (REPO / "bench" / "out").mkdir(parents=True, exist_ok=True)
    (REPO / "bench" / "out" / "cluster.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
