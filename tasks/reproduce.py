"""reproduce: a registered version's exact pipeline state, restored into a fresh directory.

From the version's lineage: the code at its ``git_commit`` (cloned from ``repo``); its params,
dvc.lock and data ``.dvc`` files and its uncached reports from its MLflow run (``pipeline/``,
tasks/register.py); the data and the stages' cached outputs from DVC (the remote when
``AWS_ENDPOINT_URL_S3`` names one, as in the cluster profile; else the source workspace's cache).
Then ``dvc status`` must have nothing to report, and with ``--repro`` ``dvc repro`` must have
nothing to run: the version is what that code, data and params produce.

    python -m tasks.reproduce VERSION --into DIR [--repo URL] [--repro]     (or ``ctl reproduce``)

Not a DVC stage. Exit 0 when the restored state is current, 1 when DVC finds something stale.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tasks.common.config import load_params
from tasks.common.dvc import CLUSTER_REMOTE_URL, run_dvc, set_default_remote
from tasks.common.errors import PipelineError
from tasks.common.stage import setup_cli_logging
from tasks.common.workspace import Workspace
from tasks.registry.lineage import OUTS_DIR, STATE_DIR
from tasks.registry.tracking import mlflow_tracking, tracking_uri

log = logging.getLogger(__name__)

#: The DVC remote a restored directory pulls from when the environment names an S3 endpoint
#: (default: the cluster profile's bucket).
REMOTE_URL_ENV = "CTL_DVC_REMOTE_URL"
UP_TO_DATE = "Data and pipelines are up to date."


@dataclass
class ReproduceResult:
    version: str
    commit: str
    directory: str
    source: str  # where the data came from: the remote's URL or a cache directory
    up_to_date: bool
    status: str
    repro_output: str | None = None

    def summary(self) -> str:
        lines = [
            f"version {self.version} restored in {self.directory} (commit {self.commit[:12]}, data from {self.source})",
            f"dvc status: {self.status}",
        ]
        if self.repro_output is not None:
            lines.append(f"dvc repro: {self.repro_output.splitlines()[-1] if self.repro_output else ''}")
        return "\n".join(lines)


def _git(cwd: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise PipelineError(f"git {' '.join(args)} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout.strip()


def _lineage(client: object, model_name: str, version: str) -> tuple[str, str, bool]:
    """(run id, git commit, whether the code was dirty) of a registered version."""
    from mlflow.exceptions import MlflowException

    try:
        registered = client.get_model_version(model_name, version)
    except MlflowException as exc:
        raise PipelineError(f"model {model_name!r} has no version {version!r}") from exc
    commit = registered.tags.get("git_commit", "none")
    if commit == "none":
        raise PipelineError(f"version {version} has no git_commit tag: it was not registered from a git checkout")
    return registered.run_id, commit, registered.tags.get("git_dirty") == "true"


def _restore_state(run_id: str, into: Path) -> None:
    """params.yaml, dvc.lock and data/*.dvc back in place, and the uncached reports at their paths."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="reproduce-") as tmp:
        state = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=STATE_DIR, dst_path=tmp))
        for file in state.iterdir():
            if not file.is_file():
                continue
            target = into / "data" / file.name if file.suffix == ".dvc" else into / file.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)
        outs = Path(tmp) / OUTS_DIR
        if outs.is_dir():
            shutil.copytree(outs, into, dirs_exist_ok=True)
    Workspace(into).benchmark.mkdir(parents=True, exist_ok=True)  # a stage dep even when empty (as ingest makes it)


def _data_source(into: Path, source_ws: Workspace) -> str:
    """Pull from the S3 remote the environment names, or share the source workspace's DVC cache."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3")
    if endpoint:
        url = os.environ.get(REMOTE_URL_ENV, CLUSTER_REMOTE_URL)
        set_default_remote(into, url, endpoint)
        run_dvc(["pull"], into)
        return url
    cache = source_ws.root / ".dvc" / "cache"
    if not cache.is_dir():
        raise PipelineError(f"no DVC remote (AWS_ENDPOINT_URL_S3 is not set) and no DVC cache in {source_ws.root}")
    run_dvc(["cache", "dir", "--local", str(cache.resolve())], into)
    run_dvc(["checkout"], into)
    return str(cache)


def run_reproduce(source_ws: Workspace, version: str, into: Path, repo: str | None, repro: bool) -> ReproduceResult:
    if into.exists() and any(into.iterdir()):
        raise PipelineError(f"{into} is not empty: reproduce restores into a new directory")
    model_name = load_params(source_ws.params).register_.model_name
    with mlflow_tracking(tracking_uri(source_ws)) as client:
        run_id, commit, dirty = _lineage(client, model_name, version)
        if dirty:
            log.warning("version %s was registered from a checkout with uncommitted code changes", version)
        _git(into.parent if into.parent.is_dir() else Path.cwd(), "clone", "--quiet", repo or str(source_ws.root),
             str(into))  # fmt: skip
        _git(into, "checkout", "--quiet", "--detach", commit)
        _restore_state(run_id, into)
    source = _data_source(into, source_ws)
    status = run_dvc(["status"], into).strip()
    result = ReproduceResult(version, commit, str(into), source, status == UP_TO_DATE, status)
    if repro:
        result.repro_output = run_dvc(["repro"], into).strip()
        result.up_to_date = result.up_to_date and "Running stage" not in result.repro_output
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version", help="the registered version's number")
    parser.add_argument("--into", required=True, type=Path, help="a new (or empty) directory")
    parser.add_argument("--repo", default=None, help="git URL of the code (default: this workspace)")
    parser.add_argument("--repro", action="store_true", help="also run `dvc repro`, which must have nothing to do")
    args = parser.parse_args()
    setup_cli_logging()
    try:
        result = run_reproduce(Workspace(Path.cwd()), args.version, args.into.resolve(), args.repo, args.repro)
    except PipelineError as exc:
        raise SystemExit(f"error: reproduce: {exc}") from None
    print(result.summary())
    raise SystemExit(0 if result.up_to_date else 1)


if __name__ == "__main__":
    main()
