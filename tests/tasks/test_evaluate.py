from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tasks.common.errors import PipelineError
from tasks.common.metrics import compute_metrics
from tasks.model.predictions import read_predictions, write_predictions

CLASSES = ("a", "b", "c", "d")
# d never occurs: neither as a true label nor as a prediction.
Y_TRUE = np.array([0, 0, 0, 1, 1, 2])
Y_PRED = np.array([0, 0, 1, 1, 2, 2])


@pytest.fixture(scope="module")
def metrics() -> dict:
    return compute_metrics(Y_TRUE, Y_PRED, CLASSES)


def test_accuracy_and_count(metrics: dict) -> None:
    assert metrics["n"] == 6
    assert metrics["accuracy"] == pytest.approx(4 / 6)


def test_per_class_precision_recall_f1_by_hand(metrics: dict) -> None:
    per_class = metrics["per_class"]

    # a: tp 2, fp 0, fn 1. b: tp 1, fp 1, fn 1. c: tp 1, fp 1, fn 0.
    assert per_class["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert per_class["b"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert per_class["c"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})


def test_an_absent_class_scores_zero_not_nan(metrics: dict) -> None:
    assert metrics["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_macro_f1_averages_over_every_configured_class(metrics: dict) -> None:
    assert metrics["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3 + 0.0) / 4)


def test_confusion_matrix_rows_are_true_labels(metrics: dict) -> None:
    assert metrics["confusion_matrix"] == [
        [2, 1, 0, 0],
        [0, 1, 1, 0],
        [0, 0, 1, 0],
        [0, 0, 0, 0],
    ]


def test_a_class_predicted_but_never_true_has_zero_precision() -> None:
    metrics = compute_metrics(np.array([0, 0]), np.array([0, 1]), ("a", "b"))

    assert metrics["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert metrics["per_class"]["a"]["recall"] == 0.5
    assert metrics["confusion_matrix"] == [[1, 1], [0, 0]]


def test_perfect_predictions() -> None:
    y = np.array([0, 1, 2, 1])

    metrics = compute_metrics(y, y, ("a", "b", "c"))

    assert metrics["accuracy"] == 1.0 and metrics["macro_f1"] == 1.0


def test_metrics_are_plain_json_values(metrics: dict) -> None:
    assert json.loads(json.dumps(metrics)) == metrics
    assert type(metrics["accuracy"]) is float
    assert type(metrics["per_class"]["a"]["support"]) is int


def test_predictions_file_round_trips_with_ids_and_probabilities(tmp_path: Path) -> None:
    path = tmp_path / "eval" / "predictions_test.csv"
    ids = [{"sha256": f"{i:064x}", "batch_id": "b1", "path": f"images/{i}.png"} for i in range(len(Y_TRUE))]
    logits = np.eye(len(CLASSES))[Y_PRED] * 4.0  # the predicted class gets the largest logit

    write_predictions(path, ids, Y_TRUE, logits, CLASSES)
    got = read_predictions(path, CLASSES)

    with path.open(newline="") as fh:
        header = next(csv.reader(fh))
    assert header == ["sha256", "batch_id", "path", "actual", "predicted", "confidence", "p:a", "p:b", "p:c", "p:d"]
    assert got.ids == ids
    np.testing.assert_array_equal(got.y_true, Y_TRUE)
    np.testing.assert_array_equal(got.y_pred, Y_PRED)
    np.testing.assert_allclose(got.probabilities.sum(1), 1.0, atol=1e-5)
    assert (got.probabilities.argmax(1) == Y_PRED).all()


def test_predictions_for_another_label_set_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "predictions_test.csv"
    write_predictions(path, [{"sha256": "x", "batch_id": "b", "path": "p"}], np.array([0]), np.zeros((1, 4)), CLASSES)
    with pytest.raises(PipelineError, match=r"has classes \['a', 'b', 'c', 'd'\], expected \['a', 'b'\]"):
        read_predictions(path, ("a", "b"))


def test_score_baseline_scores_each_split_reproducibly(tmp_path: Path) -> None:
    from tasks.common.config import parse_params
    from tasks.common.workspace import Workspace
    from tasks.data.prepared import images_path, labels_path
    from tasks.evaluate import score_baseline

    ws = Workspace(tmp_path)
    ws.prepared.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("test", 20), ("benchmark", 30)):
        labels = np.arange(n) % 2
        images = rng.integers(0, 60, size=(n, 12, 12, 3))
        images[labels == 1, :6] += 150  # class b: bright top half
        np.save(images_path(ws.prepared, split), images.astype(np.uint8))
        np.save(labels_path(ws.prepared, split), labels)
    cfg = parse_params({"classes": ["a", "b"]})

    first = score_baseline(cfg, ws, ["test", "benchmark"])
    again = score_baseline(cfg, ws, ["test", "benchmark"])

    assert first == again  # a DVC output: no timings, no randomness
    assert json.loads(json.dumps(first)) == first
    assert set(first["splits"]) == {"test", "benchmark"}
    assert first["splits"]["benchmark"]["n"] == 30 and first["train_rows"] == 60
    assert first["splits"]["test"]["accuracy"] == 1.0  # trivially separable
