"""How a step runs as a command: logging, one-line user errors, exit codes."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

from tasks.common.errors import PipelineError

log = logging.getLogger("tasks")


#: The stages defined in dvc.yaml, in pipeline order. Same names as params.yaml sections,
#: tasks/<name>.py modules and Prefect task names.
DVC_STAGES: tuple[str, ...] = ("validate", "prepare", "train", "evaluate")

#: Prefix of the one-line message a stage prints on a user-facing failure; the flow looks
#: for it in the stage's output so a failed run shows the stage's own words.
ERROR_PREFIX = "error: "


def setup_cli_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")


def run_cli(stage: str, fn: Callable[[], object]) -> None:
    """Run a stage's ``main`` body: user errors become one line on stderr and exit code 2.

    The closing "finished in" line is the stage's own work time, which bench/orchestration.py
    separates from orchestration overhead.
    """
    setup_cli_logging()
    started = time.monotonic()
    try:
        fn()
        log.info("%s finished in %.1f s", stage, time.monotonic() - started)
    except PipelineError as exc:
        print(f"{ERROR_PREFIX}{stage}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
