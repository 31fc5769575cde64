"""Where MLflow lives for a workspace, and the registry's aliases."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.common.workspace import Workspace

CHAMPION = "champion"
CHALLENGER = "challenger"

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


def tracking_uri(ws: Workspace) -> str:
    """MLFLOW_TRACKING_URI when set, else a SQLite file in the workspace."""
    return os.environ.get(TRACKING_URI_ENV) or f"sqlite:///{(ws.root / 'mlflow' / 'mlflow.db').resolve()}"


def has_registry(ws: Workspace) -> bool:
    """Whether there is a registry to ask: a tracking server is configured, or the workspace's
    SQLite store exists. Without one there is no champion, and MLflow need not be imported
    (nor its empty database created and migrated)."""
    return bool(os.environ.get(TRACKING_URI_ENV)) or (ws.mlflow / "mlflow.db").is_file()


def default_artifact_location(ws: Workspace) -> str | None:
    """Artifacts beside the workspace's SQLite store; a user-set tracking server decides its own."""
    return None if os.environ.get(TRACKING_URI_ENV) else (ws.mlflow / "artifacts").resolve().as_uri()


@contextmanager
def mlflow_tracking(uri: str) -> Iterator[Any]:
    """Point MLflow at ``uri`` for the block only: ``mlflow.set_tracking_uri`` also writes the
    MLFLOW_TRACKING_URI variable, which would leak into the next run in this process."""
    import mlflow
    from mlflow import MlflowClient

    saved = {k: os.environ.get(k) for k in (TRACKING_URI_ENV, "MLFLOW_REGISTRY_URI")}
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield MlflowClient(uri, uri)
    finally:
        mlflow.set_tracking_uri(saved[TRACKING_URI_ENV])
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def version_tagged(client: Any, name: str, tag: str, value: str) -> Any | None:
    """The first version of model ``name`` whose tag ``tag`` is ``value``."""
    for version in client.search_model_versions(f"name='{name}'"):
        if version.tags.get(tag) == value:
            return version
    return None


def version_for_data(ws: Workspace, model_name: str, data_hash: str) -> str | None:
    """The registered version already trained on this DVC data hash, if any (no registry: none,
    without importing MLflow)."""
    if not has_registry(ws):
        return None
    with mlflow_tracking(tracking_uri(ws)) as client:
        version = version_tagged(client, model_name, "dvc_data_hash", data_hash)
    return None if version is None else str(version.version)


PREVIOUS = "previous"


def alias_version(client: Any, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None
