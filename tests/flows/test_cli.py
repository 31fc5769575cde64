"""The ``ctl`` console script: its commands, and one-line errors for what a user gets wrong.
(What each command does is tested where its flow or step is: test_gate.py runs ``ctl status``
and ``ctl history`` on a real registry.)"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks.common.stage import STEPS
from tests.helpers import tiny_params, write_batch

runner = CliRunner()


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    commands = ("init", "benchmark", "run", "predict", "approve", "reject", "demo", "up", "down", "check", "retrain")
    for command in (*commands, "watch", "stage", "status", "history", "rollback", "release"):
        assert command in result.output


def test_unknown_step_is_one_line_naming_the_supported_ones(tmp_path: Path) -> None:
    result = runner.invoke(app, ["stage", "trian", "-w", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: stage: unknown step 'trian'; supported: {', '.join(STEPS)}"]


def test_missing_workspace_is_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["status", "-w", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: workspace {tmp_path / 'nowhere'} is not a directory"]


def test_a_bad_params_file_is_one_line_with_the_key(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("classes: [a, b]\ntrain:\n  epochs: 3\n  epoch: 4\n")
    result = runner.invoke(app, ["status", "-w", str(tmp_path)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: status: ") and "train.epoch" in lines[0]


def test_a_step_run_through_ctl_reports_a_user_error_like_its_module(tmp_path: Path) -> None:
    # No params.yaml: the step's own one-line error and exit code 2, as `python -m tasks.prepare`.
    result = runner.invoke(app, ["stage", "prepare", "-w", str(tmp_path)])
    assert result.exit_code == 2
    assert "params file not found" in result.output


@pytest.mark.integration
def test_the_console_script_is_installed() -> None:
    ctl = Path(sys.executable).with_name("ctl")
    proc = subprocess.run([str(ctl), "--help"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "rollback" in proc.stdout


@pytest.mark.integration
def test_a_run_without_services_is_quiet_keeps_its_state_in_the_workspace_and_stops_on_sigterm(
    tmp_path: Path, new_workspace: Callable[..., Path]
) -> None:
    import psutil

    params = tiny_params()
    params["train"]["epochs"] = 500  # minutes of training: the stop must not wait for it
    params["retrain"]["isolate_stages"] = True  # the stage's own processes must stop with the run
    ws = new_workspace(tmp_path / "ws", params)
    write_batch(ws / "landing" / "batch-001", 60, seed=1)
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_")) and k != "DO_NOT_TRACK"}
    env.update(HOME=str(home), PYTHONUNBUFFERED="1")
    log = tmp_path / "retrain.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("ctl")), "retrain", "-w", str(ws)],
            env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    started = []
    try:
        deadline = time.monotonic() + 240
        while "> python -m tasks.train" not in log.read_text():  # the train stage's process has started
            assert proc.poll() is None, "the retrain ended before its train stage: " + log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no train stage within 240 s: " + log.read_text()[-3000:]
            time.sleep(0.5)
        started = psutil.Process(proc.pid).children(recursive=True)
        stage = [p for p in started if "dvc" in " ".join(p.cmdline())]
        assert stage, "no dvc process under the retrain"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        _, alive = psutil.wait_procs(stage, timeout=15)
    finally:
        for child in [proc, *started]:  # whatever is left, e.g. Prefect's temporary API
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                child.kill()
    assert not alive, f"stage processes left running: {[p.cmdline() for p in alive]}"
    output = log.read_text()
    assert "Crash detected! Execution was aborted by a termination signal." in output
    # Contained and quiet: the temporary API's database is in the workspace, not in ~/.prefect.
    assert f"this run's Prefect state is kept in {ws / '.cache' / 'prefect-local'}" in output
    assert (ws / ".cache" / "prefect-local" / "prefect.db").is_file()
    assert not (home / ".prefect").exists()
    assert "telemetry" not in output.lower()
