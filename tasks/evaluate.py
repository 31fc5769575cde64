"""evaluate stage: accuracy, macro-F1, per-class metrics and confusion matrices.

Scored on the pipeline's own test split and, reported separately, on the fixed benchmark
set when one is configured. Writes JSON for ``dvc metrics``, one predictions file per split
(tasks/model/predictions.py: what the gate reads, and `dvc plots`' confusion matrices), PNGs,
the error analysis per split (tasks/model/errors.py: most confident mistakes, per-class table),
and the cheap baseline's scores on the same splits (tasks/model/baseline.py; the gate's
default floors), in reports/evaluation/baseline.json.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.common.config import PipelineConfig, load_params
from tasks.common.errors import PipelineError
from tasks.common.files import write_json
from tasks.common.metrics import compute_metrics
from tasks.common.stage import run_cli
from tasks.common.workspace import Workspace
from tasks.data.prepared import load_split, read_index
from tasks.data.splits import BENCHMARK
from tasks.model.baseline import MAX_ITER, MAX_TRAIN_ROWS, SIDE, fit_baseline, predict_baseline
from tasks.model.errors import source_paths, write_error_analysis
from tasks.model.network import MODEL_SPEC, load_model, predict_logits
from tasks.model.predictions import read_predictions, write_predictions
from tasks.model.trainer import resolve_device

log = logging.getLogger(__name__)


def plot_confusion(path: Path, matrix: list[list[int]], classes: tuple[str, ...], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(8, 7))
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(classes)).plot(
        ax=ax, xticks_rotation=45, colorbar=False, values_format="d"
    )
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass(frozen=True)
class EvaluateResult:
    metrics: dict[str, dict[str, float]]
    baseline: dict[str, dict[str, float]]


def score_baseline(cfg: PipelineConfig, ws: Workspace, splits: list[str]) -> dict:
    """Fit the cheap baseline on the train split and score it on ``splits``. Deterministic
    (seeded sample, lbfgs), so the file is a reproducible stage output; its time is logged only."""
    start = time.perf_counter()
    images, labels = load_split(ws.prepared, "train")
    baseline = fit_baseline(images, labels)
    scores = {}
    for split in splits:
        images, labels = load_split(ws.prepared, split)
        metrics = compute_metrics(labels, predict_baseline(baseline, images), cfg.classes)
        scores[split] = {k: metrics[k] for k in ("accuracy", "macro_f1", "n")}
    log.info(
        "baseline (%d train rows, %.1f s): %s",
        baseline.train_rows,
        time.perf_counter() - start,
        ", ".join(f"{k} accuracy {v['accuracy']:.4f}" for k, v in scores.items()),
    )
    return {
        "model": f"logistic regression on {SIDE}x{SIDE} grey pixels + channel means, standardised",
        "train_rows": baseline.train_rows,
        "max_train_rows": MAX_TRAIN_ROWS,
        "max_iter": MAX_ITER,
        "converged": baseline.converged,
        "splits": scores,
    }


def run_evaluate(cfg: PipelineConfig, ws: Workspace) -> EvaluateResult:
    if not (ws.models / MODEL_SPEC).is_file():
        raise PipelineError(f"no trained model in {ws.models}; run the train stage first")
    model, spec = load_model(ws.models)
    if spec.classes != cfg.classes:
        raise PipelineError(f"model classes {list(spec.classes)} differ from params classes {list(cfg.classes)}")
    device = resolve_device(cfg.train.device)
    model.to(device)
    splits = ["test"] + ([BENCHMARK] if cfg.evaluate.benchmark else [])
    index, sources = read_index(ws.prepared), source_paths(ws.manifest_table)
    headline: dict[str, dict[str, float]] = {}
    per_class: dict[str, dict] = {}
    for split in splits:
        images, labels = load_split(ws.prepared, split)
        if len(labels) == 0:
            log.info("%s: no images, skipped", split)
            continue
        logits = predict_logits(model, images, cfg.evaluate.batch_size, device)
        preds = logits.argmax(1)
        metrics = compute_metrics(labels, preds, cfg.classes)
        headline[split] = {k: metrics[k] for k in ("accuracy", "macro_f1", "n")}
        per_class[split] = {"per_class": metrics["per_class"], "confusion_matrix": metrics["confusion_matrix"]}
        write_predictions(ws.predictions(split), index.get(split, []), labels, logits, cfg.classes)
        # From the file just written, so each mistake is the predictions file's row for that image.
        predictions = read_predictions(ws.predictions(split), cfg.classes)
        write_error_analysis(
            ws.evaluation, split, predictions, images, metrics["per_class"], cfg.evaluate.mistakes, sources
        )
        plot_confusion(ws.evaluation / f"confusion_{split}.png", metrics["confusion_matrix"], cfg.classes, split)
        log.info("%s: accuracy %.4f macro-F1 %.4f (n=%d)", split, metrics["accuracy"], metrics["macro_f1"], len(labels))
    write_json(ws.metrics, headline)
    write_json(ws.evaluation / "per_class.json", per_class)
    baseline = score_baseline(cfg, ws, list(headline))
    write_json(ws.baseline, baseline)
    return EvaluateResult(headline, baseline["splits"])


def main() -> None:
    ws = Workspace(Path.cwd())
    run_cli("evaluate", lambda: run_evaluate(load_params(ws.params), ws))


if __name__ == "__main__":
    main()
