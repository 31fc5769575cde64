"""DVC from Python: run a command, read a tracked directory's hash."""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from tasks.common.errors import PipelineError, RemoteUnavailable


def run_dvc(args: list[str], cwd: Path) -> str:
    """``dvc <args>`` in ``cwd``; its output is captured, and a failure raises with DVC's last line
    (its ``ERROR: ...``). Never pass ``--quiet``: DVC then says nothing at all when it fails."""
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines() or [f"exit status {proc.returncode}"]
        raise PipelineError(f"dvc {' '.join(args)} failed: {detail[-1]}")
    return proc.stdout


#: The cluster profile's DVC remote: its name in ``.dvc/config.local`` and its bucket.
CLUSTER_REMOTE = "cluster"
CLUSTER_REMOTE_URL = "s3://dvc"


def set_default_remote(cwd: Path, url: str, endpoint: str, name: str = CLUSTER_REMOTE) -> None:
    """Remote ``name`` at ``url`` (an S3 store at ``endpoint``) as this checkout's default, in
    ``.dvc/config.local`` (git-ignored): the endpoint is per machine, the keys come from the environment."""
    run_dvc(["remote", "add", "--local", "--force", "--default", name, url], cwd)
    run_dvc(["remote", "modify", "--local", name, "endpointurl", endpoint], cwd)


def default_remote(cwd: Path, own_process: bool = False) -> str | None:
    """The remote this machine pushes to (``core.remote`` in .dvc/config or .dvc/config.local),
    None when there is none (the embedded profile: data stays in the local cache) or DVC cannot
    read its configuration. Read in this process, as ``dvc remote default`` reads it; with
    ``own_process``, by ``dvc remote default`` itself (ingest: its own process opens nothing but
    the landing zone, data/ and its cache, which the hostile-input tests audit)."""
    if own_process:
        with contextlib.suppress(PipelineError):
            return run_dvc(["remote", "default"], cwd).strip() or None
        return None
    from dvc.config import Config
    from dvc.exceptions import DvcException

    try:
        return Config(dvc_dir=str(cwd / ".dvc"))["core"].get("remote") or None
    except DvcException:
        return None


def dvc_add(targets: Path | Sequence[Path], root: Path, own_process: bool = False) -> None:
    """``dvc add <targets>`` through DVC's API in this process: no interpreter and DVC
    start-up per call (the retrain's parent task: 0.8-1.3 s in all on the demo). DVC lists
    every folder of the workspace while it does; with ``own_process`` the command runs in a
    process of its own (ingest, whose process must not read outside its batches).

    A target inside a directory DVC already tracks (``data/raw/<batch>`` of ``data/raw.dvc``)
    updates that directory's record with this subfolder alone: DVC hashes and caches only its
    files, and the record equals a ``dvc add`` of the whole directory."""
    paths = [targets] if isinstance(targets, Path) else list(targets)
    where = [str(p.relative_to(root)) for p in paths]
    if own_process:
        run_dvc(["add", *where], root)
        return
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with contextlib.chdir(root), Repo(str(root)) as repo:
            repo.scm_context.quiet = True  # no "to track the changes with git, run: ..." hint
            repo.add(where)
    except DvcException as exc:
        raise PipelineError(f"dvc add {' '.join(where)} failed: {exc}") from exc


def push(targets: list[str], cwd: Path) -> None:
    """``dvc push`` of ``targets`` to the default remote. A failure is transient (the store is
    down or unreachable): the caller keeps its pending mark and pushes again on its next run."""
    try:
        run_dvc(["push", *targets], cwd)
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


#: Dependency hashes shared by the inline stages of one pipeline run (``shared_dependency_hashes``).
_shared_hashes: dict[tuple[Any, ...], Any] | None = None


@contextlib.contextmanager
def shared_dependency_hashes() -> Iterator[None]:
    """Within this block, ``reproduce_inline`` calls share the dependency hashes DVC computes:
    validate and prepare both depend on data/raw and data/benchmark, hashed once instead of
    twice (about 1.5 s per pass over 40,000 files). For one run of the stages in dvc.yaml's
    order under the workspace lock: nothing but the stages writes the workspace meanwhile, and
    a stage's outputs are dropped from the shared hashes when it has run. A stage that runs in
    a process of its own calls ``forget_shared_hashes`` after it."""
    global _shared_hashes
    previous, _shared_hashes = _shared_hashes, {}
    try:
        yield
    finally:
        _shared_hashes = previous


def forget_shared_hashes() -> None:
    if _shared_hashes is not None:
        _shared_hashes.clear()


def _forget_under(built: dict[tuple[Any, ...], Any], paths: list[str]) -> None:
    """Drop every hash of a path at, inside or above one of ``paths`` (a stage's outputs)."""
    for key in list(built):
        where = key[1]
        if any(where == p or where.startswith(p + os.sep) or p.startswith(where + os.sep) for p in paths):
            del built[key]


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

    And one shortcut: DVC hashes each dependency when it asks whether the stage changed, again
    when it records the stage (``Stage.save``), and again for the run-cache entry: three passes
    over a data directory (about 1.5 s each over 40,000 files, bench/orchestration.py). Here a
    dependency's hash is computed once per call (or per ``shared_dependency_hashes`` block) and
    reused: no stage command (tasks/<stage>.py) writes its dependencies, and the workspace lock
    keeps every other writer out meanwhile. The record is the one ``dvc repro`` writes
    (tests/tasks/common/test_dvc.py)."""
    import dvc.stage.run as dvc_stage_run
    from dvc.dependency.base import Dependency
    from dvc.output import Output
    from dvc.repo import Repo

    expected = stage_command(stage)

    def cmd_run(dvc_stage: Any, dry: bool = False, run_env: Any = None) -> None:
        if dvc_stage.cmd != expected or dry:  # not ours to shortcut: DVC's own runner
            return original(dvc_stage, dry=dry, run_env=run_env)
        command()
        return None

    built = _shared_hashes if _shared_hashes is not None else {}

    def build_once(output: Any, odb: Any, fs_path: str, fs: Any, name: str, **kwargs: Any) -> Any:
        # Plain path dependencies only (not params, imports or datasets, and never an output).
        if type(output) is not Dependency:
            return original_build(output, odb, fs_path, fs, name, **kwargs)
        key = (odb.path, fs_path, name, bool(kwargs.get("dry_run")))
        if key not in built:
            built[key] = original_build(output, odb, fs_path, fs, name, **kwargs)
        return built[key]

    original, original_build = dvc_stage_run.cmd_run, Output._build
    dvc_stage_run.cmd_run = cmd_run  # run_stage looks the runner up at call time
    Output._build = build_once
    try:
        # DVC resolves targets and paths against the working directory, as ``dvc repro`` run there
        with contextlib.chdir(root), Repo(str(root)) as repo:
            (found,) = repo.stage.collect(stage)
            with repo.lock:
                if not found.changed():  # what ``dvc repro`` asks first (single item: no upstream)
                    return False
            try:
                return bool(repo.reproduce(targets=[stage], single_item=True, force=True))
            finally:
                _forget_under(built, [out.fs_path for out in found.outs])
    finally:
        dvc_stage_run.cmd_run, Output._build = original, original_build
