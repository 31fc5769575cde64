"""The rollback flow: move ``champion`` back to ``previous`` (or a given version), audited.

``python -m flows.rollback --reason "..." [--to-version N]``; the same as
``python -m tasks.promote rollback`` but run as a Prefect flow, so it shows in the UI with
the audit entry as an artifact.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows.logs import project_logs_to_run
from tasks.common.config import load_params
from tasks.common.workspace import Workspace
from tasks.registry.aliases import rollback as rollback_champion


@task(name="rollback")
def move_champion(workspace: str, reason: str, to_version: str | None) -> dict[str, Any]:
    ws = Workspace(Path(workspace))
    return asdict(rollback_champion(load_params(ws.params), ws, reason, to_version))


@flow(name="rollback")
def rollback(reason: str, workspace: str = ".", to_version: str | None = None) -> dict[str, Any]:
    with project_logs_to_run():
        entry = move_champion(str(Path(workspace).resolve()), reason, to_version)
    create_markdown_artifact(
        f"# Rollback of `{entry['model']}`\n\nchampion v{entry['from_version']} → v{entry['to_version']}\n\n"
        f"Reason: {entry['reason']}\n\nBy: {entry['actor']} at {entry['at']}",
        key="rollback",
    )
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reason", required=True, help="why (recorded in the audit log)")
    parser.add_argument("--to-version", default=None, help="default: the 'previous' alias")
    parser.add_argument("--workspace", default=".")
    args = parser.parse_args()
    print(json.dumps(rollback(args.reason, args.workspace, args.to_version), indent=2))


if __name__ == "__main__":
    main()
