"""What a watch tick costs on the demo's data.

In-process (no services): in a scratch git + DVC workspace with this project's params.yaml and
the 10,000-image Fashion-MNIST test set as the benchmark, the benchmark's manifest with its check
cache cold and warm; ingesting a ``--batch``-image landing batch with the cache cold (as every
ingest was before the cache) and, for a second batch of the same size, warm; and ingests that
find nothing new.

``--served``: a real Prefect server (temporary PREFECT_HOME, free loopback port) and
``flows.deploy`` serving the deployments of the code in ``--code`` (default: this checkout),
watch interval ``--interval``; the demo's two batches ingested beforehand. Measures the no-op
ticks (their flow-run wall time, and how late each started: Running minus its scheduled time,
which is the runner's poll plus the run's process start-up; the Pending phase is no measure of
that, as the runner starts a process up to 10 s early and the run waits for its time) and,
for a ``--batch``-image batch renamed into the landing zone, the time to the triggered retrain's
start (Running); the retrain is then cancelled.

    uv run python bench/watch.py [--batch 20000]
    uv run python bench/watch.py --served [--code DIR] [--interval 15]

Prints one JSON object and writes bench/out/watch.json (watch-served.json with ``--served``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

from flows.server import healthy
from tasks.common.config import load_params
from tasks.common.dvc import dvc_add
from tasks.common.files import write_json
from tasks.common.workspace import Workspace
from tasks.data.benchmark import benchmark_manifest
from tasks.data.fashion_mnist import deliver_batch, find_source, load_split, write_benchmark, write_labeled_dir
from tasks.ingest import run_ingest

REPO = Path(__file__).resolve().parents[1]


def scratch_workspace(root: Path, code: Path | None = None) -> Workspace:
    """A git + DVC repository with the params.yaml and .gitignore (and, given ``code``, the pipeline code, as
    ``ctl init`` copies it in) of ``code`` or this checkout; no retrain cron."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                [sys.executable, "-m", "dvc", "config", "core.analytics", "false"]):  # fmt: skip
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)
    params = yaml.safe_load(((code or REPO) / "params.yaml").read_text())
    params["retrain"]["cron"] = None
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # As `ctl init` writes it: git ignores the landing zone and .cache/, and so DVC's walks skip them.
    shutil.copy((code or REPO) / ".gitignore", root)
    if code is not None:
        shutil.copytree(code / "tasks", root / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(code / "gx", root / "gx", ignore=shutil.ignore_patterns("uncommitted"))
        shutil.copy(code / "dvc.yaml", root)
    return Workspace(root)


def timed(fn, *args) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn(*args)
    return round(time.perf_counter() - start, 2), out


def in_process(root: Path, batch: int) -> dict[str, Any]:
    ws = scratch_workspace(root)
    cfg = load_params(ws.params)
    source = find_source(ws.cache)
    write_benchmark(ws.benchmark, source)
    landing = ws.root / cfg.ingest.landing_dir
    deliver_batch(landing, source, 1, batch, batch)

    figures: dict[str, Any] = {"batch_images": batch}
    figures["benchmark_manifest_cold_s"], rows = timed(benchmark_manifest, ws, cfg)
    figures["benchmark_images"] = len(rows)
    figures["benchmark_manifest_warm_s"], _ = timed(benchmark_manifest, ws, cfg)
    ws.benchmark_checks.unlink()
    figures["ingest_batch_cache_cold_s"], first = timed(run_ingest, cfg, ws)
    noop = [timed(run_ingest, cfg, ws)[0] for _ in range(3)]
    figures["ingest_nothing_new_s"] = {"median": statistics.median(noop), "max": max(noop)}
    deliver_batch(landing, source, 2, batch, batch)
    figures["ingest_batch_cache_warm_s"], second = timed(run_ingest, cfg, ws)
    figures["ingest_batch_cache_warm_steps_s"] = second.seconds
    figures["ingested"] = first.ingested + second.ingested
    return figures


def ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(every)
    raise SystemExit(f"error: timed out after {timeout:.0f} s waiting for {what}")


def runs(url: str, deployment: str) -> list[dict[str, Any]]:
    body = {"deployments": {"name": {"any_": [deployment]}}, "sort": "EXPECTED_START_TIME_ASC", "limit": 200}
    return httpx.post(f"{url}/flow_runs/filter", json=body, timeout=30).json()


def completed(url: str) -> list[dict[str, Any]]:
    """Finished watch ticks, oldest first (ticks dropped by the concurrency limit never ran)."""
    return [r for r in runs(url, "watch-landing") if r["state_type"] == "COMPLETED"]


def start(cmd: list[str], code: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("wb") as fh:
        return subprocess.Popen(cmd, cwd=code, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def served(root: Path, code: Path, batch: int, interval: int, idle_ticks: int = 4) -> dict[str, Any]:
    ws = scratch_workspace(root / "ws", code)
    cfg = load_params(ws.params)
    source = find_source(ws.cache)
    write_benchmark(ws.benchmark, source)
    landing = ws.root / cfg.ingest.landing_dir
    for number in (1, 2):  # the demo's batches: 20,000 then 10,000 images
        deliver_batch(landing, source, number, 20_000, 10_000)
    dvc_add(ws.benchmark, ws.root)
    done_before = run_ingest(cfg, ws)
    # As after the demo: this data was announced (and trained on), so the first ticks find nothing new.
    write_json(ws.cache / "announced.json", {"data_hash": done_before.data_hash})
    home = root / "prefect-home"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    url = f"http://127.0.0.1:{free_port()}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": url, "PYTHONPATH": str(code),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1"}  # fmt: skip
    env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
    port = url.split(":")[-1].split("/")[0]
    server = start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", port],
                   code, env, root / "server.log")  # fmt: skip
    serve = None
    try:
        wait_for(lambda: healthy(url), 120, "the Prefect server")
        serve = start([sys.executable, "-m", "flows.deploy", "--workspace", str(ws.root), "--interval", str(interval)],
                      code, env, root / "serve.log")  # fmt: skip
        wait_for(lambda: completed(url)[idle_ticks:], idle_ticks * interval + 180, f"{idle_ticks + 1} watch ticks",
                 every=2)  # fmt: skip
        idle = completed(url)[1 : idle_ticks + 1]  # the first tick also pays the server's first requests
        images, labels = load_split(source, "train")
        write_labeled_dir(landing / "big", images[30_000 : 30_000 + batch], labels[30_000 : 30_000 + batch], "big")
        landed = time.time()
        if started := [r for r in runs(url, "retrain") if r["start_time"]]:
            raise SystemExit(f"error: a retrain ran before the batch landed: {started[0]['name']}")
        retrain = wait_for(lambda: next((r for r in runs(url, "retrain") if r["start_time"]), None), 600,
                           "the triggered retrain", every=0.5)  # fmt: skip
        httpx.post(f"{url}/flow_runs/{retrain['id']}/set_state", json={"state": {"type": "CANCELLING"}, "force": True},
                   timeout=30)  # fmt: skip
        ingesting = [r for r in completed(url) if ts(r["end_time"]) <= ts(retrain["created"])][-1]
        walls = [ts(r["end_time"]) - ts(r["start_time"]) for r in idle]
        late = [ts(r["start_time"]) - ts(r["expected_start_time"]) for r in idle]
        time.sleep(5)
    finally:
        if serve is not None:
            stop(serve)
        stop(server)
    return {
        "code": str(code), "interval_s": interval, "batch_images": batch,
        "idle_tick_wall_s": [round(w, 2) for w in walls],
        "idle_tick_started_late_s": [round(w, 2) for w in late],
        "landed_to_retrain_running_s": round(ts(retrain["start_time"]) - landed, 1),
        "landed_to_tick_running_s": round(ts(ingesting["start_time"]) - landed, 1),
        "ingest_tick_wall_s": round(ts(ingesting["end_time"]) - ts(ingesting["start_time"]), 1),
        "tick_end_to_retrain_created_s": round(ts(retrain["created"]) - ts(ingesting["end_time"]), 1),
        "retrain_created_to_running_s": round(ts(retrain["start_time"]) - ts(retrain["created"]), 1),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/watch-bench"))
    parser.add_argument("--batch", type=int, default=20_000)
    parser.add_argument("--served", action="store_true")
    parser.add_argument("--code", type=Path, default=REPO, help="the checkout whose flows the services run")
    parser.add_argument("--interval", type=int, default=15)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.served:
        figures, out = served(args.dir, args.code.resolve(), args.batch, args.interval), "watch-served.json"
    else:
        figures, out = in_process(args.dir, args.batch), "watch.json"
    (REPO / "bench" / "out").mkdir(parents=True, exist_ok=True)
    (REPO / "bench" / "out" / out).write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
