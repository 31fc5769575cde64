"""Orchestration figures from a Prefect server's own records (run after `make demo`).

For every finished ``retrain`` run: wall time, the stages' own work (the "<stage> finished
in N s" line each DVC stage prints, plus the in-process ingest/register/gate/promote task
runs) and the rest, which is orchestration overhead (Prefect, DVC's checks, process and
import start-up). For ``watch-landing``: the wall time of ticks that found nothing new, and
the latency from a tick that ingested a batch to the retrain run it triggered.

    uv run python bench/orchestration.py [--api http://127.0.0.1:4200/api]

Prints a markdown table and writes bench/out/orchestration.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from datetime import datetime
from pathlib import Path

import httpx

OWN_LINE = re.compile(r"(validate|prepare|train|evaluate) finished in ([\d.]+) s")
IN_PROCESS_TASKS = ("ingest", "register", "gate", "promote", "check-registry")


def ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def post(api: str, path: str, body: dict) -> list[dict]:
    resp = httpx.post(f"{api}{path}", json=body, timeout=30)
    resp.raise_for_status()
    return resp.json()


def flow_runs(api: str, deployment: str) -> list[dict]:
    body = {"deployments": {"name": {"any_": [deployment]}}, "sort": "START_TIME_ASC", "limit": 200}
    return [r for r in post(api, "/flow_runs/filter", body) if r["state_type"] == "COMPLETED"]


def stage_own_seconds(api: str, run_id: str) -> dict[str, float]:
    own: dict[str, float] = {}
    offset = 0
    while True:
        page = post(api, "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200, "offset": offset})
        for entry in page:
            if m := OWN_LINE.search(entry["message"]):
                own[m.group(1)] = float(m.group(2))
        if len(page) < 200:
            return own
        offset += 200


def task_seconds(api: str, run_id: str) -> dict[str, float]:
    body = {"flow_runs": {"id": {"any_": [run_id]}}, "limit": 200}
    out = {}
    for task in post(api, "/task_runs/filter", body):
        name = task["name"].rsplit("-", 1)[0] if task["name"].rsplit("-", 1)[0] in IN_PROCESS_TASKS else task["name"]
        out[name] = out.get(name, 0.0) + task["total_run_time"]
    return out


def retrain_figures(api: str) -> list[dict]:
    rows = []
    for run in flow_runs(api, "retrain"):
        own = stage_own_seconds(api, run["id"])
        if not own:  # skipped run (data already trained): nothing to measure
            continue
        tasks = task_seconds(api, run["id"])
        in_process_tasks = {k: round(v, 1) for k, v in tasks.items() if k in IN_PROCESS_TASKS}
        in_process = sum(in_process_tasks.values())
        wall = ts(run["end_time"]) - ts(run["start_time"])
        own_total = sum(own.values()) + in_process
        rows.append({
            "run": run["name"], "wall_s": round(wall, 1), "own_s": round(own_total, 1),
            "overhead_s": round(wall - own_total, 1), "overhead_share": round((wall - own_total) / wall, 3),
            "stages_own_s": own, "in_process_tasks_s": in_process_tasks,
            "start": run["start_time"],
        })  # fmt: skip
    return rows


def watch_figures(api: str, retrains: list[dict]) -> dict:
    ticks = flow_runs(api, "watch-landing")
    idle, ingesting = [], []
    for tick in ticks:
        wall = ts(tick["end_time"]) - ts(tick["start_time"])
        logs = post(api, "/logs/filter", {"logs": {"flow_run_id": {"any_": [tick["id"]]}}, "limit": 50})
        text = " ".join(e["message"] for e in logs)
        if "nothing new" in text:
            idle.append(wall)
        elif "emitted dataset.updated" in text:
            ingesting.append(tick)
    latencies = []
    for tick in ingesting:
        after = [r for r in retrains if ts(r["start"]) >= ts(tick["start_time"])]
        if after:
            latencies.append({
                "tick_start_to_retrain_start_s": round(ts(after[0]["start"]) - ts(tick["start_time"]), 1),
                "tick_wall_s": round(ts(tick["end_time"]) - ts(tick["start_time"]), 1),
            })  # fmt: skip
    return {
        "idle_ticks": len(idle),
        "idle_tick_wall_s": {"median": round(statistics.median(idle), 2), "max": round(max(idle), 2)} if idle else None,
        "batch_to_retrain": latencies,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", default="http://127.0.0.1:4200/api")
    parser.add_argument("--out", default="bench/out/orchestration.json")
    args = parser.parse_args()
    retrains = retrain_figures(args.api)
    result = {"retrain": retrains, "watch": watch_figures(args.api, retrains)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("| retrain run | wall s | stages' own work s | overhead s | overhead share |")
    print("|---|---|---|---|---|")
    for r in retrains:
        print(f"| {r['run']} | {r['wall_s']} | {r['own_s']} | {r['overhead_s']} | {r['overhead_share']:.1%} |")
    print()
    print(json.dumps(result["watch"], indent=2))


if __name__ == "__main__":
    main()
