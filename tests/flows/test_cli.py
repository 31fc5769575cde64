"""The ``ctl`` console script: its commands, and one-line errors for what a user gets wrong.
(What each command does is tested where its flow or step is: test_gate.py runs ``ctl status``
and ``ctl history`` on a real registry.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks.common.stage import STEPS

runner = CliRunner()


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("demo", "up", "down", "check", "retrain", "watch", "stage", "status", "history", "rollback"):
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
