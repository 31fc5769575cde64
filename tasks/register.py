"""register: log the evaluated model to MLflow and register a version with its lineage.

Not a DVC stage: the registry is live state, not a reproducible output. Every new version
gets the ``challenger`` alias; whether it becomes ``champion`` is the gate's decision
(tasks/gate.py, tasks/promote.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from tasks.common.config import PipelineConfig, load_params
from tasks.common.errors import PipelineError
from tasks.common.files import read_json
from tasks.common.stage import run_cli
from tasks.common.workspace import Workspace
from tasks.model.network import MODEL_SPEC
from tasks.model.serving import DEFAULT_TOP_K
from tasks.registry.lineage import (
    OUTS_DIR,
    STATE_DIR,
    check_outputs_current,
    collect_lineage,
    flatten,
    state_files,
    uncached_outputs,
)
from tasks.registry.tracking import (
    CHALLENGER,
    default_artifact_location,
    mlflow_tracking,
    tracking_uri,
    version_tagged,
)

log = logging.getLogger(__name__)


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


#: Run tag holding the logged model's URI: marks a run whose model was logged completely.
MODEL_URI_TAG = "model_uri"


def _logged_run(client: Any, experiment_id: str, lock_hash: str) -> tuple[str, str] | None:
    """A finished run that already logged this pipeline state's model (a register that crashed
    or lost its connection before registering the version): reused, never logged twice."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.dvc_lock_hash = '{lock_hash}' and attributes.status = 'FINISHED'",
        max_results=10,
    )
    for run in runs:
        if MODEL_URI_TAG in run.data.tags:
            log.info("reusing run %s, which logged this pipeline state's model", run.info.run_id)
            return run.info.run_id, run.data.tags[MODEL_URI_TAG]
    return None


def _log_run(cfg: PipelineConfig, ws: Workspace, experiment_id: str, lineage: dict[str, str]) -> tuple[str, str]:
    """An MLflow run with params, metrics, reports and the model; returns (run id, model uri)."""
    import mlflow

    metrics = read_json(ws.metrics)
    train = read_json(ws.train_report)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"retrain-{lineage['dvc_data_hash'][:8]}") as run:
        mlflow.log_params(flatten("", cfg.model_dump(mode="json", by_alias=True)))
        mlflow.log_metrics({f"{split}_{k}": float(v) for split, m in metrics.items() for k, v in m.items()})
        mlflow.log_metrics({f"train_{k}": float(v) for k, v in train.items() if isinstance(v, int | float)})
        mlflow.set_tags(lineage)
        mlflow.log_artifacts(str(ws.evaluation), "evaluation")
        log_pipeline_state(ws)
        info = log_classifier(cfg, ws)
        mlflow.set_tag(MODEL_URI_TAG, info.model_uri)  # last: the run is complete
    return run.info.run_id, info.model_uri


def log_pipeline_state(ws: Workspace) -> None:
    """What ``ctl reproduce`` puts back: params, dvc.lock and the data's .dvc files in ``pipeline/``,
    the uncached reports at their paths under ``pipeline/outs/``."""
    import mlflow

    for path in state_files(ws):
        mlflow.log_artifact(str(path), STATE_DIR)
    for rel in uncached_outputs(ws):
        path = ws.root / rel
        if path.is_dir():
            mlflow.log_artifacts(str(path), f"{OUTS_DIR}/{rel.as_posix()}")
        elif path.is_file():
            mlflow.log_artifact(str(path), (PurePosixPath(OUTS_DIR) / rel.parent).as_posix())


def log_classifier(cfg: PipelineConfig, ws: Workspace) -> Any:
    """The pyfunc model (tasks/model/serving.py): encoded images in, class names out, with the
    saved weights, the decoding of the prepare stage and this workspace's ``tasks`` code."""
    import mlflow
    from mlflow.models import infer_signature

    from tasks.model.serving import MODEL_ARTIFACT, Decoding, ImageClassifierModel, example_input, model_config

    decoding = Decoding(cfg.prepare.image_size, cfg.validate_.formats, cfg.validate_.max_pixels)
    example, params = example_input(cfg.prepare.image_size), {"top_k": DEFAULT_TOP_K}
    output = ImageClassifierModel(decoding, cfg.evaluate.batch_size).load(ws.models).predict(None, example, params)
    code = ws.root / "tasks" if (ws.root / "tasks").is_dir() else Path(__file__).parent
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(code / "model" / "pyfunc_entry.py"),
        model_config=model_config(decoding, cfg.evaluate.batch_size),
        artifacts={MODEL_ARTIFACT: str(ws.models)},
        code_paths=[str(code)],
        signature=infer_signature(example, output, params),
        input_example=(example, params),
        pip_requirements=_requirements(),
    )


def _requirements() -> list[str]:
    from importlib.metadata import version

    packages = ("torch", "torchvision", "timm", "numpy", "safetensors", "pillow", "pandas", "pydantic", "pyyaml")
    return [f"{pkg}=={version(pkg)}" for pkg in packages]


def run_register(cfg: PipelineConfig, ws: Workspace) -> RegisterResult:
    for needed in (ws.models / MODEL_SPEC, ws.metrics, ws.validate_report):
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
    existing = version_tagged(client, rcfg.model_name, "dvc_lock_hash", lineage["dvc_lock_hash"])
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
    logged = _logged_run(client, experiment_id, lineage["dvc_lock_hash"])
    run_id, model_uri = logged or _log_run(cfg, ws, experiment_id, lineage)
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
