"""gate: the challenger against the live champion on the same images.

The rules are in tasks/registry/rules.py (pure); this module does the IO: it picks the
split(s) to judge (``gate.judge_on``: the fixed benchmark set when evaluate scored one, else
the test split), reads the challenger's predictions there (evaluate's predictions files) and
the cheap baseline's scores (reports/evaluation/baseline.json, for derived floors), re-scores
the champion from the registry on the same images, applies the rules and writes the report.
Not a DVC stage: it depends on the live registry.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import numpy as np
import torch

from tasks.common.config import PipelineConfig
from tasks.common.errors import PipelineError
from tasks.common.files import read_json, write_json
from tasks.common.workspace import Workspace
from tasks.data.prepared import image_shape, load_split, read_split_hashes
from tasks.data.splits import BENCHMARK
from tasks.model.network import MODEL_WEIGHTS, load_model, predict_logits
from tasks.model.predictions import Predictions, read_predictions
from tasks.model.serving import load_network
from tasks.registry.rules import (
    GateReport,
    SplitPredictions,
    choose_splits,
    evaluate_gate_on,
    gate_metrics,
    measure_latency_ms,
)
from tasks.registry.tracking import CHAMPION, alias_version, mlflow_tracking, tracking_uri

log = logging.getLogger(__name__)

SPLIT = "test"


def load_champion(name: str, version: str) -> torch.nn.Module:
    """The registered model ``name`` v``version`` on the CPU: the one place the gate loads it
    (call inside ``mlflow_tracking``)."""
    return load_network(f"models:/{name}/{version}")


def champion_predictions(
    cfg: PipelineConfig, ws: Workspace, champion: str | None, splits: Sequence[str] = (SPLIT,)
) -> dict[str, np.ndarray] | None:
    """The live champion re-scored on today's images of each of ``splits`` (None without a
    comparable champion)."""
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
        model = load_champion(name, champion)
    predictions = {}
    for split in splits:
        images, _ = load_split(ws.prepared, split)
        predictions[split] = predict_logits(model, images, cfg.evaluate.batch_size, torch.device("cpu")).argmax(1)
    return predictions


def benchmark_scored(ws: Workspace) -> bool:
    """Whether the evaluate stage wrote benchmark predictions for at least one image."""
    path = ws.predictions(BENCHMARK)
    if not path.is_file():
        return False
    with path.open(encoding="utf-8") as fh:
        return next(fh, None) is not None and next(fh, None) is not None  # a header and a row


def read_challenger(cfg: PipelineConfig, ws: Workspace, split: str, hashes: dict[str, list[str]]) -> Predictions:
    """evaluate's predictions for ``split``, refused unless they are for its current images."""
    predictions = read_predictions(ws.predictions(split), cfg.classes)
    if [row["sha256"] for row in predictions.ids] != hashes.get(split, []):
        raise PipelineError(
            f"{ws.predictions(split)} is not for the current {split} split; run the evaluate stage again"
        )
    return predictions


def read_baselines(cfg: PipelineConfig, ws: Workspace, challenger: dict[str, Predictions]) -> dict[str, dict] | None:
    """The cheap baseline's scores on each judged split; None when every floor is set in params
    (nothing to derive). A derived floor without its baseline would silently be lower: refused."""
    if cfg.gate.min_accuracy is not None and cfg.gate.min_macro_f1 is not None:
        return None
    if not ws.baseline.is_file():
        raise PipelineError(f"missing {ws.baseline} (the gate's derived floors); run the evaluate stage again")
    scores = read_json(ws.baseline).get("splits", {})
    for split, predictions in challenger.items():
        if scores.get(split, {}).get("n") != len(predictions.y_true):
            raise PipelineError(f"{ws.baseline} has no scores for the current {split} split; run evaluate again")
    return {split: scores[split] for split in challenger}


def run_gate(cfg: PipelineConfig, ws: Workspace, challenger_version: str) -> GateReport:
    with mlflow_tracking(tracking_uri(ws)) as client:
        champion = alias_version(client, cfg.register_.model_name, CHAMPION)
    if champion == challenger_version:
        champion = None  # re-judging the champion against itself says nothing
    splits, selection = choose_splits(cfg.gate.judge_on, benchmark_scored(ws))
    hashes = read_split_hashes(ws.prepared)
    challenger = {split: read_challenger(cfg, ws, split, hashes) for split in splits}
    baselines = read_baselines(cfg, ws, challenger) or {}
    champion_pred = champion_predictions(cfg, ws, champion, splits)
    data = {
        split: SplitPredictions(
            p.y_true, p.y_pred, champion_pred[split] if champion_pred is not None else None, baselines.get(split)
        )
        for split, p in challenger.items()
    }
    model_mb = (ws.models / MODEL_WEIGHTS).stat().st_size / 2**20
    latency = None
    if cfg.gate.max_latency_ms is not None:
        model, _ = load_model(ws.models)
        latency = measure_latency_ms(model, image_shape(ws.prepared, SPLIT))
    report = evaluate_gate_on(data, cfg.classes, cfg.gate, model_mb, latency, selection)
    write_json(ws.gate_metrics, gate_metrics(report))
    write_json(ws.gate_report, {
        "challenger_version": challenger_version,
        "champion_version": champion if champion_pred is not None else None,
        **report.to_dict(),
    })  # fmt: skip
    log.info(
        "gate: %s v%s vs champion v%s on %s %s",
        report.verdict, challenger_version, champion, "+".join(splits), report.reasons(),
    )  # fmt: skip
    return report
