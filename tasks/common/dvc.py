"""DVC from Python: run a command, read a tracked directory's hash."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tasks.common.errors import PipelineError, RemoteUnavailable


def run_dvc(args: list[str], cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise PipelineError(f"dvc {' '.join(args)} failed: {detail[-1] if detail else proc.returncode}")
    return proc.stdout


#: The cluster profile's DVC remote: its name in ``.dvc/config.local`` and its bucket.
CLUSTER_REMOTE = "cluster"
CLUSTER_REMOTE_URL = "s3://dvc"


def set_default_remote(cwd: Path, url: str, endpoint: str, name: str = CLUSTER_REMOTE) -> None:
    """Remote ``name`` at ``url`` (an S3 store at ``endpoint``) as this checkout's default, in
    ``.dvc/config.local`` (git-ignored): the endpoint is per machine, the keys come from the environment."""
    run_dvc(["remote", "add", "--local", "--force", "--default", name, url], cwd)
    run_dvc(["remote", "modify", "--local", name, "endpointurl", endpoint], cwd)


def default_remote(cwd: Path) -> str | None:
    """The remote this machine pushes to (``core.remote`` in .dvc/config or .dvc/config.local),
    None when there is none (the embedded profile: data stays in the local cache)."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "remote", "default"], cwd=cwd, capture_output=True, text=True,
                          check=False)  # fmt: skip
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def push(targets: list[str], cwd: Path) -> None:
    """``dvc push`` of ``targets`` to the default remote. A failure is transient (the store is
    down or unreachable): the caller keeps its pending mark and pushes again on its next run."""
    try:
        run_dvc(["push", "--quiet", *targets], cwd)
    except PipelineError as exc:
        what = ", ".join(targets) or "the data and outputs"
        raise RemoteUnavailable(f"could not push {what} to the DVC remote: {exc}") from exc


def dvc_data_hash(dvc_file: Path) -> str | None:
    """The md5 DVC recorded for a tracked directory (None when it is not tracked yet)."""
    if not dvc_file.is_file():
        return None
    outs = yaml.safe_load(dvc_file.read_text(encoding="utf-8")).get("outs") or [{}]
    return outs[0].get("md5")
