"""Prefect tasks around the pipeline steps: ingest and register run in-process; the DVC stages
run through DVC (``dvc repro --single-item``: DVC decides whether a stage changed and writes
dvc.lock exactly as ``dvc repro`` does). DVC runs a stage's command in this process when this
process runs the workspace's own code (tasks/common/dvc.py), else in a process of its own, which
reports how it ended in a small JSON file (tasks/common/stage.py): no scraping of output either
way. Only errors known to be transient are retried."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import Task, get_run_logger, task
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from tasks.common.config import load_params
from tasks.common.dvc import forget_shared_hashes
from tasks.common.errors import is_transient
from tasks.common.files import read_json
from tasks.common.processes import forget_stage_group, record_stage_group, stop_group, stop_leftover_stage
from tasks.common.stage import DVC_STAGES, RESULT_ENV, StageOutcome
from tasks.common.workspace import Workspace
from tasks.ingest import run_ingest


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message is the stage's own (or DVC's, when the stage never ran)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind  # user | transient | bug | dvc


def retry_transient(_task: Task, _run: TaskRun, state: State) -> bool:
    """Retry a lost connection or a busy database, nothing else: a user error or a bug would
    only fail again, and a retried register could log a second MLflow run."""
    return is_transient(state.result(raise_on_failure=False))


IO_RETRIES: dict[str, Any] = {"retries": 2, "retry_delay_seconds": 5, "retry_condition_fn": retry_transient}


@task(name="ingest", **IO_RETRIES)
def ingest(workspace: str) -> dict[str, Any]:
    ws = Workspace(Path(workspace))
    result = run_ingest(load_params(ws.params), ws)
    logger = get_run_logger()
    logger.info("ingested %s; already present: %s", result.ingested or "nothing new", result.skipped or "none")
    if result.ingested:
        steps = ", ".join(f"{name} {s:.1f} s" for name, s in result.seconds.items())
        logger.info("ingest: %.1f s (%s)", sum(result.seconds.values()), steps)
    for name, counts in result.quarantined.items():
        logger.warning("batch %s: quarantined %s (data/quarantine/%s/)", name, counts, name)
    for name, why in result.rejected.items():
        logger.error("batch %s rejected: %s (data/quarantine/%s/)", name, why, name)
    publish_suspects(ws, result.label_noise)
    return asdict(result)


@task(name="parent", **IO_RETRIES)
def parent(workspace: str) -> dict[str, Any]:
    """Where training starts: the champion (a warm start) or the pretrained weights, and why."""
    from tasks.parent import run_parent

    ws = Workspace(Path(workspace))
    decision = run_parent(load_params(ws.params), ws)
    get_run_logger().info("training start: %s (%s)", decision.mode, decision.reason)
    return decision.record()


def publish_suspects(ws: Workspace, screens: dict[str, dict[str, Any]]) -> None:
    """The top suspected label errors of each batch the label-noise screen flagged, as a thumbnail grid."""
    from flows.artifacts import publish_png
    from tasks.label_noise import SUSPECTS_FILE, SUSPECTS_PNG

    for name, screen in screens.items():
        if screen["noisy"]:
            outcome = "held: nothing ingested" if screen["held"] else "suspect rows quarantined"
            caption = (
                f"Batch {markdown_literal(name)} ({outcome}): {screen['summary']}. Given label, the champion's "
                f"label and its confidence under each image; every suspect in `data/quarantine/{name}/{SUSPECTS_FILE}`."
            )
            publish_png(ws.quarantine / name / SUSPECTS_PNG, "label-noise-suspects", f"Suspected label errors: {name}",
                        caption)  # fmt: skip


def markdown_literal(text: str) -> str:
    """Labellers' text shown in a Markdown artifact as literal text: one line, no table break,
    no link or HTML (a code span renders its content as it is)."""
    flat = " ".join(str(text).split()).replace("`", "'").replace("|", "\\|")
    return f"`{flat}`" if flat else ""


def ingest_markdown(result: dict[str, Any]) -> str | None:
    """What ops must look at after an ingest: invalid batch names, rejected batches and quarantined rows."""
    if not result.get("rejected") and not result.get("quarantined") and not result.get("invalid"):
        return None
    lines = ["# Ingest problems", "", "| batch | outcome | details |", "|---|---|---|"]
    for name, why in result.get("invalid", {}).items():
        lines.append(f"| {markdown_literal(name)} | **skipped**: not a valid batch name | {markdown_literal(why)} |")
    for name, why in result.get("rejected", {}).items():
        lines.append(f"| {markdown_literal(name)} | **rejected**, nothing ingested | {markdown_literal(why)} |")
    for name, counts in result.get("quarantined", {}).items():
        reasons = ", ".join(f"{reason}: {n}" for reason, n in counts.items())
        lines.append(f"| {markdown_literal(name)} | ingested without its bad rows | {reasons} |")
    lines += ["", "Details per row: `data/quarantine/<batch>/quarantine.csv`. The landing zone is untouched: "
              "deliver a fixed batch under a new name."]  # fmt: skip
    if any(why.startswith("label_noise_suspected") for why in result.get("rejected", {}).values()):
        lines += ["", "A batch held as `label_noise_suspected` lists its suspects in `data/quarantine/<batch>/"
                  "suspects.csv`; if its labels are right, `ctl release <batch> --reason \"...\"` lets the next "
                  "ingest take it."]  # fmt: skip
    return "\n".join(lines)


def publish_validation(ws: Workspace) -> None:
    """The validate stage's one-screen summary as a Prefect artifact (pass or fail)."""
    from prefect.artifacts import create_markdown_artifact

    summary = ws.validate_summary
    if summary.is_file():
        create_markdown_artifact(summary.read_text(encoding="utf-8"), key="data-validation", description="validate")


def dvc_failure_message(stage: str, output: list[str], returncode: int) -> str:
    """When the stage never reported (DVC itself failed: a lock, a missing dependency), DVC's
    own error lines."""
    errors = [line.strip() for line in output if line.startswith("ERROR")]
    tail = errors or [line.strip() for line in output if line.strip()][-3:]
    return f"{stage}: dvc exited with {returncode}: {' | '.join(tail)}"


def dvc_stage_env() -> dict[str, str]:
    """Stage commands say ``python``: make that the interpreter running this flow."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_dvc_stage(stage: str, workspace: str) -> dict[str, Any]:
    """One DVC stage, in this process when it can (``retrain.isolate_stages`` off, a one-process
    train, the workspace's code is this process's), else in a process of its own."""
    ws = Workspace(Path(workspace))
    stop_leftover_stage(ws)
    why = isolation_reason(stage, ws)
    if why is None:
        return run_stage_inline(stage, ws)
    get_run_logger().info("%s: in a process of its own (%s)", stage, why)
    try:
        return run_stage_process(stage, ws)
    finally:
        forget_shared_hashes()  # what it wrote is not known here


def isolation_reason(stage: str, ws: Workspace) -> str | None:
    """Why ``stage`` runs in a process of its own; None: this process runs it."""
    from tasks.common.dvc import inline_refusal

    cfg = load_params(ws.params)
    if cfg.retrain.isolate_stages:
        return "retrain.isolate_stages"
    if stage == "train" and cfg.train.processes * cfg.train.nnodes > 1:
        return "train.processes: torchrun's processes are stopped with the stage's process group"
    return inline_refusal(ws.root, stage)


def run_stage_inline(stage: str, ws: Workspace) -> dict[str, Any]:
    """DVC's ``repro --single-item`` in this process, the stage's ``run_<stage>(cfg, ws)`` as its
    command: no interpreter, DVC or torch start-up per stage (bench/orchestration.py)."""
    import importlib

    from tasks.common.dvc import reproduce_inline
    from tasks.common.stage import run_step

    logger = get_run_logger()
    step = getattr(importlib.import_module(f"tasks.{stage}"), f"run_{stage}")
    outcome: StageOutcome | None = None

    def command() -> None:
        nonlocal outcome
        outcome, exc = run_step(stage, lambda: step(load_params(ws.params), ws))
        if exc is not None:
            if outcome.error_kind == "bug":
                logger.error("%s failed", stage, exc_info=exc)
            raise exc

    started = time.monotonic()
    try:
        ran = reproduce_inline(ws.root, stage, command)
    except Exception as exc:
        if outcome is not None and not outcome.ok:
            raise StageFailed(f"{stage}: {outcome.error}", outcome.error_kind or "bug") from None
        cause = f": {exc.__cause__}" if exc.__cause__ else ""
        raise StageFailed(f"{stage}: dvc: {exc}{cause}", "dvc") from exc
    seconds = time.monotonic() - started
    if outcome is not None:
        logger.info("%s: %.1f s, of which DVC's checks and records %.1f s", stage, seconds, seconds - outcome.seconds)
    else:
        logger.info("%s: %s (%.1f s)", stage, "run by DVC" if ran else "unchanged: nothing to do", seconds)
    return {"stage": stage, "ran": outcome is not None, "seconds": outcome.seconds if outcome else 0.0,
            "result": outcome.result if outcome else None}  # fmt: skip


def run_stage_process(stage: str, ws: Workspace) -> dict[str, Any]:
    """``dvc repro --single-item <stage>``, streaming its output into the Prefect log; the
    stage's outcome file says whether it ran and how it ended.

    The stage runs in a process group of its own: when this run is stopped (SIGTERM, Ctrl-C,
    a cancellation), the group is stopped with it instead of running on unseen, holding DVC's
    lock, while this process waits for it. The group is recorded in the workspace while it runs,
    so if this process is killed outright, the next stage (or run) stops what it left."""
    logger = get_run_logger()
    workspace = str(ws.root)
    ws.stage_results.mkdir(parents=True, exist_ok=True)
    result_file = ws.stage_results / f"{stage}-{uuid.uuid4().hex}.json"
    env = dvc_stage_env()
    env[RESULT_ENV] = str(result_file)
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    output: list[str] = []
    group = None
    try:
        with subprocess.Popen(
            cmd, cwd=workspace, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        ) as proc:  # fmt: skip
            group = record_stage_group(ws, stage, proc.pid)
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    output.append(line.rstrip("\n"))
                    if line.strip():
                        logger.info(line.rstrip())
            except BaseException:
                logger.warning("%s: stopping its processes (dvc pid %s)", stage, proc.pid)
                stop_group(group)
                raise
        outcome = StageOutcome.read(result_file) if result_file.is_file() else None
    finally:
        result_file.unlink(missing_ok=True)
        if group is not None:
            forget_stage_group(ws, group)
    if outcome is not None and not outcome.ok:
        raise StageFailed(f"{stage}: {outcome.error}", outcome.error_kind or "bug")
    if proc.returncode != 0:
        raise StageFailed(dvc_failure_message(stage, output, proc.returncode), "dvc")
    # No outcome and exit 0: DVC found the stage unchanged and did not run it.
    return {"stage": stage, "ran": outcome is not None, "seconds": outcome.seconds if outcome else 0.0,
            "result": outcome.result if outcome else None}  # fmt: skip


#: One Prefect task per DVC stage, named as the stage. No retries: a stage failure is
#: deterministic (bad data, bad params, a bug), and a retry would only repeat it.
STAGE_TASKS: dict[str, Task] = {stage: task(run_dvc_stage, name=stage, task_run_name=stage) for stage in DVC_STAGES}


@task(name="register", **IO_RETRIES)
def register(workspace: str) -> dict[str, Any]:
    from tasks.register import run_register  # imports torch, timm and mlflow: not at a watch tick's start-up

    ws = Workspace(Path(workspace))
    return asdict(run_register(load_params(ws.params), ws))


@task(name="fetch", **IO_RETRIES)
def fetch_data(workspace: str, data_hash: str, benchmark_hash: str, params_sha256: str) -> dict[str, Any]:
    """The data the triggering event names, from the DVC remote (a worker that did not ingest it)."""
    from tasks.fetch import run_fetch

    fetched = run_fetch(Workspace(Path(workspace)), data_hash, benchmark_hash, params_sha256)
    get_run_logger().info(
        "data %s and benchmark %s from the DVC remote in %.1f s (%s)", data_hash, benchmark_hash or "(none)",
        fetched.seconds, f"rewrote {', '.join(fetched.changed)}" if fetched.changed else "already checked out",
    )  # fmt: skip
    return fetched.record()


@task(name="push", **IO_RETRIES)
def push_outputs(workspace: str) -> dict[str, Any]:
    """With a DVC remote (the cluster profile): the data and every stage output go there before the
    version is registered, so any machine can restore it (``ctl reproduce``)."""
    from tasks.common.dvc import default_remote, push

    ws = Workspace(Path(workspace))
    remote = default_remote(ws.root)
    if remote is None:
        return {"remote": None, "seconds": 0.0}
    started = time.monotonic()
    push([], ws.root)
    seconds = time.monotonic() - started
    get_run_logger().info("pushed the data and the stages' outputs to DVC remote %r in %.1f s", remote, seconds)
    return {"remote": remote, "seconds": round(seconds, 1)}


@task(name="check-registry", **IO_RETRIES)
def trained_version(workspace: str, data_hash: str) -> str | None:
    from tasks.registry.tracking import version_for_data

    ws = Workspace(Path(workspace))
    return version_for_data(ws, load_params(ws.params).register_.model_name, data_hash)


@task(name="gate", **IO_RETRIES)
def gate(workspace: str, version: str) -> dict[str, Any]:
    """Challenger vs champion on the same images (gate.judge_on); the report, not the models, comes back."""
    from tasks.gate import run_gate
    from tasks.registry.rules import per_class_rows, render_markdown

    ws = Workspace(Path(workspace))
    cfg = load_params(ws.params)
    report = run_gate(cfg, ws, version)
    champion = read_json(ws.gate_report)["champion_version"]
    return {
        "verdict": report.verdict,
        "reasons": report.reasons(),
        "numbers": read_json(ws.gate_metrics),
        "markdown": render_markdown(report, version, champion),
        "per_class": per_class_rows(report, cfg.classes),
    }


@task(name="promote", **IO_RETRIES)
def promote(workspace: str, version: str, verdict: str, reasons: str, numbers: dict[str, Any]) -> dict[str, Any]:
    from tasks.registry.aliases import apply_verdict

    ws = Workspace(Path(workspace))
    return asdict(apply_verdict(load_params(ws.params), ws, version, verdict, reasons, numbers))


@task(name="decide", **IO_RETRIES)
def decide(workspace: str, version: str, approve: bool, reason: str) -> dict[str, Any]:
    """A person's approve/reject (manual approval), applied and audited like every alias change."""
    from tasks.registry.aliases import decide as apply_decision

    ws = Workspace(Path(workspace))
    return asdict(apply_decision(load_params(ws.params), ws, version, approve, reason))
