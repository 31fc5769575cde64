"""How a step runs as a command: logging, one-line user errors, exit codes."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

from tasks.common.errors import PipelineError, is_transient
from tasks.common.files import read_json, write_json

log = logging.getLogger("tasks")


#: The stages defined in dvc.yaml, in pipeline order. Same names as params.yaml sections,
#: tasks/<name>.py modules and Prefect task names.
DVC_STAGES: tuple[str, ...] = ("validate", "prepare", "train", "evaluate")

#: The steps with a ``tasks/<name>.py`` command of their own (``ctl stage NAME``); gate and
#: promote run inside the retrain flow, and promote's registry commands are ``ctl status`` & co.
STEPS: tuple[str, ...] = ("ingest", "parent", *DVC_STAGES, "register")

#: The flow sets this variable to a file path; the stage writes its ``StageOutcome`` there as
#: JSON. No file after ``dvc repro`` means DVC skipped the stage (nothing changed).
RESULT_ENV = "CTL_STAGE_RESULT"


@dataclass(frozen=True)
class StageOutcome:
    """What a stage process tells the flow: how it ended, in how long, and its result object."""

    stage: str
    ok: bool
    seconds: float
    #: ``user`` (fix the data or params; one line in ``error``), ``transient`` (a retry may
    #: help) or ``bug`` (a traceback is in the log); None when ok.
    error_kind: str | None = None
    error: str | None = None
    result: dict[str, Any] | None = None

    @classmethod
    def read(cls, path: Path) -> StageOutcome:
        return cls(**read_json(path))


def _record(outcome: StageOutcome) -> None:
    target = os.environ.get(RESULT_ENV)
    if target:
        write_json(Path(target), asdict(outcome))


def _plain(result: object) -> dict[str, Any] | None:
    if is_dataclass(result) and not isinstance(result, type):
        return json.loads(json.dumps(asdict(result), default=str))
    return None


def setup_cli_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")


def run_step(stage: str, fn: Callable[[], object]) -> tuple[StageOutcome, Exception | None]:
    """Run a step's body and say how it ended; the exception comes back too (its traceback is
    the log's business). The "finished in" line is the step's own work time, which
    bench/orchestration.py separates from orchestration overhead."""
    started = time.monotonic()
    try:
        result = fn()
    except PipelineError as exc:
        return StageOutcome(stage, False, time.monotonic() - started, "user", str(exc)), exc
    except Exception as exc:
        kind = "transient" if is_transient(exc) else "bug"
        return StageOutcome(stage, False, time.monotonic() - started, kind, f"{type(exc).__name__}: {exc}"), exc
    seconds = time.monotonic() - started
    log.info("%s finished in %.1f s", stage, seconds)
    return StageOutcome(stage, True, seconds, result=_plain(result)), None


def run_cli(stage: str, fn: Callable[[], object]) -> None:
    """Run a stage's ``main`` body: user errors become one line on stderr and exit code 2.

    The outcome also goes to the file named by ``CTL_STAGE_RESULT`` when the flow set it, so
    the flow reads how the stage ended instead of scraping its output.
    """
    setup_cli_logging()
    outcome, exc = run_step(stage, fn)
    _record(outcome)
    if exc is None:
        return
    if outcome.error_kind == "user":
        print(f"error: {stage}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    raise exc
