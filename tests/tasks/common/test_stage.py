"""The stage runner's outcome file and the transient-error classifier (pure, no subprocess)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks.common.errors import PipelineError, is_transient
from tasks.common.stage import RESULT_ENV, StageOutcome, run_cli


@dataclass(frozen=True)
class Done:
    n_images: int


def run_and_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fn) -> StageOutcome:
    target = tmp_path / "outcome.json"
    monkeypatch.setenv(RESULT_ENV, str(target))
    try:
        run_cli("prepare", fn)
    finally:
        outcome = StageOutcome.read(target)
    return outcome


def test_a_finished_stage_reports_its_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outcome = run_and_read(tmp_path, monkeypatch, lambda: Done(7))
    assert outcome.ok and outcome.stage == "prepare" and outcome.result == {"n_images": 7}
    assert outcome.error is None and outcome.seconds >= 0


def test_a_user_error_is_one_line_and_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def fail() -> None:
        raise PipelineError("the train split is empty; ingest more images")

    with pytest.raises(SystemExit) as exited:
        run_and_read(tmp_path, monkeypatch, fail)
    outcome = StageOutcome.read(tmp_path / "outcome.json")
    assert exited.value.code == 2
    assert (outcome.ok, outcome.error_kind, outcome.error) == (
        False,
        "user",
        "the train split is empty; ingest more images",
    )
    assert capsys.readouterr().err == "error: prepare: the train split is empty; ingest more images\n"


def test_a_bug_keeps_its_traceback_and_is_reported_as_a_bug(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(KeyError):
        run_and_read(tmp_path, monkeypatch, lambda: {}["missing"])
    outcome = StageOutcome.read(tmp_path / "outcome.json")
    assert (outcome.ok, outcome.error_kind) == (False, "bug") and outcome.error == "KeyError: 'missing'"


def _raised_from(cause: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as exc:
            raise RuntimeError("while registering") from exc
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError("timed out"),
        sqlite3.OperationalError("database is locked"),
        _raised_from(sqlite3.OperationalError("database is locked")),
    ],
)
def test_transient_errors_are_retried(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        PipelineError("unknown backbone 'x'"),
        ValueError("shape mismatch"),
        KeyError("a bug"),
        sqlite3.OperationalError("no such table: runs"),  # a broken schema does not heal by waiting
        None,
    ],
)
def test_user_errors_and_bugs_are_not_retried(exc: BaseException | None) -> None:
    assert not is_transient(exc)
