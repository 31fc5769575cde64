"""The benchmark's images, written once in the two forms the two sides read.

The reference loop reads PNG files from disk (``images/<i>.png`` plus ``labels.csv``, as the
custom-dataset tutorials do); our training core reads the same pixels as uint8 arrays
(``images.npy`` grey N x 28 x 28, ``labels.npy``), as the prepare stage hands them over.
A split directory is complete when its ``complete.json`` names its count; a killed write is
redone, never reused.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

LABELS_CSV = "labels.csv"
MARKER = "complete.json"


@dataclass(frozen=True)
class BenchData:
    """Where the two splits lie; the same directories serve both sides."""

    train: Path
    test: Path
    train_images: int
    test_images: int


def split_count(directory: Path) -> int:
    """Images in a complete split directory, 0 when it is missing or half-written."""
    marker = directory / MARKER
    if not marker.is_file():
        return 0
    return int(json.loads(marker.read_text(encoding="utf-8"))["images"])


def write_split(directory: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """PNG files + labels.csv for the reference, .npy arrays for us; reused when complete."""
    if images.ndim != 3 or images.dtype != np.uint8 or len(images) != len(labels):
        raise ValueError(f"expected grey uint8 images (N, H, W) and N labels, got {images.shape} {images.dtype}")
    if split_count(directory) == len(labels):
        return directory
    staging = directory.with_name(f".{directory.name}.writing")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "images").mkdir(parents=True)
    with (staging / LABELS_CSV).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            rel = f"images/{i:05d}.png"
            Image.fromarray(image, mode="L").save(staging / rel, compress_level=1)
            writer.writerow([rel, int(label)])
    np.save(staging / "images.npy", images)
    np.save(staging / "labels.npy", labels.astype(np.int64))
    (staging / MARKER).write_text(json.dumps({"images": len(labels)}), encoding="utf-8")
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)
    log.info("wrote %d PNG files and arrays to %s", len(labels), directory)
    return directory


def read_arrays(directory: Path, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``limit`` images of a split as (grey uint8 N x H x W, int64 labels)."""
    images = np.load(directory / "images.npy", mmap_mode="r")[:limit]
    labels = np.load(directory / "labels.npy")[:limit]
    return np.ascontiguousarray(images), labels


def prepare_fmnist(cache: Path, fmnist_cache: Path, train_images: int, test_images: int) -> BenchData:
    """The first ``train_images`` Fashion-MNIST train images and the first ``test_images`` of
    the official test set, under ``cache/png-<N>/``; written on first use only."""
    from tasks.data.fashion_mnist import find_source, load_split

    root = cache / f"png-{train_images}"
    train_dir, test_dir = root / "train", root / "test"
    need_train = split_count(train_dir) != train_images
    need_test = split_count(test_dir) < test_images
    if need_train or need_test:
        source = find_source(fmnist_cache)
        if need_train:
            x, y = load_split(source, "train")
            if train_images > len(y):
                raise ValueError(f"--train-images {train_images} exceeds the {len(y)} Fashion-MNIST train images")
            write_split(train_dir, x[:train_images], y[:train_images])
        if need_test:
            x, y = load_split(source, "test")
            write_split(test_dir, x, y)
    return BenchData(train_dir, test_dir, train_images, min(test_images, split_count(test_dir)))
