"""The embedded demo data: Fashion-MNIST delivered to the landing zone as labelled PNG batches.

The IDX files come from the Debian package ``dataset-fashion-mnist`` (no internet needed),
or from torchvision's downloader for users with internet. The official 10,000-image test
set becomes the fixed benchmark set in ``data/benchmark``, scored separately from the
pipeline's own split.
"""

from __future__ import annotations

import csv
import gzip
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.common.errors import PipelineError

log = logging.getLogger(__name__)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Class names in label order, spelled to be valid folder names.
CLASSES = (
    "tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)  # fmt: skip
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
HOW_TO_GET = (
    "Fashion-MNIST not found. As root: `apt-get install dataset-fashion-mnist` (installs it under "
    f"{DEBIAN_DIR}); or, with internet, run `uv run python -m tasks.data.fashion_mnist --download`."
)


def parse_idx(raw: bytes) -> np.ndarray:
    """Decode an IDX file (the MNIST family's format): magic, dims, then uint8 data."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise PipelineError("not an unsigned-byte IDX file")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise PipelineError(f"truncated IDX header: {ndim} dimensions announced, {len(raw)} bytes in all")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise PipelineError(f"IDX payload has {data.size} bytes, header says {dims}")
    return data.reshape(dims)


def find_source(cache: Path) -> Path:
    for candidate in (DEBIAN_DIR, cache / "FashionMNIST" / "raw"):
        if all((candidate / name).is_file() for pair in FILES.values() for name in pair):
            return candidate
    raise PipelineError(HOW_TO_GET)


def load_split(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = FILES[split]
    images = parse_idx(gzip.decompress((source / images_file).read_bytes()))
    labels = parse_idx(gzip.decompress((source / labels_file).read_bytes()))
    return images, labels


def write_labeled_dir(target: Path, images: np.ndarray, labels: np.ndarray, prefix: str) -> None:
    """PNG files plus labels.csv, written under a hidden name then renamed into place, so a
    watcher never sees a half-written batch."""
    if target.exists():
        if any(target.iterdir()):
            return
        target.rmdir()  # an empty placeholder (DVC needs data/benchmark to exist)
    staging = target.parent / f".{target.name}.writing"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "images").mkdir(parents=True)
    with (staging / "labels.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            rel = f"images/{prefix}-{i:05d}.png"
            Image.fromarray(image, mode="L").save(staging / rel, optimize=False, compress_level=1)
            writer.writerow([rel, CLASSES[int(label)]])
    os.replace(staging, target)
    log.info("wrote %d images to %s", len(labels), target)


def batch_ranges(first: int, size: int, total: int) -> list[tuple[int, int]]:
    """Index ranges of the demo's landing batches: one big first batch, then smaller ones."""
    ranges = [(0, min(first, total))]
    start = first
    while start < total:
        ranges.append((start, min(start + size, total)))
        start += size
    return ranges


def batch_name(number: int) -> str:
    return f"fmnist-{number:03d}"


def deliver_batch(landing: Path, source: Path, number: int, first: int, size: int) -> Path:
    """Write the demo's ``number``-th landing batch (1-based); a no-op when it exists."""
    images, labels = load_split(source, "train")
    ranges = batch_ranges(first, size, len(labels))
    if not 1 <= number <= len(ranges):
        raise PipelineError(f"batch number {number} out of range; the demo has batches 1..{len(ranges)}")
    lo, hi = ranges[number - 1]
    target = landing / batch_name(number)
    landing.mkdir(parents=True, exist_ok=True)
    write_labeled_dir(target, images[lo:hi], labels[lo:hi], f"train{lo:05d}")
    return target


def write_benchmark(benchmark: Path, source: Path) -> None:
    images, labels = load_split(source, "test")
    benchmark.parent.mkdir(parents=True, exist_ok=True)
    write_labeled_dir(benchmark, images, labels, "test")


def download(cache: Path) -> None:
    from torchvision.datasets import FashionMNIST

    for train in (True, False):
        FashionMNIST(str(cache), train=train, download=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--download", action="store_true", help="download with torchvision into .cache/")
    args = parser.parse_args()
    if args.download:
        download(Path(".cache"))
    print(find_source(Path(".cache")))
