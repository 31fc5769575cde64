from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.common.errors import PipelineError
from tasks.data.fashion_mnist import (
    CLASSES,
    FILES,
    batch_ranges,
    deliver_batch,
    load_split,
    parse_idx,
    write_labeled_dir,
)
from tasks.data.landing import LabeledFile, read_batch


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_parse_idx_decodes_a_handcrafted_image_file() -> None:
    raw = b"\x00\x00\x08\x03" + b"\x00\x00\x00\x02" + b"\x00\x00\x00\x02" + b"\x00\x00\x00\x03" + bytes(range(12))

    images = parse_idx(raw)

    assert images.shape == (2, 2, 3) and images.dtype == np.uint8
    assert images[0].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert images[1, 1, 2] == 11


def test_parse_idx_decodes_labels() -> None:
    labels = parse_idx(b"\x00\x00\x08\x01\x00\x00\x00\x04" + bytes([9, 0, 3, 255]))

    assert labels.tolist() == [9, 0, 3, 255]


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00\x00\x00\x00",  # float data
        b"\x01\x00\x08\x01\x00\x00\x00\x01\x00",  # non-zero first byte
        b"\x00\x08",  # too short for a magic number
        b"",
    ],
)
def test_parse_idx_rejects_a_bad_magic(raw: bytes) -> None:
    with pytest.raises(PipelineError, match="not an unsigned-byte IDX file"):
        parse_idx(raw)


@pytest.mark.parametrize("payload", [bytes(5), bytes(7)])
def test_parse_idx_rejects_a_payload_that_does_not_fit_the_header(payload: bytes) -> None:
    with pytest.raises(PipelineError, match=r"IDX payload has \d+ bytes, header says \[2, 3\]"):
        parse_idx(b"\x00\x00\x08\x02\x00\x00\x00\x02\x00\x00\x00\x03" + payload)


def test_parse_idx_rejects_a_truncated_header() -> None:
    with pytest.raises(PipelineError):
        parse_idx(b"\x00\x00\x08\x03\x00\x00\x00\x02")  # three dims announced, one given


def test_batch_ranges_one_big_batch_then_small_ones() -> None:
    assert batch_ranges(5, 2, 10) == [(0, 5), (5, 7), (7, 9), (9, 10)]
    assert batch_ranges(4, 3, 10) == [(0, 4), (4, 7), (7, 10)]


def test_batch_ranges_when_everything_fits_the_first_batch() -> None:
    assert batch_ranges(100, 10, 30) == [(0, 30)]
    assert batch_ranges(30, 10, 30) == [(0, 30)]


@pytest.mark.parametrize(("first", "size", "total"), [(50000, 2500, 60000), (7, 3, 100), (1, 1, 5)])
def test_batch_ranges_cover_every_index_once(first: int, size: int, total: int) -> None:
    ranges = batch_ranges(first, size, total)

    covered = [i for lo, hi in ranges for i in range(lo, hi)]
    assert covered == list(range(total))
    assert all(hi - lo <= size for lo, hi in ranges[1:])


def write_source(directory: Path, n_train: int = 10, n_test: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        images_file, labels_file = FILES[split]
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % len(CLASSES)
        (directory / images_file).write_bytes(gzip.compress(idx_bytes(images)))
        (directory / labels_file).write_bytes(gzip.compress(idx_bytes(labels)))
    return directory


def test_load_split_reads_gzipped_idx_files(tmp_path: Path) -> None:
    images, labels = load_split(write_source(tmp_path), "test")

    assert images.shape == (4, 28, 28)
    assert labels.tolist() == [0, 1, 2, 3]


def test_write_labeled_dir_writes_a_batch_ingest_can_read(tmp_path: Path) -> None:
    images = np.random.default_rng(1).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    target = tmp_path / "landing" / "fmnist-001"
    target.parent.mkdir()

    write_labeled_dir(target, images, np.array([0, 9, 3]), "train00000")

    rows, _ = read_batch(target, (".png",))
    assert rows == [
        LabeledFile("images/train00000-00000.png", "tshirt_top"),
        LabeledFile("images/train00000-00001.png", "ankle_boot"),
        LabeledFile("images/train00000-00002.png", "dress"),
    ]
    with Image.open(target / rows[1].path) as img:
        assert img.mode == "L" and np.array_equal(np.asarray(img), images[1])
    assert [p.name for p in target.parent.iterdir()] == ["fmnist-001"]  # no staging dir left


def test_write_labeled_dir_leaves_an_existing_batch_alone(tmp_path: Path) -> None:
    target = tmp_path / "b"
    target.mkdir()
    (target / "keep.txt").write_text("mine")

    write_labeled_dir(target, np.zeros((1, 28, 28), dtype=np.uint8), np.array([0]), "x")

    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_write_labeled_dir_fills_an_empty_placeholder(tmp_path: Path) -> None:
    target = tmp_path / "benchmark"
    target.mkdir()

    write_labeled_dir(target, np.zeros((2, 28, 28), dtype=np.uint8), np.array([1, 2]), "test")

    with (target / "labels.csv").open(newline="") as fh:
        assert [r["label"] for r in csv.DictReader(fh)] == ["trouser", "pullover"]


def test_deliver_batch_writes_the_numbered_slice(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    source = write_source(tmp_path / "src")
    landing = tmp_path / "landing"

    target = deliver_batch(landing, source, number=2, first=4, size=3)

    assert target == landing / "fmnist-002"
    rows, _ = read_batch(target, (".png",))
    assert [r.path for r in rows] == [f"images/train00004-{i:05d}.png" for i in range(3)]
    assert [r.label for r in rows] == [CLASSES[i] for i in (4, 5, 6)]


def test_deliver_batch_out_of_range(tmp_path: Path) -> None:
    source = write_source(tmp_path)

    with pytest.raises(PipelineError, match=r"batch number 4 out of range; the demo has batches 1\.\.3"):
        deliver_batch(tmp_path / "landing", source, number=4, first=4, size=3)
    with pytest.raises(PipelineError, match="batch number 0 out of range"):
        deliver_batch(tmp_path / "landing", source, number=0, first=4, size=3)
