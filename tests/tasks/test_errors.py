"""Error analysis (tasks/model/errors.py): the most confident mistakes and the per-class table."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import classification_report

from tasks.common.metrics import compute_metrics
from tasks.model.errors import (
    MISTAKE_COLUMNS,
    caption,
    confident_mistakes,
    mistake_rows,
    mistakes_table,
    per_class_rows,
    source_paths,
    write_error_analysis,
)
from tasks.model.predictions import Predictions, read_predictions, write_predictions

CLASSES = ("cat", "dog", "fox")
Y_TRUE = np.array([0, 0, 1, 1, 2, 2, 0, 1])
# Predicted class first; rows 1, 3, 4 and 7 are wrong, with confidences 0.6, 0.9, 0.8, 0.9.
PROBS = np.array([
    [0.9, 0.05, 0.05],
    [0.3, 0.6, 0.1],
    [0.1, 0.8, 0.1],
    [0.05, 0.05, 0.9],
    [0.8, 0.1, 0.1],
    [0.2, 0.1, 0.7],
    [0.5, 0.3, 0.2],
    [0.9, 0.05, 0.05],
])  # fmt: skip


def ids(n: int) -> list[dict[str, str]]:
    return [{"sha256": f"{i:064x}", "batch_id": f"batch-{i % 2}", "path": f"img/{i:03d}.png"} for i in range(n)]


@pytest.fixture
def predictions(tmp_path: Path) -> Predictions:
    """Through the predictions file, as the evaluate stage does."""
    path = tmp_path / "predictions_test.csv"
    write_predictions(path, ids(len(Y_TRUE)), Y_TRUE, np.log(PROBS), CLASSES)
    return read_predictions(path, CLASSES)


def test_mistakes_are_only_wrong_predictions_most_confident_first(predictions: Predictions) -> None:
    # 3 and 7 tie at 0.9: array order.
    assert confident_mistakes(predictions, 10).tolist() == [3, 7, 4, 1]
    assert confident_mistakes(predictions, 2).tolist() == [3, 7]
    assert confident_mistakes(predictions, 0).tolist() == []


def test_no_mistakes_gives_none(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    write_predictions(path, ids(3), np.array([0, 1, 2]), np.eye(3) * 5, CLASSES)

    assert confident_mistakes(read_predictions(path, CLASSES), 5).size == 0


def test_mistake_rows_trace_to_file_batch_and_landing_name(predictions: Predictions) -> None:
    rows = mistake_rows(predictions, [3, 1], {("batch-1", "img/003.png"): "shots/three.png"})

    assert rows == [
        {"sha256": f"{3:064x}", "batch_id": "batch-1", "path": "img/003.png", "source_path": "shots/three.png",
         "actual": "dog", "predicted": "fox", "confidence": pytest.approx(0.9)},
        {"sha256": f"{1:064x}", "batch_id": "batch-1", "path": "img/001.png", "source_path": "img/001.png",
         "actual": "cat", "predicted": "dog", "confidence": pytest.approx(0.6)},
    ]  # fmt: skip


def test_source_paths_come_from_the_manifest_table(tmp_path: Path) -> None:
    table = tmp_path / "manifest.csv"
    table.write_text("path,source_path,label,batch_id\nimages/ab.png,cats/tom.png,cat,b1\nx.png,x.png,dog,benchmark\n")

    assert source_paths(table) == {("b1", "images/ab.png"): "cats/tom.png", ("benchmark", "x.png"): "x.png"}
    assert source_paths(tmp_path / "missing.csv") == {}


def test_per_class_rows_match_sklearn_classification_report() -> None:
    y_pred = PROBS.argmax(1)
    report = classification_report(Y_TRUE, y_pred, labels=[0, 1, 2], target_names=CLASSES, output_dict=True)

    rows = per_class_rows(compute_metrics(Y_TRUE, y_pred, CLASSES)["per_class"])

    assert [r["class"] for r in rows] == list(CLASSES)
    for row in rows:
        expected = report[row["class"]]
        assert row["precision"] == pytest.approx(expected["precision"])
        assert row["recall"] == pytest.approx(expected["recall"])
        assert row["f1"] == pytest.approx(expected["f1-score"])
        assert row["support"] == expected["support"]


def test_caption_names_classes_confidence_and_a_shortened_path() -> None:
    row = {"batch_id": "fmnist-001", "path": "images/0a1b.png", "source_path": "deep/folder/names/img_00042.png",
           "actual": "shirt", "predicted": "t-shirt", "confidence": 0.974}  # fmt: skip

    lines = caption(row).split("\n")

    assert lines[:2] == ["true shirt", "pred t-shirt 0.97"]
    assert lines[2].startswith("…") and lines[2].endswith("names/img_00042.png") and len(lines[2]) == 28
    assert caption({**row, "source_path": "a.png"}).endswith("\nfmnist-001/a.png")


def test_write_error_analysis_writes_the_csvs_and_the_grid(tmp_path: Path, predictions: Predictions) -> None:
    images = np.stack([np.full((8, 8, 3), 10 * i, dtype=np.uint8) for i in range(len(Y_TRUE))])
    out = tmp_path / "evaluation"

    rows = write_error_analysis(
        out, "test", predictions, images, compute_metrics(Y_TRUE, PROBS.argmax(1), CLASSES)["per_class"], 3
    )

    with (out / "mistakes_test.csv").open(newline="") as fh:
        written = list(csv.DictReader(fh))
    assert list(written[0]) == list(MISTAKE_COLUMNS)
    assert [r["path"] for r in written] == ["img/003.png", "img/007.png", "img/004.png"] == [r["path"] for r in rows]
    with (out / "per_class_test.csv").open(newline="") as fh:
        per_class = list(csv.DictReader(fh))
    assert [r["class"] for r in per_class] == list(CLASSES) and list(per_class[0]) == [
        "class", "precision", "recall", "f1", "support"
    ]  # fmt: skip
    with Image.open(out / "mistakes_test.png") as png:
        assert png.format == "PNG" and png.width > 100
    table = mistakes_table(out, "test")
    assert table[0] == {"batch": "batch-1", "source_path": "img/003.png", "true": "dog", "predicted": "fox",
                        "confidence": 0.9, "path": "img/003.png"}  # fmt: skip
    assert list(table[0]) == ["batch", "source_path", "true", "predicted", "confidence", "path"]  # column order


def test_write_error_analysis_refuses_images_of_another_length(tmp_path: Path, predictions: Predictions) -> None:
    with pytest.raises(ValueError, match="3 images but 8 predictions for test"):
        write_error_analysis(tmp_path, "test", predictions, np.zeros((3, 8, 8, 3), np.uint8), {}, 5)


def test_no_mistakes_file_gives_an_empty_table(tmp_path: Path) -> None:
    assert mistakes_table(tmp_path, "benchmark") == []
