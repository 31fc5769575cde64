"""evaluate stage: accuracy, macro-F1, per-class metrics and confusion matrices.

Scored on the pipeline's own test split and, reported separately, on the fixed benchmark
set when one is configured. Writes JSON for ``dvc metrics`` and CSV/PNG for ``dvc plots``.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tasks.common import PipelineError, Workspace, run_cli, write_json
from tasks.config import PipelineConfig, load_params
from tasks.metrics import compute_metrics
from tasks.model import load_model, predict_logits
from tasks.prepare import BENCHMARK
from tasks.train import load_split, resolve_device

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- IO


def write_predictions(path: Path, y_true: np.ndarray, y_pred: np.ndarray, classes: tuple[str, ...]) -> None:
    """actual,predicted per image, in the split's stored order (dvc plots' confusion template)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["actual", "predicted"])
        writer.writerows((classes[t], classes[p]) for t, p in zip(y_true, y_pred, strict=True))


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


def run_evaluate(cfg: PipelineConfig, ws: Workspace) -> EvaluateResult:
    if not (ws.models / "model.json").is_file():
        raise PipelineError(f"no trained model in {ws.models}; run the train stage first")
    model, spec = load_model(ws.models)
    if spec.classes != cfg.classes:
        raise PipelineError(f"model classes {list(spec.classes)} differ from params classes {list(cfg.classes)}")
    device = resolve_device(cfg.train.device)
    model.to(device)
    splits = ["test"] + ([BENCHMARK] if cfg.evaluate.benchmark else [])
    headline: dict[str, dict[str, float]] = {}
    per_class: dict[str, dict] = {}
    for split in splits:
        images, labels = load_split(ws.prepared, split)
        if len(labels) == 0:
            log.info("%s: no images, skipped", split)
            continue
        logits = predict_logits(model, images, cfg.evaluate.batch_size, device)
        preds = torch.from_numpy(logits).argmax(1).numpy()
        metrics = compute_metrics(labels, preds, cfg.classes)
        headline[split] = {k: metrics[k] for k in ("accuracy", "macro_f1", "n")}
        per_class[split] = {"per_class": metrics["per_class"], "confusion_matrix": metrics["confusion_matrix"]}
        write_predictions(ws.evaluation / f"confusion_{split}.csv", labels, preds, cfg.classes)
        plot_confusion(ws.evaluation / f"confusion_{split}.png", metrics["confusion_matrix"], cfg.classes, split)
        log.info("%s: accuracy %.4f macro-F1 %.4f (n=%d)", split, metrics["accuracy"], metrics["macro_f1"], len(labels))
    write_json(ws.reports / "metrics.json", headline)
    write_json(ws.evaluation / "per_class.json", per_class)
    return EvaluateResult(headline)


def main() -> None:
    ws = Workspace(Path.cwd())
    run_cli("evaluate", lambda: run_evaluate(load_params(ws.params), ws))


if __name__ == "__main__":
    main()
