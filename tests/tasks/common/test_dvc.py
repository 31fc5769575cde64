"""reproduce_inline: a stage run through DVC's API in this process leaves the record the
``dvc repro`` command line leaves, run-cache entry included, also when the stages of one run
share their dependency hashes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from flows.stages import dvc_stage_env
from tasks.common.config import load_params
from tasks.common.dvc import dvc_add, reproduce_inline, shared_dependency_hashes
from tasks.common.errors import PipelineError
from tasks.common.workspace import Workspace
from tasks.ingest import run_ingest
from tasks.parent import run_parent
from tasks.prepare import run_prepare
from tasks.train import run_train
from tasks.validate import run_validate
from tests.helpers import dvc, write_batch

pytestmark = pytest.mark.integration


def run_cache(root: Path) -> dict[str, str]:
    """Every run-cache entry: its path under .dvc/cache/runs (keyed on the stage's command and
    dependency hashes, named after the hash of its record) -> the record."""
    runs = root / ".dvc" / "cache" / "runs"
    return {p.relative_to(runs).as_posix(): p.read_text() for p in runs.rglob("*") if p.is_file()}


def lock_entry(root: Path, stage: str) -> dict:
    return yaml.safe_load((root / "dvc.lock").read_text())["stages"][stage]


def test_an_inline_stage_leaves_the_lock_and_run_cache_entry_that_dvc_repro_leaves(
    tmp_path: Path, new_workspace: Callable[..., Path]
) -> None:
    root = new_workspace(tmp_path / "ws")
    ws = Workspace(root)
    write_batch(root / "landing" / "batch-001", 60, seed=1)
    assert run_ingest(load_params(ws.params), ws).ingested == ["batch-001"]

    with shared_dependency_hashes():  # as a retrain runs them: prepare reuses validate's hash of data/raw
        assert reproduce_inline(root, "validate", lambda: run_validate(load_params(ws.params), ws))
        assert reproduce_inline(root, "prepare", lambda: run_prepare(load_params(ws.params), ws))
    inline_lock, inline_runs = lock_entry(root, "prepare"), run_cache(root)
    assert len(inline_runs) == 1, inline_runs  # prepare's (validate's outputs are not cached: no entry)
    assert dvc(root, "status", "validate", "prepare").stdout.strip() == "Data and pipelines are up to date."
    # Unchanged: nothing runs.
    assert not reproduce_inline(root, "prepare", lambda: pytest.fail("an unchanged stage ran"))

    shutil.rmtree(root / ".dvc" / "cache" / "runs")
    cli = subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", "--force", "prepare"],
                         cwd=root, env=dvc_stage_env(), capture_output=True, text=True)  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert lock_entry(root, "prepare") == inline_lock
    assert run_cache(root) == inline_runs


def test_a_stage_that_rewrites_a_later_stages_dependency_is_not_hidden_by_the_shared_hashes(
    tmp_path: Path, new_workspace: Callable[..., Path]
) -> None:
    """Train hashes data/prepared; prepare then rewrites it in the same block (its params
    changed): train must see the new data/prepared, run again and record its hash."""
    root = new_workspace(tmp_path / "ws")
    ws = Workspace(root)
    write_batch(root / "landing" / "batch-001", 60, seed=1)
    assert run_ingest(load_params(ws.params), ws).ingested == ["batch-001"]
    run_parent(load_params(ws.params), ws)

    def stage(name: str, step: Callable) -> bool:
        return reproduce_inline(root, name, lambda: step(load_params(ws.params), ws))

    with shared_dependency_hashes():
        assert stage("validate", run_validate) and stage("prepare", run_prepare) and stage("train", run_train)
        params = yaml.safe_load(ws.params.read_text())
        params["prepare"]["split_salt"] = "another-split"
        ws.params.write_text(yaml.safe_dump(params))
        assert stage("prepare", run_prepare)
        assert stage("train", run_train)  # data/prepared changed under it: not the hash it saw before
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    prepared = next(o for o in lock["prepare"]["outs"] if o["path"] == "data/prepared")
    assert next(d for d in lock["train"]["deps"] if d["path"] == "data/prepared")["md5"] == prepared["md5"]
    assert dvc(root, "status", "prepare", "train").stdout.strip() == "Data and pipelines are up to date."


@pytest.mark.parametrize("own_process", [True, False])
def test_a_failed_dvc_command_says_why(dvc_workspace: Workspace, own_process: bool) -> None:
    """DVC's own reason reaches the error (with --quiet, DVC prints nothing when it fails)."""
    with pytest.raises(PipelineError, match=r"dvc add data/missing failed: .*does not exist"):
        dvc_add(dvc_workspace.root / "data" / "missing", dvc_workspace.root, own_process=own_process)
