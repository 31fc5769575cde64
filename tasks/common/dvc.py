"""DVC from Python: run a command, read a tracked directory's hash."""

from __future__ import annotations

import contextlib
import importlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def stage_command(stage: str) -> str:
    """The command every stage of dvc.yaml runs: its own module (tasks/<stage>.py)."""
    return f"python -m tasks.{stage}"


def inline_refusal(root: Path, stage: str) -> str | None:
    """Why this process cannot run ``stage``'s command itself (None when it can): dvc.yaml names
    another command, or a module the stage imports (its ``tasks/*.py`` dependencies, every one
    of them listed there) is not byte for byte the file this process loaded. Running the
    workspace's own command then is the only way DVC's record of the code stays true."""
    spec = (yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")).get("stages") or {}).get(stage) or {}
    if spec.get("cmd") != stage_command(stage):
        return f"dvc.yaml runs {spec.get('cmd')!r}, not {stage_command(stage)!r}"
    for dep in spec.get("deps") or []:
        path = dep if isinstance(dep, str) else next(iter(dep))
        if not (path.startswith("tasks/") and path.endswith(".py")):
            continue
        name = path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        try:
            loaded = Path(importlib.import_module(name).__file__ or "")
        except ImportError as exc:
            return f"{path} does not import here ({exc})"
        theirs = root / path
        if not theirs.is_file() or theirs.read_bytes() != loaded.read_bytes():
            return f"the workspace's {path} differs from the code this process runs ({loaded})"
    return None


def reproduce_inline(root: Path, stage: str, command: Callable[[], None]) -> bool:
    """``dvc repro --single-item <stage>`` through DVC's own API in this process, with the
    stage's command run by calling ``command`` instead of starting a shell and a Python
    interpreter that imports everything again. DVC itself decides whether the stage changed,
    removes its outputs, hashes dependencies and outputs, saves the run cache and writes
    dvc.lock: the record is the one the command line writes. True when the stage ran; an
    exception from ``command`` propagates, wrapped in DVC's ReproductionError, and nothing is
    recorded for the stage.

    One difference: a changed stage always runs here, where ``dvc repro`` would first look for
    the same inputs in its run cache. That look-up hashes every dependency twice more (seconds
    for a data directory of many files: bench/orchestration.py) and can only find something
    after the inputs went back to an earlier state.

    And one shortcut: the run-cache entry DVC saves after the stage is keyed on the dependencies'
    hashes, which ``Stage.save`` computed a moment before (under the same lock); DVC hashes each
    dependency twice more for it (about 1 s per pass over 30,000 files), here it reuses them.
    The entry is the one ``dvc repro`` writes (tests/tasks/common/test_dvc.py)."""
    import dvc.stage.cache as dvc_run_cache
    import dvc.stage.run as dvc_stage_run
    from dvc.dependency.base import Dependency
    from dvc.repo import Repo

    expected = stage_command(stage)

    def cmd_run(dvc_stage: Any, dry: bool = False, run_env: Any = None) -> None:
        if dvc_stage.cmd != expected or dry:  # not ours to shortcut: DVC's own runner
            return original(dvc_stage, dry=dry, run_env=run_env)
        command()
        return None

    def save_run_cache(cache: Any, dvc_stage: Any) -> None:
        # Plain path dependencies (not params, imports or datasets): get_hash is the hash save() just set.
        saved = [dep for dep in dvc_stage.deps if type(dep) is Dependency and dep.hash_info]
        for dep in saved:
            dep.get_hash = lambda dep=dep: dep.hash_info
        try:
            return original_save(cache, dvc_stage)
        finally:
            for dep in saved:
                del dep.get_hash

    original, original_save = dvc_stage_run.cmd_run, dvc_run_cache.StageCache.save
    dvc_stage_run.cmd_run = cmd_run  # run_stage looks the runner up at call time
    dvc_run_cache.StageCache.save = save_run_cache
    try:
        # DVC resolves targets and paths against the working directory, as ``dvc repro`` run there
        with contextlib.chdir(root), Repo(str(root)) as repo:
            (found,) = repo.stage.collect(stage)
            with repo.lock:
                if not found.changed():  # what ``dvc repro`` asks first (single item: no upstream)
                    return False
            return bool(repo.reproduce(targets=[stage], single_item=True, force=True))
    finally:
        dvc_stage_run.cmd_run, dvc_run_cache.StageCache.save = original, original_save
