"""The project's own loggers (``tasks.*``) in the Prefect UI.

Code in tasks/ logs with the standard library (it must run without Prefect). During a flow
run this attaches Prefect's API log handler to the ``tasks`` logger, so what a step logs in
process (the gate's "judged on the floors only" warning, for instance) shows in that run's
logs in the UI, not only on the serving process's console. Stage subprocesses are already
streamed into the run log line by line (flows/stages.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

PROJECT_LOGGER = "tasks"


@contextmanager
def project_logs_to_run(level: int = logging.INFO) -> Iterator[None]:
    """For the duration of the block (a flow run), send ``tasks.*`` records to the run's log."""
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger(PROJECT_LOGGER)
    handler = APILogHandler(level=level)
    previous = logger.level
    logger.addHandler(handler)
    if previous == logging.NOTSET or previous > level:
        logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
