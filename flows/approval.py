"""Manual approval (``gate.approval: manual``): the retrain pauses after the gate and waits for a
person's approve/reject, given in the Prefect UI (the paused run's "Resume" form) or with
``ctl approve|reject VERSION --reason ...``, which resumes the waiting run with that input.

While a run waits, ``.cache/awaiting-approval.json`` names it (flow run id, version, API URL),
so the CLI finds it without searching the server.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import Field

from tasks.common.workspace import Workspace


def awaiting_path(ws: Workspace) -> Path:
    return ws.cache / "awaiting-approval.json"


def _decision_input() -> type:
    from prefect.input import RunInput

    class Decision(RunInput):
        """What the operator decides about the version the gate reported on."""

        approve: bool = Field(description="make this version the champion")
        reason: str = Field(min_length=1, description="why (recorded in the audit log)")

    return Decision


def wait_for_decision(ws: Workspace, version: str, timeout_s: int, poll_s: int = 5) -> tuple[bool, str, str]:
    """Pause this flow run until an operator decides on ``version``: (approve, reason, who).
    No decision within ``timeout_s`` is a rejection."""
    from prefect.context import get_run_context
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run
    from prefect.settings import PREFECT_API_URL

    run = get_run_context().flow_run
    path = awaiting_path(ws)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "flow_run_id": str(run.id), "flow_run_name": run.name, "version": version,
        "api_url": PREFECT_API_URL.value(),
    }))  # fmt: skip
    try:
        decision = pause_flow_run(wait_for_input=_decision_input(), timeout=timeout_s, poll_interval=poll_s)
    except FlowPauseTimeout:
        return False, f"no decision within {timeout_s} s (gate.approval_timeout_s)", "timeout"
    finally:
        path.unlink(missing_ok=True)
    return decision.approve, decision.reason, "operator (Prefect run input)"


def resume_waiting_run(ws: Workspace, version: str, approve: bool, reason: str) -> str | None:
    """Resume the retrain waiting for a decision on ``version`` with this one; its name, or None
    when no run waits for that version (the decision is then applied directly)."""
    path = awaiting_path(ws)
    if not path.is_file():
        return None
    waiting = json.loads(path.read_text())
    if waiting["version"] != version:
        return None
    if waiting.get("api_url"):
        os.environ.setdefault("PREFECT_API_URL", waiting["api_url"])  # before Prefect reads its settings
    from uuid import UUID

    from prefect.flow_runs import resume_flow_run

    resume_flow_run(UUID(waiting["flow_run_id"]), run_input={"approve": approve, "reason": reason})
    return waiting["flow_run_name"]
