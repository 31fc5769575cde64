"""Error analysis of one scored split, from its predictions file: what people look at.

Per split, in reports/evaluation/: ``mistakes_<split>.csv`` (the most confident wrong
predictions, most confident first, with the sha256, batch and path that trace each one to its
file, and the file's name in its landing batch), ``mistakes_<split>.png`` (their thumbnails
from the prepared arrays, captioned) and ``per_class_<split>.csv`` (precision, recall, F1 and
support per class).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tasks.common.gallery import image_grid
from tasks.data.manifest import read_manifest
from tasks.model.predictions import ID_COLUMNS, Predictions

MISTAKE_COLUMNS = (*ID_COLUMNS, "source_path", "actual", "predicted", "confidence")
PER_CLASS_COLUMNS = ("class", "precision", "recall", "f1", "support")
#: Longest path shown under a thumbnail (the start is cut: file names differ at the end).
CAPTION_PATH_CHARS = 28


def mistakes_csv(evaluation: Path, split: str) -> Path:
    return evaluation / f"mistakes_{split}.csv"


def mistakes_png(evaluation: Path, split: str) -> Path:
    return evaluation / f"mistakes_{split}.png"


def per_class_csv(evaluation: Path, split: str) -> Path:
    return evaluation / f"per_class_{split}.csv"


def confident_mistakes(predictions: Predictions, limit: int) -> np.ndarray:
    """Array positions of up to ``limit`` wrong predictions, most confident first (ties in array order)."""
    wrong = np.flatnonzero(predictions.y_true != predictions.y_pred)
    confidence = predictions.probabilities[wrong, predictions.y_pred[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")][:limit]


def source_paths(manifest_table: Path) -> dict[tuple[str, str], str]:
    """(batch id, stored path) -> the file's name in its landing batch, from the validate stage's
    manifest table; empty when there is none."""
    if not manifest_table.is_file():
        return {}
    return {(r["batch_id"], r["path"]): r["source_path"] for r in read_manifest(manifest_table)}


def mistake_rows(
    predictions: Predictions, positions: Sequence[int], sources: dict[tuple[str, str], str] | None = None
) -> list[dict[str, str | float]]:
    """One row per mistake: the image's ids, its landing name (``sources``; else its stored path),
    true and predicted class, confidence."""
    classes, sources, rows = predictions.classes, sources or {}, []
    for i in positions:
        ids, guess = predictions.ids[i], predictions.y_pred[i]
        rows.append({
            **ids,
            "source_path": sources.get((ids["batch_id"], ids["path"]), ids["path"]),
            "actual": classes[predictions.y_true[i]],
            "predicted": classes[guess],
            "confidence": round(float(predictions.probabilities[i, guess]), 6),
        })  # fmt: skip
    return rows


def per_class_rows(per_class: dict[str, dict[str, float]]) -> list[dict[str, str | float]]:
    """``compute_metrics``' per-class numbers as table rows, in class order."""
    return [{"class": cls, **{k: row[k] for k in PER_CLASS_COLUMNS[1:]}} for cls, row in per_class.items()]


def caption(row: dict[str, str | float]) -> str:
    where = f"{row['batch_id']}/{row['source_path']}"
    if len(where) > CAPTION_PATH_CHARS:
        where = "…" + where[-(CAPTION_PATH_CHARS - 1) :]
    return f"true {row['actual']}\npred {row['predicted']} {row['confidence']:.2f}\n{where}"


def write_rows(path: Path, columns: Sequence[str], rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def mistakes_table(evaluation: Path, split: str) -> list[dict[str, str | float]]:
    """The split's mistakes as table rows for people (batch, landing name, true and predicted class,
    confidence, then the long stored path); empty when the split has no mistakes file."""
    path = mistakes_csv(evaluation, split)
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as fh:
        return [
            {"batch": r["batch_id"], "source_path": r["source_path"], "true": r["actual"], "predicted": r["predicted"],
             "confidence": float(r["confidence"]), "path": r["path"]}
            for r in csv.DictReader(fh)
        ]  # fmt: skip


def write_error_analysis(
    evaluation: Path,
    split: str,
    predictions: Predictions,
    images: np.ndarray,
    per_class: dict,
    limit: int,
    sources: dict[tuple[str, str], str] | None = None,
) -> list[dict[str, str | float]]:
    """The split's mistakes CSV and grid and its per-class CSV; returns the mistakes' rows.

    ``images`` are the split's prepared arrays, in the predictions file's row order."""
    if len(images) != len(predictions.y_true):
        raise ValueError(f"{len(images)} images but {len(predictions.y_true)} predictions for {split}")
    positions = confident_mistakes(predictions, limit)
    rows = mistake_rows(predictions, positions, sources)
    write_rows(mistakes_csv(evaluation, split), MISTAKE_COLUMNS, rows)
    wrong = int((predictions.y_true != predictions.y_pred).sum())
    image_grid(
        mistakes_png(evaluation, split),
        [np.asarray(images[i]) for i in positions],
        [caption(r) for r in rows],
        f"{split}: the {len(rows)} most confident of {wrong} mistakes (of {len(predictions.y_true)} images)",
    )
    write_rows(per_class_csv(evaluation, split), PER_CLASS_COLUMNS, per_class_rows(per_class))
    return rows
