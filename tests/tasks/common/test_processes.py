"""Stopping the DVC stage a killed run left behind, on real processes (``sleep`` in a session of its own)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import psutil
import pytest

from tasks.common.files import write_json
from tasks.common.processes import StageGroup, group_members, stop_group, stop_leftover_stage
from tasks.common.workspace import Workspace


@pytest.fixture
def stage() -> Iterator[subprocess.Popen]:
    """A process leading a group of its own, as ``dvc repro`` does under the flow."""
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def dead_owner() -> tuple[int, float]:
    """The pid and create time of a run process that is gone."""
    proc = subprocess.Popen(["sleep", "30"])
    started = psutil.Process(proc.pid).create_time()
    proc.kill()
    proc.wait()
    return proc.pid, started


def record(ws: Workspace, stage: subprocess.Popen, owner: tuple[int, float], leader_offset: float = 0.0) -> StageGroup:
    leader_started = psutil.Process(stage.pid).create_time() + leader_offset
    group = StageGroup("train", stage.pid, leader_started, *owner)
    write_json(ws.stage_process, asdict(group))
    return group


def test_a_group_whose_owner_is_alive_is_left_alone(tmp_path: Path, stage: subprocess.Popen) -> None:
    ws = Workspace(tmp_path)
    group = record(ws, stage, (os.getpid(), psutil.Process().create_time()))
    assert stop_leftover_stage(ws, grace=1) == []
    assert stage.poll() is None and ws.stage_process.is_file()
    assert [p.pid for p in group_members(group)] == [stage.pid]


def test_a_leftover_group_is_stopped_and_its_dvc_locks_are_freed(
    tmp_path: Path, stage: subprocess.Popen, caplog: pytest.LogCaptureFixture
) -> None:
    from dvc.fs import localfs
    from dvc.rwlock import rwlock

    ws = Workspace(tmp_path)
    lock_dir = tmp_path / ".dvc" / "tmp"
    lock_dir.mkdir(parents=True)
    models, prepared = str(tmp_path / "models"), str(tmp_path / "data" / "prepared")
    theirs, other = {"pid": stage.pid, "cmd": "dvc repro train"}, {"pid": os.getpid(), "cmd": "dvc status"}
    (lock_dir / "rwlock").write_text(json.dumps({"write": {models: theirs}, "read": {prepared: [theirs, other]}}))
    owner = dead_owner()
    record(ws, stage, owner)

    with caplog.at_level(logging.WARNING, logger="tasks.common.processes"):
        assert stop_leftover_stage(ws, grace=5) == [stage.pid]

    # Not reaped yet (this test is its parent): a zombie, which DVC would count as a live lock holder.
    assert psutil.Process(stage.pid).status() == psutil.STATUS_ZOMBIE
    assert json.loads((lock_dir / "rwlock").read_text()) == {"write": {}, "read": {prepared: [other]}}
    with rwlock(str(lock_dir), localfs, "dvc repro train", read=[prepared], write=[models], hardlink=False):
        pass  # DVC takes the stage's paths again
    assert stage.wait(timeout=1) == -signal.SIGTERM
    assert not ws.stage_process.exists()
    assert [r.getMessage() for r in caplog.records] == [
        f"stopped the train stage left running by a run that was killed (pid {owner[0]}): processes {stage.pid}"
    ]


def test_a_group_id_now_naming_another_group_is_not_touched(tmp_path: Path, stage: subprocess.Popen) -> None:
    # The recorded leader started at another time: this pid is a later process, not our stage.
    ws = Workspace(tmp_path)
    record(ws, stage, dead_owner(), leader_offset=-100.0)
    assert stop_leftover_stage(ws, grace=1) == []
    assert stage.poll() is None and not ws.stage_process.exists()


def test_a_stage_ignoring_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(30)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        group = StageGroup("train", proc.pid, psutil.Process(proc.pid).create_time(), *dead_owner())
        assert stop_group(group, grace=0.3) == [proc.pid]
        assert proc.wait(timeout=1) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
