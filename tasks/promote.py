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
        cfg = load_params(ws.params)
        if args.command == "status":
            for row in registry_status(cfg, ws):
                aliases = ", ".join(row["aliases"]) or "-"
                print(f"v{row['version']:<4} {aliases:<28} gate={row['verdict']:<8} batches={row['batches']}")
        elif args.command == "history":
            print(format_history(read_audit(ws)))
        else:
            entry = rollback(cfg, ws, args.reason, args.to_version)
            print(f"champion of {entry.model}: v{entry.from_version} -> v{entry.to_version}")
    except PipelineError as exc:
        raise SystemExit(f"error: promote: {exc}") from None


if __name__ == "__main__":
    main()
