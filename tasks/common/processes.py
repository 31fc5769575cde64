"""The process group of a running DVC stage, recorded in the workspace, so that a run killed
outright (SIGKILL, the OOM killer: nothing it can catch) does not leave its stage running and
holding DVC's locks: the next run that takes the workspace stops what the dead run left.

A pid alone could name a later, unrelated process, so the record also holds the create times
of the group's leader and of the owning run process."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from tasks.common.errors import PipelineError
from tasks.common.files import read_json, write_json
from tasks.common.workspace import Workspace

log = logging.getLogger(__name__)

#: How long a stage's processes get to exit after SIGTERM before they are killed.
STOP_GRACE_S = 10.0
#: How long to wait for SIGKILLed processes to disappear.
KILL_WAIT_S = 5.0
#: Two readings of one process's create time differ by rounding only (clock ticks are 10 ms).
SAME_START_S = 0.05


@dataclass(frozen=True)
class StageGroup:
    """A stage's process group (the ``dvc repro`` process leads it) and the run that started it."""

    stage: str
    pgid: int
    leader_started: float
    owner_pid: int
    owner_started: float


def started_at(pid: int) -> float | None:
    """The create time of a live process; None when it is gone or a zombie (it has exited)."""
    try:
        proc = psutil.Process(pid)
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc.create_time()
    except psutil.NoSuchProcess:
        return None


def record_stage_group(ws: Workspace, stage: str, pgid: int) -> StageGroup:
    """Record the group just started by this process (its leader's pid is ``pgid``)."""
    group = StageGroup(stage, pgid, psutil.Process(pgid).create_time(), os.getpid(), psutil.Process().create_time())
    write_json(ws.stage_process, asdict(group))
    return group


def owner_alive(group: StageGroup) -> bool:
    started = started_at(group.owner_pid)
    return started is not None and abs(started - group.owner_started) < SAME_START_S


def group_members(group: StageGroup) -> list[psutil.Process]:
    """The live processes still in the group. None after a reboot, or when the group id now names
    another group: an id is not reused while a process is in its group, so a different leader
    means ours is gone."""
    leader = started_at(group.pgid)
    if group.leader_started < psutil.boot_time() or (
        leader is not None and abs(leader - group.leader_started) >= SAME_START_S
    ):
        return []
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == group.pgid and started_at(proc.pid) is not None:
                members.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


def stop_group(group: StageGroup, grace: float = STOP_GRACE_S) -> list[int]:
    """SIGTERM to the group, SIGKILL to what is left after ``grace`` seconds; the pids it found.
    Raises when a process outlives SIGKILL (stuck in the kernel)."""
    members = group_members(group)
    pids = sorted(p.pid for p in members)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, KILL_WAIT_S)):
        if not members:
            return pids
        try:
            os.killpg(group.pgid, sig)  # the group id is still ours: ``members`` is not empty
        except ProcessLookupError:
            return pids
        deadline = time.monotonic() + wait
        while (members := group_members(group)) and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = sorted({*pids, *(p.pid for p in members)})
    if members:
        raise PipelineError(f"{group.stage} stage processes {[p.pid for p in members]} survive SIGKILL")
    return pids


def release_dvc_locks(root: Path, pids: list[int]) -> None:
    """Drop the entries of ``pids`` from DVC's ``.dvc/tmp/rwlock``. DVC drops an entry whose
    process is gone by itself, but a zombie (an orphan not reaped yet) counts as alive there."""
    from dvc.config import Config
    from dvc.fs import localfs
    from dvc.rwlock import RWLOCK_FILE, _edit_rwlock  # DVC's own reader and writer of the file, under its guard

    dvc_dir = root / ".dvc"
    if not (dvc_dir / "tmp" / RWLOCK_FILE).is_file():
        return
    hardlink = Config(dvc_dir=str(dvc_dir))["core"].get("hardlink_lock", False)
    dead = set(pids)
    with _edit_rwlock(str(dvc_dir / "tmp"), localfs, hardlink) as lock:
        for path, info in list(lock["write"].items()):
            if info["pid"] in dead:
                del lock["write"][path]
        for path, infos in list(lock["read"].items()):
            if kept := [info for info in infos if info["pid"] not in dead]:
                lock["read"][path] = kept
            else:
                del lock["read"][path]


def stop_leftover_stage(ws: Workspace, grace: float = STOP_GRACE_S) -> list[int]:
    """If a run recorded a stage and is gone, stop what is left of that stage's group, free its
    DVC locks and drop the record; the pids stopped. A group whose owner is alive is left alone."""
    path = ws.stage_process
    try:
        group = StageGroup(**read_json(path))
    except FileNotFoundError:
        return []
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
        log.warning("ignoring unreadable %s", path)
        path.unlink(missing_ok=True)
        return []
    if owner_alive(group):
        return []
    pids = stop_group(group, grace)
    if pids:
        log.warning(
            "stopped the %s stage left running by a run that was killed (pid %d): processes %s",
            group.stage, group.owner_pid, ", ".join(map(str, pids)),
        )  # fmt: skip
        if zombies := [pid for pid in pids if psutil.pid_exists(pid)]:
            release_dvc_locks(ws.root, zombies)
    path.unlink(missing_ok=True)
    return pids


def forget_stage_group(ws: Workspace, group: StageGroup) -> None:
    """Drop the record once the group has ended (a member that outlived it keeps the record, for the next run)."""
    if not group_members(group) and ws.stage_process.is_file() and StageGroup(**read_json(ws.stage_process)) == group:
        ws.stage_process.unlink(missing_ok=True)
