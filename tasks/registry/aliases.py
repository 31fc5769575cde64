"""Moving registry aliases on a verdict or a rollback, and the append-only audit log of every move."""

from __future__ import annotations

import getpass
import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.common.config import PipelineConfig
from tasks.common.errors import PipelineError
from tasks.common.workspace import Workspace
from tasks.registry.tracking import CHALLENGER, CHAMPION, PREVIOUS, alias_version, mlflow_tracking, tracking_uri

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditEntry:
    """One alias decision: who, when, what moved where, and why."""

    action: str  # promote | reject | rollback | approve (a person's decision) | release (a held batch)
    model: str
    from_version: str | None  # the champion before
    to_version: str | None  # the champion after
    candidate: str | None  # the version the decision was about
    actor: str
    reason: str
    numbers: dict[str, Any] = field(default_factory=dict)
    at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))


def audit_path(ws: Workspace) -> Path:
    return ws.audit_log


def append_audit(ws: Workspace, entry: AuditEntry) -> None:
    """Append-only; one JSON object per line, flushed to disk before returning."""
    path = audit_path(ws)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(asdict(entry), sort_keys=True) + "\n")
        fh.flush()


def read_audit(ws: Workspace) -> list[dict[str, Any]]:
    path = audit_path(ws)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def current_actor() -> str:
    """The Prefect flow run making the change, or the user at a terminal."""
    try:
        from prefect.runtime import flow_run

        if flow_run.id:
            return f"prefect flow run {flow_run.name} ({flow_run.id})"
    except ImportError:
        pass
    return f"cli:{getpass.getuser()}"


def _tag(client: Any, name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value[:5000])


def _crown(client: Any, name: str, version: str, champion: str | None) -> None:
    """``version`` becomes champion and the replaced champion ``previous``; the new champion is
    set first, so the model is never without one."""
    client.set_registered_model_alias(name, CHAMPION, version)
    if champion and champion != version:
        client.set_registered_model_alias(name, PREVIOUS, champion)


def _existing_version(client: Any, name: str, version: str) -> Any:
    """The registered ``version`` of ``name``, or a PipelineError listing the versions there are."""
    versions = {str(v.version): v for v in client.search_model_versions(f"name='{name}'")}
    if version not in versions:
        known = ", ".join(sorted(versions, key=int)) or "none"
        raise PipelineError(f"version {version} of {name!r} does not exist; versions: {known}")
    return versions[version]


def apply_verdict(
    cfg: PipelineConfig, ws: Workspace, version: str, verdict: str, reasons: str, numbers: dict[str, Any]
) -> AuditEntry:
    """Promote ``version`` to champion (old champion -> previous) or record its rejection.

    The gate report (reports/gate_report.json) goes to the version's MLflow run as an
    artifact, and the verdict as a run tag, so the registry explains itself.
    """
    name = cfg.register_.model_name
    with mlflow_tracking(tracking_uri(ws)) as client:
        champion = alias_version(client, name, CHAMPION)
        run_id = client.get_model_version(name, version).run_id
        report = ws.gate_report
        if report.is_file():
            client.log_artifact(run_id, str(report), "gate")
        client.set_tag(run_id, "gate.verdict", verdict)
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        if verdict == "promote":
            _crown(client, name, version, champion)
            _tag(client, name, version, {"gate.verdict": "promote", "gate.decided_at": stamp})
            entry = AuditEntry("promote", name, champion, version, version, current_actor(), "passed the gate", numbers)
        elif verdict == "reject":
            client.set_registered_model_alias(name, CHALLENGER, version)
            _tag(
                client, name, version, {"gate.verdict": "reject", "gate.decided_at": stamp, "rejected_reason": reasons}
            )
            entry = AuditEntry("reject", name, champion, champion, version, current_actor(), reasons, numbers)
        else:
            raise PipelineError(f"invalid verdict {verdict!r}; expected promote or reject")
    append_audit(ws, entry)
    log.info("%s version %s of %s (champion %s -> %s)", entry.action, version, name, champion, entry.to_version)
    return entry


def rollback(cfg: PipelineConfig, ws: Workspace, reason: str, to_version: str | None = None) -> AuditEntry:
    """Point ``champion`` at ``previous`` (or ``to_version``); the replaced champion becomes
    ``previous``, so a rollback can itself be rolled back."""
    if not reason.strip():
        raise PipelineError("a rollback needs a reason (--reason)")
    name = cfg.register_.model_name
    with mlflow_tracking(tracking_uri(ws)) as client:
        champion = alias_version(client, name, CHAMPION)
        target = to_version or alias_version(client, name, PREVIOUS)
        if target is None:
            raise PipelineError(f"model {name!r} has no '{PREVIOUS}' version to roll back to; pass --to-version")
        _existing_version(client, name, target)
        if target == champion:
            raise PipelineError(f"version {target} is already the champion")
        _crown(client, name, target, champion)
        if champion:
            _tag(client, name, champion, {"rolled_back_reason": reason})
        _tag(client, name, target, {"gate.verdict": "rollback", "rollback_reason": reason})
    entry = AuditEntry("rollback", name, champion, target, target, current_actor(), reason)
    append_audit(ws, entry)
    log.info("rolled back %s: champion %s -> %s (%s)", name, champion, target, reason)
    return entry


def decide(cfg: PipelineConfig, ws: Workspace, version: str, approve: bool, reason: str) -> AuditEntry:
    """A person's decision on ``version``: approve makes it the champion (the old one becomes
    ``previous``), reject records it as rejected. Audited like every alias change."""
    if not reason.strip():
        raise PipelineError("a decision needs a reason (--reason)")
    name = cfg.register_.model_name
    with mlflow_tracking(tracking_uri(ws)) as client:
        gate_said = _existing_version(client, name, version).tags.get("gate.verdict", "-")
        champion = alias_version(client, name, CHAMPION)
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        if approve:
            if champion == version:
                raise PipelineError(f"version {version} is already the champion")
            _crown(client, name, version, champion)
            _tag(
                client, name, version, {"gate.verdict": "approved", "gate.decided_at": stamp, "approved_reason": reason}
            )
            entry = AuditEntry(
                "approve", name, champion, version, version, current_actor(), reason, {"gate": gate_said}
            )
        else:
            if champion == version:
                raise PipelineError(f"version {version} is the champion; `ctl rollback` replaces it")
            _tag(
                client, name, version, {"gate.verdict": "rejected", "gate.decided_at": stamp, "rejected_reason": reason}
            )
            entry = AuditEntry(
                "reject", name, champion, champion, version, current_actor(), reason, {"gate": gate_said}
            )
    append_audit(ws, entry)
    log.info("%s version %s of %s by %s: %s", entry.action, version, name, entry.actor, reason)
    return entry


def registry_status(cfg: PipelineConfig, ws: Workspace) -> list[dict[str, Any]]:
    """Every version with its aliases (search results carry no aliases: they come from the
    registered model) and its gate verdict."""
    from mlflow.exceptions import MlflowException

    name = cfg.register_.model_name
    with mlflow_tracking(tracking_uri(ws)) as client:
        try:
            by_alias = client.get_registered_model(name).aliases
        except MlflowException:
            return []
        versions = client.search_model_versions(f"name='{name}'")
    return [
        {
            "version": str(v.version),
            "aliases": sorted(a for a, target in by_alias.items() if str(target) == str(v.version)),
            "verdict": v.tags.get("gate.verdict", "-"),
            "data": v.tags.get("dvc_data_hash", "-"),
            "batches": v.tags.get("batch_ids", "-"),
        }
        for v in sorted(versions, key=lambda v: int(v.version))
    ]


def format_history(entries: list[dict[str, Any]]) -> str:
    if not entries:
        return "no alias changes recorded yet"
    lines = []
    for e in entries:
        if e["action"] == "release":  # a batch held by the label-noise screen, not a model version
            batch = e.get("numbers", {}).get("batch", "?")
            lines.append(f"{e['at']}  release  batch {batch}  by {e['actor']}: {e['reason']}")
            continue
        lines.append(
            f"{e['at']}  {e['action']:<8} v{e['candidate']}  champion {e['from_version']} -> {e['to_version']}  "
            f"by {e['actor']}: {e['reason']}"
        )
    return "\n".join(lines)
