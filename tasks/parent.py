"""parent: decide what the next training starts from, the champion or the pretrained weights.

Runs after ingest and before the DVC stages. Not a DVC stage: like register and the gate it
reads the live registry. With ``train.warm_start: auto`` it looks at the champion (same task and
inputs? trained only on batches still in the data? new batches since? fewer than
``train.warm_start_full_every`` warm starts in a row?) and writes the decision to
``data/parent/parent.json``, with the champion's weights beside it for a warm start
(tasks/model/warm_start.py has the rules). ``data/parent`` is ``dvc add``-ed and a dep of the
train stage, so dvc.lock records what every model started from and ``dvc repro`` repeats it.

The decision is only taken again when the data or the params it rests on changed: a rerun with
nothing new leaves data/parent as it is, so the stages have nothing to do.

CLI: ``python -m tasks.parent`` (the retrain flow runs it as its ``parent`` task).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tasks.common.config import PipelineConfig, load_params
from tasks.common.dvc import dvc_add, dvc_data_hash
from tasks.common.errors import PipelineError
from tasks.common.files import read_json, write_json
from tasks.common.stage import run_cli
from tasks.common.workspace import Workspace
from tasks.data.manifest import read_all_manifests
from tasks.model.warm_start import COMPATIBILITY_KEYS, WARM_STARTS_TAG, ChampionFacts, StartDecision, decide_start
from tasks.registry.lineage import flatten
from tasks.registry.tracking import CHAMPION, alias_version, has_registry, mlflow_tracking, tracking_uri

log = logging.getLogger(__name__)

#: The saved-model files a warm start needs (tasks/model/network.py save_model).
MODEL_FILES = ("model.safetensors", "model.json")
#: What the decision rests on besides the data: a change to any of these takes it again.
STAMP_KEYS = (*COMPATIBILITY_KEYS, "train.warm_start", "train.warm_start_full_every")


def flat_params(cfg: PipelineConfig) -> dict[str, str]:
    """The params as the champion's MLflow run holds them (flattened, as strings)."""
    return {k: str(v) for k, v in flatten("", cfg.model_dump(mode="json", by_alias=True)).items()}


def stamp(cfg: PipelineConfig, ws: Workspace) -> str:
    flat = flat_params(cfg)
    payload = {"data": dvc_data_hash(ws.raw_dvc), **{k: flat[k] for k in STAMP_KEYS}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def data_batches(ws: Workspace) -> list[str]:
    return sorted({row["batch_id"] for row in read_all_manifests(ws.raw)})


def _champion(cfg: PipelineConfig, client: Any) -> tuple[ChampionFacts, str] | None:
    """The champion's facts and its model URI; None without one."""
    name = cfg.register_.model_name
    version = alias_version(client, name, CHAMPION)
    if version is None:
        return None
    registered = client.get_model_version(name, version)
    params = client.get_run(registered.run_id).data.params
    tags = registered.tags
    uri = f"models:/{name}/{version}"
    from tasks.model.serving import predates_image_model

    unusable = "predates the image-file model (no saved weights to start from)" if predates_image_model(uri) else ""
    facts = ChampionFacts(
        version=version,
        params=params,
        batches=tuple(b for b in tags.get("batch_ids", "").split(",") if b),
        warm_starts_in_row=int(tags.get(WARM_STARTS_TAG, "0")),
        unusable=unusable,
    )
    return facts, uri


def _download_weights(uri: str, target: Path) -> None:
    """The champion's saved model (weights and spec) from the registry into ``target``: its
    MLmodel file, then only the folder that holds them (not the model's code or environment)."""
    import mlflow
    import yaml

    with tempfile.TemporaryDirectory(prefix="parent-") as tmp:
        mlmodel_file = mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/MLmodel", dst_path=tmp)
        mlmodel = yaml.safe_load(Path(mlmodel_file).read_text(encoding="utf-8"))
        saved_path = mlmodel["flavors"]["python_function"]["artifacts"]["model"]["path"]
        saved = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/{saved_path}", dst_path=tmp))
        for name in MODEL_FILES:
            if not (saved / name).is_file():
                raise PipelineError(f"{uri} has no {name}: it cannot be warm-started from")
            shutil.copy2(saved / name, target / name)


def _write(ws: Workspace, decision: StartDecision, stamp_value: str, uri: str | None) -> None:
    """Replace data/parent in one rename, then ``dvc add`` it."""
    ws.parent.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".parent-", dir=ws.parent.parent))
    try:
        if uri is not None:
            _download_weights(uri, staging)
        write_json(staging / ws.parent_record.name, {**decision.record(), "stamp": stamp_value})
        old = ws.parent.with_name(".parent-old")
        shutil.rmtree(old, ignore_errors=True)
        if ws.parent.exists():
            os.replace(ws.parent, old)
        os.replace(staging, ws.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    dvc_add(ws.parent, ws.root)


def run_parent(cfg: PipelineConfig, ws: Workspace) -> StartDecision:
    """Decide (or keep the standing decision), write data/parent, and say which."""
    current = stamp(cfg, ws)
    if ws.parent_record.is_file() and (record := read_json(ws.parent_record)).get("stamp") == current:
        decision = StartDecision.from_record(record)
        log.info("training start unchanged (same data and params): %s, %s", decision.mode, decision.reason)
        return decision
    enabled = cfg.train.warm_start == "auto"
    if not (enabled and has_registry(ws)):
        return _decide(cfg, ws, current, None)
    with mlflow_tracking(tracking_uri(ws)) as client:  # the weights are downloaded inside it too
        return _decide(cfg, ws, current, _champion(cfg, client))


def _decide(cfg: PipelineConfig, ws: Workspace, current: str, facts: tuple[ChampionFacts, str] | None) -> StartDecision:
    if cfg.train.warm_start not in (None, "auto"):
        reason = f"train.warm_start names a model directory ({cfg.train.warm_start}): train starts from it"
        decision = StartDecision("full", reason)
    else:
        flat = flat_params(cfg)
        decision = decide_start(
            {k: flat[k] for k in COMPATIBILITY_KEYS},
            facts[0] if facts else None,
            data_batches(ws),
            cfg.train.warm_start == "auto",
            cfg.train.warm_start_full_every,
        )
    _write(ws, decision, current, facts[1] if facts and decision.mode == "warm" else None)
    log.info("training starts %s: %s", "from the champion" if decision.mode == "warm" else "in full", decision.reason)
    return decision


def main() -> None:
    ws = Workspace(Path.cwd())
    run_cli("parent", lambda: print(json.dumps(run_parent(load_params(ws.params), ws).record())))


if __name__ == "__main__":
    main()
