"""The retrain flow: ingest new landing batches, run the DVC stages, register the model.

Run it with ``python -m flows.retrain`` (add ``--workspace DIR`` for another checkout). With
a Prefect server running (``PREFECT_API_URL`` set) the run shows in its UI; without one,
Prefect starts a temporary local API for the run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.approval import wait_for_decision
from flows.artifacts import publish_evaluation
from flows.logs import project_logs_to_run
from flows.stages import (
    STAGE_TASKS,
    decide,
    fetch_data,
    gate,
    ingest,
    ingest_markdown,
    parent,
    promote,
    publish_validation,
    push_outputs,
    register,
    trained_version,
)
from flows.watch import DATASET_EVENT, PIPELINE_LOCK, ticks_paused
from tasks.common.config import load_params
from tasks.common.dvc import shared_dependency_hashes
from tasks.common.files import read_json
from tasks.common.processes import stop_leftover_stage
from tasks.common.stage import DVC_STAGES
from tasks.common.workspace import Workspace, workspace_lock


def summary_markdown(
    ingested: dict[str, Any],
    stages: list[dict[str, Any]],
    reg: dict[str, Any],
    ws: Workspace,
    decision: dict[str, Any] | None = None,
    start: dict[str, Any] | None = None,
) -> str:
    metrics = read_json(ws.metrics) if ws.metrics.is_file() else {}
    train = read_json(ws.train_report) if ws.train_report.is_file() else {}
    fetched = f" (fetched from the DVC remote in {f['seconds']:.0f} s)" if (f := ingested.get("fetched")) else ""
    lines = [
        "# Retrain summary",
        "",
        f"**Model** `{reg['model_name']}` version **{reg['version']}** "
        f"({', '.join(reg['aliases']) or 'no alias'}){'' if reg['created'] else ' (already registered)'}",
        "",
        f"New batches: {', '.join(ingested['ingested']) or 'none'} · DVC data hash `{ingested['data_hash']}`{fetched}",
        "",
        "| stage | ran |",
        "|---|---|",
        *(f"| {s['stage']} | {'yes' if s['ran'] else 'no (unchanged)'} |" for s in stages),
        "",
        "| split | accuracy | macro-F1 | images |",
        "|---|---|---|---|",
        *(f"| {k} | {v['accuracy']:.4f} | {v['macro_f1']:.4f} | {v['n']} |" for k, v in metrics.items()),
    ]
    if train:
        lines += [
            "",
            f"Training: {train['epochs']} epoch(s) on {train['device']}, {train['train_seconds']:.0f} s, "
            f"{train['images_per_s']:.0f} images/s, val accuracy {train['val_accuracy']:.4f}",
        ]
    if start:
        lines += ["", start_line(start, train)]
    if decision:
        lines += [
            "",
            f"**Gate: {decision['action'].upper()}** · champion v{decision['from_version']} → "
            f"v{decision['to_version']} · {decision['reason']}",
        ]
    lines += ["", f"MLflow tracking URI: `{reg['tracking_uri']}`"]
    return "\n".join(lines)


def start_line(start: dict[str, Any], train: dict[str, Any]) -> str:
    """The parent step's decision, with the images the warm start used when train ran."""
    if start["mode"] != "warm":
        return f"Start: full retrain from the pretrained weights ({start['reason']})"
    used = ""
    if train.get("start") == f"warm v{start['parent_version']}":
        replayed = train.get("replayed_images", 0)
        used = f" on {train['train_images'] - replayed:,} new + {replayed:,} replayed images"
    return f"Start: warm start from champion v{start['parent_version']}{used} ({start['reason']})"


@flow(name="retrain", log_prints=True)
def retrain(
    workspace: str = ".",
    skip_ingest: bool = False,
    data_hash: str | None = None,
    fetch: bool = False,
    benchmark_hash: str = "",
    params_sha256: str = "",
) -> dict[str, Any]:
    """Ingest, validate, prepare, train, evaluate, register. A failed stage fails the flow
    with the stage's own message, and nothing is registered.

    ``data_hash`` is set when a ``dataset.updated`` event started the run: if a model was
    already registered for that data, the run finishes early. With ``fetch`` (a worker of the
    cluster profile's gpu pool) the run does not look at a landing zone: it checks out the data
    at ``data_hash`` and the benchmark at ``benchmark_hash`` from the DVC remote instead, after
    checking that its params.yaml is the one the data was ingested with (``params_sha256``).
    """
    ws = Workspace(Path(workspace).resolve())
    source = None
    if fetch:
        source = {"data_hash": data_hash, "benchmark_hash": benchmark_hash, "params_sha256": params_sha256}
        if not data_hash:  # a scheduled run: the data the landing machine announced last
            source = last_announced() or source
            data_hash = source["data_hash"]
        if not data_hash:
            get_run_logger().info("no %s event on the server: no data to fetch, nothing to train", DATASET_EVENT)
            return {"ingest": None, "stages": [], "register": None, "decision": None, "skipped": "no data announced"}
    # One retrain per workspace; the watch's ticks, which could only find it busy, are not started
    # meanwhile. The steps' own logs go to this run's log.
    with project_logs_to_run(), workspace_lock(ws, PIPELINE_LOCK), ticks_paused(ws):
        stop_leftover_stage(ws)  # a run killed outright may have left its DVC stage running
        return _retrain(ws, skip_ingest, data_hash, source)


def last_announced() -> dict[str, str] | None:
    """The hashes of the newest ``dataset.updated`` event the server keeps (its event retention)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOrder

    with get_client(sync_client=True) as client:
        page = client.read_events(EventFilter(event=EventNameFilter(name=[DATASET_EVENT]), order=EventOrder.DESC), 1)
    if not page.events:
        return None
    payload = page.events[0].payload
    return {k: str(payload.get(k) or "") for k in ("data_hash", "benchmark_hash", "params_sha256")}


def _retrain(ws: Workspace, skip_ingest: bool, data_hash: str | None, source: dict | None) -> dict[str, Any]:
    logger = get_run_logger()
    nothing = {"ingested": [], "skipped": [], "data_hash": None}
    ingested = nothing if skip_ingest or source else ingest(str(ws.root))
    current = ingested["data_hash"] or data_hash
    if data_hash and current and (version := trained_version(str(ws.root), current)):
        logger.info("data %s already has model version %s; nothing to train", current, version)
        create_markdown_artifact(
            f"# Retrain skipped\n\nData `{current}` already has registered version **{version}**.",
            key="retrain-summary",
        )
        return {
            "ingest": ingested,
            "stages": [],
            "register": None,
            "decision": None,
            "skipped": f"already trained as version {version}",
        }
    if source:
        ingested = {**nothing, "data_hash": data_hash, "fetched": fetch_data(str(ws.root), **source)}
    if problems := ingest_markdown(ingested):
        create_markdown_artifact(problems, key="ingest-problems", description="Rejected and quarantined data")
    start = parent(str(ws.root))
    stages = []
    with shared_dependency_hashes():  # validate's hashes of data/raw serve prepare too
        for stage in DVC_STAGES:
            try:
                stages.append(STAGE_TASKS[stage](stage, str(ws.root)))
            finally:
                if stage == "validate":
                    publish_validation(ws)
    publish_evaluation(ws)  # the stages succeeded: confusion matrices and most confident mistakes
    push_outputs(str(ws.root))
    reg = register(str(ws.root))
    decision = None
    if not reg["judged"]:  # a version registered earlier for this pipeline state was judged then
        verdict = gate(str(ws.root), reg["version"])
        create_markdown_artifact(verdict["markdown"], key="gate-report", description="Promotion gate")
        create_table_artifact(verdict["per_class"], key="gate-per-class", description="Per-class metrics")
        decision = _decide(ws, reg["version"], verdict)
        if decision["action"] == "promote":
            reg["aliases"] = sorted({*reg["aliases"], "champion"})
    create_markdown_artifact(
        summary_markdown(ingested, stages, reg, ws, decision, start), key="retrain-summary", description="Retrain run"
    )
    logger.info("model %s version %s aliases %s", reg["model_name"], reg["version"], reg["aliases"])
    return {"ingest": ingested, "start": start, "stages": stages, "register": reg, "decision": decision,
            "skipped": None}  # fmt: skip


def _decide(ws: Workspace, version: str, verdict: dict[str, Any]) -> dict[str, Any]:
    """The gate's verdict moves the aliases, unless approval is manual: then an operator decides
    (the gate's verdict is their advice) and no decision in time is a rejection."""
    cfg = load_params(ws.params).gate
    if cfg.approval != "manual":
        return promote(str(ws.root), version, verdict["verdict"], verdict["reasons"], verdict["numbers"])
    logger = get_run_logger()
    logger.info(
        "gate says %s for v%s; waiting up to %d s for an operator: Resume this run in the Prefect UI, "
        "or `ctl approve|reject %s --reason ...`",
        verdict["verdict"].upper(), version, cfg.approval_timeout_s, version,
    )  # fmt: skip
    approve, reason, who = wait_for_decision(ws, version, cfg.approval_timeout_s)
    logger.info("decision on v%s by %s: %s (%s)", version, who, "approve" if approve else "reject", reason)
    entry = decide(str(ws.root), version, approve, f"{reason} [gate: {verdict['verdict']}; by {who}]")
    return {**entry, "action": "promote" if approve else "reject"}


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the retrain flow once.")
    parser.add_argument("--workspace", default=".", help="the git + DVC repository to run in (default: .)")
    parser.add_argument("--skip-ingest", action="store_true", help="do not look at the landing zone")
    args = parser.parse_args()
    result = run_once(Workspace(Path(args.workspace).resolve()), args.skip_ingest)
    print(json.dumps(result, indent=2, default=str))


def run_once(ws: Workspace, skip_ingest: bool = False) -> dict[str, Any]:
    """The flow once, from a command line: a configured server must answer (without one,
    Prefect starts a temporary API)."""
    from flows.server import api_url, require_api

    if api_url():
        require_api()
    return retrain(workspace=str(ws.root), skip_ingest=skip_ingest)


if __name__ == "__main__":
    main()
