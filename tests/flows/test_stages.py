"""Integration: a retrain killed outright (SIGKILL) leaves its DVC stage running when the stage
has a process of its own; the next stage stops it and completes. A stage run in the flow's own
process dies with it, and DVC's locks of the dead process do not block the next one."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from uuid import UUID

import psutil
import pytest
import yaml
from prefect import flow

from flows.logs import project_logs_to_run
from flows.stages import STAGE_TASKS
from tasks.common.files import read_json
from tasks.common.processes import StageGroup, group_members
from tasks.common.workspace import Workspace
from tests.helpers import dvc, tiny_params, write_batch

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]


def wait_for_train_stage(ws: Workspace, proc: subprocess.Popen, log: Path, timeout: float = 120) -> StageGroup:
    """The recorded train stage group, once its ``python -m tasks.train`` process runs."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "the retrain ended before its train stage: " + log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no train stage in time: " + log.read_text()[-3000:]
        if ws.stage_process.is_file() and (group := StageGroup(**read_json(ws.stage_process))).stage == "train":
            with contextlib.suppress(psutil.NoSuchProcess):
                if any("tasks.train" in " ".join(p.cmdline()) for p in group_members(group)):
                    return group
        time.sleep(0.2)


@flow(name="train-once")
def train_once(workspace: str) -> dict:
    """The next stage a run starts on the workspace (in the test's process, on the session's harness)."""
    with project_logs_to_run():
        return STAGE_TASKS["train"]("train", workspace)


def run_log(flow_run_id: UUID) -> list[tuple[str, str]]:
    """(logger, message) of every record in a flow run's log."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=5)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [(log.name, log.message) for log in logs]


def test_the_next_stage_stops_the_stage_a_killed_run_left_and_completes(
    tmp_path: Path, new_workspace: Callable[..., Path]
) -> None:
    from prefect.settings import PREFECT_API_URL

    params = tiny_params()
    params["train"]["epochs"] = 500  # minutes of training: still running when the flow is killed
    params["retrain"]["isolate_stages"] = True  # the stage in a process group of its own
    root = new_workspace(tmp_path / "ws", params)
    ws = Workspace(root)
    write_batch(root / "landing" / "batch-001", 60, seed=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=str(PREFECT_API_URL.value()), PYTHONUNBUFFERED="1")  # the session's harness
    log = tmp_path / "retrain.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("ctl")), "retrain", "-w", str(root)],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    leftover: list[psutil.Process] = []
    try:
        group = wait_for_train_stage(ws, proc, log)
        proc.send_signal(signal.SIGKILL)  # the flow-run process only
        proc.wait(timeout=10)
        # The bug: the stage outlives its run and holds DVC's lock on the stage's paths.
        leftover = group_members(group)
        assert any("tasks.train" in " ".join(p.cmdline()) for p in leftover), "the train stage died with the flow"
        busy = dvc(root, "repro", "--single-item", "prepare", check=False)
        assert busy.returncode != 0 and "data/prepared' is busy" in busy.stderr, busy.stderr

        params["train"]["epochs"] = 1
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        state = train_once(str(root), return_state=True)
    finally:
        for child in [proc, *leftover]:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                child.kill()

    assert state.is_completed(), state.message
    assert state.result()["ran"] and (root / "models").is_dir()
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in leftover)
    assert not ws.stage_process.exists()
    pids = ", ".join(str(pid) for pid in sorted(p.pid for p in leftover))
    warning = f"stopped the train stage left running by a run that was killed (pid {proc.pid}): processes {pids}"
    assert ("tasks.common.processes", warning) in run_log(state.state_details.flow_run_id)


def wait_for_inline_train(root: Path, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Until DVC's lock file says the run's own process (no stage process) writes the train stage's outputs."""
    rwlock = root / ".dvc" / "tmp" / "rwlock"
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "the retrain ended before its train stage: " + log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no train stage in time: " + log.read_text()[-3000:]
        with contextlib.suppress(FileNotFoundError, ValueError):
            writers = {info["pid"] for path, info in (yaml.safe_load(rwlock.read_text()) or {}).get("write", {}).items()
                       if path.endswith("/models")}  # fmt: skip
            if writers == {proc.pid}:
                return
        time.sleep(0.2)


def test_a_stage_run_in_the_flows_process_dies_with_it_and_the_next_run_is_not_blocked(
    tmp_path: Path, new_workspace: Callable[..., Path]
) -> None:
    params = tiny_params()
    params["train"]["epochs"] = 500
    root = new_workspace(tmp_path / "ws", params)
    write_batch(root / "landing" / "batch-001", 60, seed=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    from prefect.settings import PREFECT_API_URL

    env.update(PREFECT_API_URL=str(PREFECT_API_URL.value()), PYTHONUNBUFFERED="1")
    log = tmp_path / "retrain.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("ctl")), "retrain", "-w", str(root)],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for_inline_train(root, proc, log)
        before = psutil.Process(proc.pid).children(recursive=True)
        assert not any("tasks.train" in " ".join(p.cmdline()) for p in before), "train ran in a process of its own"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        params["train"]["epochs"] = 1
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        state = train_once(str(root), return_state=True)
    finally:
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            proc.kill()
    assert state.is_completed(), state.message
    assert state.result()["ran"] and (root / "models").is_dir()
    assert dvc(root, "status", "train").stdout.strip() == "Data and pipelines are up to date."
