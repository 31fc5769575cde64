"""The benchmark harness: both sides run for one tiny epoch on generated images and report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.data import BenchData, read_arrays, write_split
from bench.run import BenchOptions, parse_overrides, render_markdown, run_benchmark, summarize

REPO = Path(__file__).resolve().parents[2]
EPOCH_KEYS = {"epoch", "images", "train_seconds", "images_per_s", "train_loss", "test_accuracy", "eval_seconds"}
SIDE_KEYS = {"device", "versions", "config", "weights", "epochs", "summary", "peak_rss_mb", "peak_gpu_allocated_mb"}


def make_split(directory: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    return write_split(directory, images, np.arange(n) % 10)


def epoch(number: int, seconds: float, accuracy: float) -> dict:
    return {"epoch": number, "train_seconds": seconds, "images_per_s": 100 / seconds, "test_accuracy": accuracy}


def test_write_split_gives_both_sides_the_same_pixels(tmp_path: Path) -> None:
    from PIL import Image

    split = make_split(tmp_path / "train", 5, seed=0)
    images, labels = read_arrays(split)
    assert np.array_equal(np.asarray(Image.open(split / "images" / "00003.png")), images[3])
    assert (split / "labels.csv").read_text().splitlines()[4] == "images/00003.png,3"
    assert labels.tolist() == [0, 1, 2, 3, 4]


def test_summarize_leaves_out_the_first_epoch_and_times_the_target() -> None:
    result = {"epochs": [epoch(1, 10.0, 0.5), epoch(2, 4.0, 0.86), epoch(3, 6.0, 0.9)]}
    summary = summarize(result, target=0.85)
    assert summary["epoch_seconds"] == 5.0
    assert summary["images_per_s"] == pytest.approx((25 + 100 / 6) / 2, abs=0.01)
    assert summary["time_to_target"] == {"epoch": 2, "train_seconds": 14.0}
    assert summarize(result, target=0.95)["time_to_target"] is None


def test_parse_overrides_reads_json_values_and_nests_dotted_keys() -> None:
    assert parse_overrides(["image_size=96", "strategy=fine_tune", "augment.hflip=false"]) == {
        "image_size": 96, "strategy": "fine_tune", "augment": {"hflip": False},
    }  # fmt: skip


@pytest.mark.integration  # runs the benchmark harness in subprocesses
def test_harness_needs_no_orchestration_stack() -> None:
    """The GPU machine has torch/timm/pydantic but no Prefect, MLflow, DVC or GX."""
    code = (
        "import sys, json; import bench.reference; ref = set(sys.modules); import bench.run, bench.ours; "
        "print(json.dumps([sorted({m.split('.')[0] for m in ref}), sorted({m.split('.')[0] for m in sys.modules})]))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    reference, everything = json.loads(out.stdout.splitlines()[-1])
    assert not {"tasks", "timm", "pydantic"} & set(reference)
    assert not {"prefect", "mlflow", "dvc", "great_expectations", "httpx"} & set(everything)


@pytest.mark.timeout(60)
@pytest.mark.integration  # runs the benchmark harness in subprocesses
def test_both_sides_train_one_epoch_and_report(tmp_path: Path) -> None:
    data = BenchData(make_split(tmp_path / "train", 64, seed=0), make_split(tmp_path / "test", 32, seed=1), 64, 32)
    opts = BenchOptions(
        epochs=1, device="cpu", threads=1, num_workers=1, ref_image_size=32,
        overrides={"weights": "none", "image_size": 32, "batch_size": 32},
    )  # fmt: skip
    results = run_benchmark(data, opts)
    for side in ("reference", "ours"):
        report = results[side]
        assert set(report) >= SIDE_KEYS, side
        assert (report["train_images"], report["test_images"]) == (64, 32)
        [only] = report["epochs"]
        assert set(only) == EPOCH_KEYS
        assert only["images_per_s"] > 0 and only["train_seconds"] > 0
        assert 0 <= only["test_accuracy"] <= 1
        assert report["peak_rss_mb"] > 0
    assert results["reference"]["weights"] == "none (no hub access)"
    assert results["reference"]["config"]["batch_size"] == 32  # follows ours unless set
    assert results["ours_vs_reference"]["images_per_s"] > 0
    assert "| training images/s (epoch 1, warm-up included) |" in render_markdown(results)
