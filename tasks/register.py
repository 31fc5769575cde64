"""register: log the evaluated model to MLflow and register a version with its lineage.

Not a DVC stage: the registry is live state, not a reproducible output. Every new version
gets the ``challenger`` alias; whether it becomes ``champion`` is the gate's decision
(tasks/gate.py, tasks/promote.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.common import PipelineError, Workspace, read_json, run_cli
from tasks.config import PipelineConfig, load_params
from tasks.ingest import dvc_data_hash

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


# ---------------------------------------------------------------- pure cores


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """Nested params as MLflow keys: ``train.augment.hflip``."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), inner))
        return out
    if isinstance(value, list | tuple):
        return {prefix: ",".join(str(v) for v in value)}
    return {prefix: value}


def params_hash(cfg: PipelineConfig) -> str:
    canonical = json.dumps(cfg.model_dump(mode="json", by_alias=True), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


# ---------------------------------------------------------------- IO


def tracking_uri(ws: Workspace) -> str:
    """MLFLOW_TRACKING_URI when set, else a SQLite file in the workspace."""
    return os.environ.get(TRACKING_URI_ENV) or f"sqlite:///{(ws.root / 'mlflow' / 'mlflow.db').resolve()}"


def default_artifact_location(ws: Workspace) -> str | None:
    """Artifacts beside the workspace's SQLite store; a user-set tracking server decides its own."""
    return None if os.environ.get(TRACKING_URI_ENV) else (ws.root / "mlflow" / "artifacts").resolve().as_uri()


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


def _git(ws: Workspace, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=ws.root, capture_output=True, text=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def collect_lineage(cfg: PipelineConfig, ws: Workspace) -> dict[str, str]:
    lock = ws.root / "dvc.lock"
    validation = read_json(ws.reports / "validate.json")
    dirty = _git(ws, "status", "--porcelain", "--untracked-files=no", "--", "tasks", "flows", "dvc.yaml")
    return {
        "git_commit": _git(ws, "rev-parse", "HEAD") or "none",
        "git_dirty": str(bool(dirty)).lower(),
        "dvc_data_hash": dvc_data_hash(ws.raw.with_suffix(".dvc")) or "none",
        "dvc_lock_hash": hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else "none",
        "params_hash": params_hash(cfg),
        "batch_ids": ",".join(validation["batches"]),
        "n_images": str(validation["n_images"]),
        "classes": json.dumps(list(cfg.classes)),
    }


def check_outputs_current(ws: Workspace) -> None:
    """Refuse to register a model that dvc.lock does not vouch for (stale or hand-edited)."""
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"], cwd=ws.root, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise PipelineError(f"dvc status failed: {proc.stderr.strip().splitlines()[-1:]}")
    stale = json.loads(proc.stdout or "{}")
    if stale:
        raise PipelineError(f"pipeline outputs are not current (dvc status: {sorted(stale)}); run `dvc repro` first")


@dataclass(frozen=True)
class RegisterResult:
    model_name: str
    version: str
    run_id: str
    aliases: tuple[str, ...]
    tracking_uri: str
    created: bool
    #: Whether the gate has decided on this version (a crash between register and the gate
    #: leaves it undecided; the next run judges it).
    judged: bool = False


def _ensure_experiment(client: Any, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def _version_tagged(client: Any, name: str, tag: str, value: str) -> Any | None:
    for version in client.search_model_versions(f"name='{name}'"):
        if version.tags.get(tag) == value:
            return version
    return None


def version_for_data(cfg: PipelineConfig, ws: Workspace, data_hash: str) -> str | None:
    """The registered version already trained on this DVC data hash, if any."""
    with mlflow_tracking(tracking_uri(ws)) as client:
        version = _version_tagged(client, cfg.register_.model_name, "dvc_data_hash", data_hash)
    return None if version is None else str(version.version)


def _log_run(cfg: PipelineConfig, ws: Workspace, experiment_id: str, lineage: dict[str, str]) -> tuple[str, str]:
    """An MLflow run with params, metrics, reports and the model; returns (run id, model uri)."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from tasks.model import load_model

    model, _ = load_model(ws.models)
    metrics = read_json(ws.reports / "metrics.json")
    train = read_json(ws.reports / "train.json")
    size = int(np.load(ws.prepared / "test_images.npy", mmap_mode="r").shape[1])
    example = np.zeros((2, size, size, 3), dtype=np.uint8)
    with torch.inference_mode():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"retrain-{lineage['dvc_data_hash'][:8]}") as run:
        mlflow.log_params(flatten("", cfg.model_dump(mode="json", by_alias=True)))
        mlflow.log_metrics({f"{split}_{k}": float(v) for split, m in metrics.items() for k, v in m.items()})
        mlflow.log_metrics({f"train_{k}": float(v) for k, v in train.items() if isinstance(v, int | float)})
        mlflow.set_tags(lineage)
        mlflow.log_artifacts(str(ws.evaluation), "evaluation")
        for path in (ws.reports / "train_history.csv", ws.reports / "validate.json", ws.params, ws.root / "dvc.lock"):
            if path.is_file():
                mlflow.log_artifact(str(path), "pipeline")
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            signature=signature,
            input_example=example,
            # torch.export's format: the registry holds a graph, not a pickle of our classes.
            serialization_format="pt2",
            pip_requirements=_requirements(),
        )
    return run.info.run_id, info.model_uri


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "torchvision", "timm", "numpy", "safetensors")]


def run_register(cfg: PipelineConfig, ws: Workspace) -> RegisterResult:
    for needed in (ws.models / "model.json", ws.reports / "metrics.json", ws.reports / "validate.json"):
        if not needed.is_file():
            raise PipelineError(f"missing {needed.relative_to(ws.root)}; run the pipeline (dvc repro) first")
    check_outputs_current(ws)
    uri, artifacts = tracking_uri(ws), default_artifact_location(ws)
    with mlflow_tracking(uri) as client:
        return _register(cfg, ws, client, uri, artifacts)


def _register(cfg: PipelineConfig, ws: Workspace, client: Any, uri: str, artifacts: str | None) -> RegisterResult:
    import mlflow

    rcfg = cfg.register_
    lineage = collect_lineage(cfg, ws)
    existing = _version_tagged(client, rcfg.model_name, "dvc_lock_hash", lineage["dvc_lock_hash"])
    if existing is not None:
        log.info(
            "version %s already holds this pipeline state (dvc.lock %s)",
            existing.version,
            lineage["dvc_lock_hash"][:12],
        )
        version = client.get_model_version(rcfg.model_name, existing.version)  # search results lack aliases
        judged = "gate.verdict" in version.tags
        return RegisterResult(
            rcfg.model_name, str(version.version), version.run_id, tuple(version.aliases), uri, False, judged
        )
    experiment_id = _ensure_experiment(client, rcfg.experiment, artifacts)
    run_id, model_uri = _log_run(cfg, ws, experiment_id, lineage)
    version = str(mlflow.register_model(model_uri, rcfg.model_name, tags=lineage).version)
    client.set_registered_model_alias(rcfg.model_name, CHALLENGER, version)
    aliases = [CHALLENGER]
    log.info("registered %s version %s (%s)", rcfg.model_name, version, ", ".join(aliases))
    return RegisterResult(rcfg.model_name, version, run_id, tuple(aliases), uri, True)


def main() -> None:
    ws = Workspace(Path.cwd())
    run_cli("register", lambda: print(run_register(load_params(ws.params), ws)))


if __name__ == "__main__":
    main()
