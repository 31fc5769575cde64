"""The predictions file, defined once: evaluate writes one per split, the gate (and error
analysis) read it.

``reports/evaluation/predictions_<split>.csv`` has one row per image, in the split's array
order: ``sha256, batch_id, path, actual, predicted, confidence`` and one ``p:<class>``
probability column per class. ``actual``/``predicted`` are class names, so `dvc plots`'
confusion template reads the file directly.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.common.errors import PipelineError

ID_COLUMNS = ("sha256", "batch_id", "path")
PROB_PREFIX = "p:"


@dataclass(frozen=True)
class Predictions:
    """One split's predictions: ids per image, true and predicted class indices, probabilities."""

    ids: list[dict[str, str]]
    y_true: np.ndarray
    y_pred: np.ndarray
    probabilities: np.ndarray  # (N, n_classes)
    classes: tuple[str, ...]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def write_predictions(
    path: Path, ids: Sequence[dict[str, str]], y_true: np.ndarray, logits: np.ndarray, classes: Sequence[str]
) -> None:
    if not len(ids) == len(y_true) == len(logits):
        raise ValueError(f"lengths differ: ids {len(ids)}, labels {len(y_true)}, logits {len(logits)}")
    probs = softmax(logits.astype(np.float64))
    pred = probs.argmax(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([*ID_COLUMNS, "actual", "predicted", "confidence", *(PROB_PREFIX + c for c in classes)])
        for row, true, guess, p in zip(ids, y_true, pred, probs, strict=True):
            writer.writerow([
                *(row[c] for c in ID_COLUMNS), classes[true], classes[guess], f"{p[guess]:.6f}",
                *(f"{v:.6f}" for v in p),
            ])  # fmt: skip


def read_predictions(path: Path, classes: Sequence[str]) -> Predictions:
    """Predictions for ``classes`` (in that order); refuses a file written for another label set."""
    if not path.is_file():
        raise PipelineError(f"missing {path}; run the evaluate stage first")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = [c.removeprefix(PROB_PREFIX) for c in reader.fieldnames or () if c.startswith(PROB_PREFIX)]
        if tuple(columns) != tuple(classes):
            raise PipelineError(f"{path} has classes {columns}, expected {list(classes)}; run evaluate again")
        rows = list(reader)
    index = {c: i for i, c in enumerate(classes)}
    return Predictions(
        ids=[{c: r[c] for c in ID_COLUMNS} for r in rows],
        y_true=np.array([index[r["actual"]] for r in rows], dtype=np.int64),
        y_pred=np.array([index[r["predicted"]] for r in rows], dtype=np.int64),
        probabilities=np.array([[float(r[PROB_PREFIX + c]) for c in classes] for r in rows]).reshape(-1, len(classes)),
        classes=tuple(classes),
    )
