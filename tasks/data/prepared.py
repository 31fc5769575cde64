"""The prepared-data format, defined once: what prepare writes and train, evaluate and the gate read.

``data/prepared/`` holds, per split (train, val, test, benchmark), ``<split>_images.npy``
(N, S, S, 3 uint8, memory-mappable) and ``<split>_labels.npy`` (int64 class indices), plus
``index.csv``: one row per image, in array order, naming its sha256, split, label, batch and
path. Imports only numpy and the standard library, like the training core that reads it.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from tasks.common.errors import PipelineError

INDEX_FILE = "index.csv"
INDEX_COLUMNS = ("sha256", "split", "label", "batch_id", "path")
CLASSES_FILE = "classes.json"
SUMMARY_FILE = "summary.json"


def images_path(prepared: Path, split: str) -> Path:
    return prepared / f"{split}_images.npy"


def labels_path(prepared: Path, split: str) -> Path:
    return prepared / f"{split}_labels.npy"


def load_split(prepared: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A split's images (memory-mapped) and labels."""
    images = images_path(prepared, split)
    if not images.is_file():
        raise PipelineError(f"missing {images}; run the prepare stage first")
    return np.load(images, mmap_mode="r"), np.load(labels_path(prepared, split))


def image_shape(prepared: Path, split: str = "test") -> tuple[int, int, int]:
    """The stored (S, S, 3) shape of one image."""
    return tuple(np.load(images_path(prepared, split), mmap_mode="r").shape[1:])


def write_index(prepared: Path, rows: Iterable[Iterable[str]]) -> None:
    with (prepared / INDEX_FILE).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(INDEX_COLUMNS)
        writer.writerows(rows)


def read_index(prepared: Path) -> dict[str, list[dict[str, str]]]:
    """Index rows per split, in the row order of the split arrays (prepare writes both in one pass)."""
    path = prepared / INDEX_FILE
    if not path.is_file():
        raise PipelineError(f"missing {path}; run the prepare stage first")
    rows: dict[str, list[dict[str, str]]] = {}
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            rows.setdefault(row["split"], []).append(row)
    return rows


def read_split_hashes(prepared: Path) -> dict[str, list[str]]:
    """Image sha256s per split, in array order."""
    return {split: [r["sha256"] for r in rows] for split, rows in read_index(prepared).items()}
