"""promote: move registry aliases on the gate's verdict, roll back, and audit every change.

Aliases: ``champion`` (serving), ``challenger`` (newest candidate), ``previous`` (the
champion before the last promotion or rollback, so either can be undone). The core is in
tasks/registry/aliases.py.

CLI: ``python -m tasks.promote status | history | rollback --reason "..." [--to-version N]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tasks.common.config import PipelineConfig, load_params
from tasks.common.errors import PipelineError
from tasks.common.stage import setup_cli_logging
from tasks.common.workspace import Workspace
from tasks.data.landing import ingested_batches, rejected_batches, scan_landing
from tasks.label_noise import held_batches
from tasks.registry.aliases import decide, format_history, read_audit, registry_status, rollback


def format_status(ws: Workspace) -> str:
    """Registry versions (aliases, verdict, batches), the last decisions, and what waits in the
    landing zone."""
    cfg = load_params(ws.params)
    rows = registry_status(cfg, ws)
    lines = [f"model {cfg.register_.model_name}:"]
    lines += [
        f"  v{r['version']:<3} {', '.join(r['aliases']) or '-':<26} gate={r['verdict']:<9} batches={r['batches']}"
        for r in rows
    ] or ["  no version registered yet (`ctl run` trains the first)"]
    if decisions := read_audit(ws)[-5:]:
        lines += ["last decisions:", *("  " + line for line in format_history(decisions).splitlines())]
    lines.append(f"landing zone {cfg.ingest.landing_dir}/: {waiting_batches(cfg, ws)}")
    if held := held_batches(ws):
        lines.append(f"held for label noise: {', '.join(held)} (suspects: data/quarantine/<batch>/suspects.csv; "
                     "`ctl release BATCH --reason ...` if the labels are right)")  # fmt: skip
    return "\n".join(lines)


def waiting_batches(cfg: PipelineConfig, ws: Workspace) -> str:
    landing = ws.root / cfg.ingest.landing_dir
    if not landing.is_dir():
        return "missing"
    done = set(ingested_batches(ws.raw)) | rejected_batches(ws.quarantine)
    scan = scan_landing(landing)
    waiting = [p.name for p in scan.batches if p.name not in done]
    text = f"{len(waiting)} batch(es) waiting: {', '.join(waiting)}" if waiting else "nothing waiting"
    if scan.invalid:
        names = ", ".join(repr(name) for name in scan.invalid)
        text += f"; {len(scan.invalid)} folder(s) with an invalid batch name, never ingested: {names} (rename them)"
    return text


def decide_version(ws: Workspace, version: str, approve: bool, reason: str) -> str:
    entry = decide(load_params(ws.params), ws, version, approve, reason)
    return f"{entry.action} v{version} of {entry.model}: champion v{entry.from_version} -> v{entry.to_version}"


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
