"""promote: move registry aliases on the gate's verdict, roll back, and audit every change.

Aliases: ``champion`` (serving), ``challenger`` (newest candidate), ``previous`` (the
champion before the last promotion or rollback, so either can be undone). The core is in
tasks/registry/aliases.py.

CLI: ``python -m tasks.promote status | history | rollback --reason "..." [--to-version N]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tasks.common.config import load_params
from tasks.common.errors import PipelineError
from tasks.common.stage import setup_cli_logging
from tasks.common.workspace import Workspace
from tasks.registry.aliases import format_history, read_audit, registry_status, rollback


def format_status(ws: Workspace) -> str:
    """One line per registered version: aliases, the gate's verdict, the batches it saw."""
    rows = registry_status(load_params(ws.params), ws)
    return "\n".join(
        f"v{row['version']:<4} {', '.join(row['aliases']) or '-':<28} gate={row['verdict']:<8} batches={row['batches']}"
        for row in rows
    )


def format_audit(ws: Workspace) -> str:
    return format_history(read_audit(ws))


def rollback_champion(ws: Workspace, reason: str, to_version: str | None = None) -> str:
    entry = rollback(load_params(ws.params), ws, reason, to_version)
    return f"champion of {entry.model}: v{entry.from_version} -> v{entry.to_version}"


def main() -> None:
    parser = argparse.ArgumentParser(description="Registry status, audit history and rollback.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="versions and their aliases")
    sub.add_parser("history", help="every alias change, oldest first")
    back = sub.add_parser("rollback", help="move champion back to previous (or --to-version)")
    back.add_argument("--reason", required=True)
    back.add_argument("--to-version", default=None)
    args = parser.parse_args()
    setup_cli_logging()
    ws = Workspace(Path.cwd())
    try:
        if args.command == "status":
            print(format_status(ws))
        elif args.command == "history":
            print(format_audit(ws))
        else:
            print(rollback_champion(ws, args.reason, args.to_version))
    except PipelineError as exc:
        raise SystemExit(f"error: promote: {exc}") from None


if __name__ == "__main__":
    main()
