"""gate: the challenger against the live champion on the same current test split.

The rules are in tasks/registry/rules.py (pure); this module does the IO: it reads the
challenger's test predictions (evaluate's predictions file), re-scores the champion from
the registry on the same images, applies the rules and writes the report. Not a DVC stage:
it depends on the live registry.
"""

from __future__ import annotations

import json
import logging

import mlflow
import numpy as np
import torch

from tasks.common.config import PipelineConfig
from tasks.common.errors import PipelineError
from tasks.common.files import write_json
from tasks.common.workspace import Workspace
from tasks.data.prepared import image_shape, load_split, read_split_hashes
from tasks.model.network import MODEL_WEIGHTS, load_model, predict_logits
from tasks.model.predictions import read_predictions
from tasks.registry.rules import GateReport, evaluate_gate, gate_metrics, measure_latency_ms
from tasks.registry.tracking import CHAMPION, alias_version, mlflow_tracking, tracking_uri

log = logging.getLogger(__name__)

SPLIT = "test"


def champion_predictions(cfg: PipelineConfig, ws: Workspace, champion: str | None) -> np.ndarray | None:
    """The live champion re-scored on today's test split (None without a comparable champion)."""
    if champion is None:
        return None
    name = cfg.register_.model_name
    with mlflow_tracking(tracking_uri(ws)) as client:
        classes = tuple(json.loads(client.get_model_version(name, champion).tags.get("classes", "[]")))
        if classes != cfg.classes:
            log.warning(
                "champion v%s has classes %s, not %s: judged on the floors only", champion, classes, cfg.classes
            )
            return None
        model = mlflow.pytorch.load_model(f"models:/{name}/{champion}", map_location="cpu")
    images, _ = load_split(ws.prepared, SPLIT)
    logits = predict_logits(model, images, cfg.evaluate.batch_size, torch.device("cpu"))
    return logits.argmax(1)


def run_gate(cfg: PipelineConfig, ws: Workspace, challenger_version: str) -> GateReport:
    with mlflow_tracking(tracking_uri(ws)) as client:
        champion = alias_version(client, cfg.register_.model_name, CHAMPION)
    if champion == challenger_version:
        champion = None  # re-judging the champion against itself says nothing
    challenger = read_predictions(ws.predictions(SPLIT), cfg.classes)
    if [row["sha256"] for row in challenger.ids] != read_split_hashes(ws.prepared).get(SPLIT, []):
        raise PipelineError(f"{ws.predictions(SPLIT)} is not for the current test split; run the evaluate stage again")
    champion_pred = champion_predictions(cfg, ws, champion)
    model_mb = (ws.models / MODEL_WEIGHTS).stat().st_size / 2**20
    latency = None
    if cfg.gate.max_latency_ms is not None:
        model, _ = load_model(ws.models)
        latency = measure_latency_ms(model, image_shape(ws.prepared, SPLIT))
    report = evaluate_gate(
        challenger.y_true, challenger.y_pred, champion_pred, cfg.classes, cfg.gate, model_mb, latency
    )
    write_json(ws.gate_metrics, gate_metrics(report))
    write_json(ws.gate_report, {
        "challenger_version": challenger_version,
        "champion_version": champion if champion_pred is not None else None,
        **report.to_dict(),
    })  # fmt: skip
    log.info("gate: %s v%s vs champion v%s %s", report.verdict, challenger_version, champion, report.reasons())
    return report
