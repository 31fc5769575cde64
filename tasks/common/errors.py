"""The exceptions the pipeline raises on purpose."""

from __future__ import annotations


class PipelineError(Exception):
    """A problem with the inputs or configuration that a user must fix (not a bug)."""


class WorkspaceBusy(PipelineError):
    """Another process holds the workspace lock."""


class RemoteUnavailable(ConnectionError):
    """A push to or pull from the DVC remote failed: transient, the next run retries it."""


#: Failures that a retry can fix: the network, or a database that was busy for a moment.
#: Matched by class name and module so this module imports none of those libraries.
_TRANSIENT_CLASSES = {
    ("httpx", "TransportError"),
    ("httpcore", "NetworkError"),
    ("httpcore", "TimeoutException"),
    ("requests", "ConnectionError"),
    ("requests", "Timeout"),
    ("urllib3", "NewConnectionError"),
    ("urllib3", "ProtocolError"),
}
_BUSY_DATABASE = (
    "database is locked",
    "database is busy",
    "could not connect to server",
    "server closed the connection",
)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def is_transient(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it) is a failure a retry can fix: a dropped or refused
    connection, a timeout, a database that was locked or busy. A user error or a bug is not:
    retrying repeats it (and a retried register could log a second MLflow run)."""
    if exc is None or isinstance(exc, PipelineError):
        return False
    for err in _chain(exc):
        if isinstance(err, ConnectionError | TimeoutError):
            return True
        classes = {(c.__module__.split(".")[0], c.__name__) for c in type(err).__mro__}
        if classes & _TRANSIENT_CLASSES:
            return True
        if any(name == "OperationalError" for _, name in classes) or type(err).__name__ == "MlflowException":
            message = str(err).lower()
            if any(sign in message for sign in _BUSY_DATABASE):
                return True
    return False
