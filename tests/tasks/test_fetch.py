"""tasks/fetch.py: a machine that did not ingest the data checks out exactly the version an event
names, from the DVC remote into its own cache (here a directory remote stands in for S3)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tasks.common.dvc import dvc_data_hash
from tasks.common.errors import PipelineError, RemoteUnavailable
from tasks.common.workspace import Workspace
from tasks.fetch import params_sha256, run_fetch

pytestmark = pytest.mark.integration


def dvc(cwd: Path, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr or proc.stdout


def repo(root: Path, remote: Path) -> Workspace:
    root.mkdir(parents=True)
    subprocess.run(["git", "init", "--quiet"], cwd=root, check=True)
    dvc(root, "init", "--quiet")
    dvc(root, "config", "--local", "core.analytics", "false")
    dvc(root, "remote", "add", "--local", "--default", "store", str(remote))
    (root / "params.yaml").write_text("train:\n  epochs: 1\n")
    return Workspace(root)


def ingested(ws: Workspace, files: dict[str, str], benchmark: dict[str, str] | None = None) -> tuple[str, str]:
    """What ingest leaves on the landing machine: data/raw (and data/benchmark) added and pushed."""
    for rel, text in files.items():
        (ws.raw / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws.raw / rel).write_text(text)
    targets = ["data/raw"]
    for rel, text in (benchmark or {}).items():
        (ws.benchmark / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws.benchmark / rel).write_text(text)
        targets = ["data/raw", "data/benchmark"]
    dvc(ws.root, "add", "--quiet", *targets)
    dvc(ws.root, "push", "--quiet")
    return dvc_data_hash(ws.raw_dvc) or "", dvc_data_hash(ws.benchmark.with_suffix(".dvc")) or ""


def test_a_worker_checks_out_exactly_the_announced_version_from_the_remote(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    landing, worker = repo(tmp_path / "landing", remote), repo(tmp_path / "worker", remote)
    first, bench = ingested(landing, {"b1/a.txt": "a", "b1/b.txt": "b"}, {"x.txt": "x"})
    second, _ = ingested(landing, {"b2/c.txt": "c"})

    got = run_fetch(worker, first, bench, params_sha256(landing))
    assert got.changed == ["data/raw.dvc", "data/benchmark.dvc"]
    assert sorted(p.relative_to(worker.raw).as_posix() for p in worker.raw.rglob("*") if p.is_file()) == [
        "b1/a.txt",
        "b1/b.txt",
    ]  # the first version, not the landing machine's newest
    assert (worker.benchmark / "x.txt").read_text() == "x"
    assert dvc_data_hash(worker.raw_dvc) == first
    assert run_fetch(worker, first, bench).changed == []  # already there

    got = run_fetch(worker, second, "")  # the landing machine has no benchmark at that version
    assert got.changed == ["data/raw.dvc", "data/benchmark.dvc"]
    assert (worker.raw / "b2" / "c.txt").read_text() == "c"
    assert worker.benchmark.is_dir() and not any(worker.benchmark.iterdir())
    # What DVC itself says of the checkout: the .dvc files written here match the data pulled.
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "data/raw.dvc"], cwd=worker.root,
                            capture_output=True, text=True, check=True)  # fmt: skip
    assert "up to date" in status.stdout


def test_a_fetch_refuses_other_params_no_version_and_no_remote(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    landing, worker = repo(tmp_path / "landing", remote), repo(tmp_path / "worker", remote)
    data_hash, _ = ingested(landing, {"b1/a.txt": "a"})
    (landing.params).write_text("train:\n  epochs: 2\n")
    with pytest.raises(PipelineError, match=r"params\.yaml here"):
        run_fetch(worker, data_hash, "", params_sha256(landing))
    with pytest.raises(PipelineError, match="no data version"):
        run_fetch(worker, "", "")
    with pytest.raises(RemoteUnavailable, match="could not pull"):
        run_fetch(worker, "0" * 32 + ".dir", "")  # a version the remote does not hold
    dvc(worker.root, "remote", "remove", "--local", "store")
    with pytest.raises(PipelineError, match="no DVC remote"):
        run_fetch(worker, data_hash, "")
