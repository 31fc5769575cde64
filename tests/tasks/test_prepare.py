from __future__ import annotations

import csv
import random
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.common.config import PipelineConfig, PrepareConfig
from tasks.common.errors import PipelineError
from tasks.common.files import read_json, sha256_file
from tasks.common.workspace import Workspace
from tasks.data.benchmark import benchmark_rows
from tasks.data.images import decode_image
from tasks.data.manifest import MANIFEST_COLUMNS, MANIFEST_NAME
from tasks.data.splits import SPLITS, assign_split, split_rows
from tasks.prepare import run_prepare


def random_hashes(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.getrandbits(256):064x}" for _ in range(n)]


def rows_for(hashes: list[str], batch: str = "b1") -> list[dict[str, str]]:
    return [{"sha256": h, "label": "a", "batch_id": batch, "path": f"images/{h}.png"} for h in hashes]


# ---------------------------------------------------------------- assign_split


def test_assign_split_is_deterministic() -> None:
    for sha in random_hashes(200):
        assert assign_split(sha, 0.1, 0.2) == assign_split(sha, 0.1, 0.2)
        assert assign_split(sha, 0.1, 0.2, "s") == assign_split(sha, 0.1, 0.2, "s")


def test_assign_split_uses_the_leading_bits_of_the_hash() -> None:
    assert assign_split("0" * 64, 0.1, 0.1) == "test"
    assert assign_split("f" * 64, 0.1, 0.1) == "train"
    # u = 0.15: past test (0.1), inside val (0.1 + 0.1).
    assert assign_split(f"{int(0.15 * 2**64):016x}" + "0" * 48, 0.1, 0.1) == "val"


@pytest.mark.parametrize(("val", "test", "salt"), [(0.1, 0.1, ""), (0.15, 0.25, ""), (0.2, 0.05, "v2"), (0.0, 0.3, "")])
def test_assign_split_proportions_match_the_fractions(val: float, test: float, salt: str) -> None:
    hashes = random_hashes(20000, seed=1)

    counts = Counter(assign_split(h, val, test, salt) for h in hashes)

    assert abs(counts["val"] / len(hashes) - val) < 0.01
    assert abs(counts["test"] / len(hashes) - test) < 0.01
    assert abs(counts["train"] / len(hashes) - (1 - val - test)) < 0.01
    if val == 0:
        assert counts["val"] == 0


def test_salt_reshuffles_the_assignment() -> None:
    hashes = random_hashes(2000, seed=2)

    plain = [assign_split(h, 0.2, 0.2) for h in hashes]
    salted = [assign_split(h, 0.2, 0.2, "other") for h in hashes]
    salted_again = [assign_split(h, 0.2, 0.2, "another") for h in hashes]

    # Independent assignments with fractions .2/.2/.6 differ for 1 - (.04 + .04 + .36) = 56%.
    assert 0.45 < sum(a != b for a, b in zip(plain, salted, strict=True)) / len(hashes) < 0.67
    assert salted != salted_again


# ---------------------------------------------------------------- split_rows


def test_split_rows_keeps_the_first_of_identical_images() -> None:
    hashes = random_hashes(50, seed=3)
    rows = rows_for(hashes, "b1") + rows_for(hashes[:10], "b2")

    splits = split_rows(rows, PrepareConfig())

    kept = [r for members in splits.values() for r in members]
    assert len(kept) == 50
    assert sorted(r["sha256"] for r in kept) == sorted(hashes)
    assert all(r["batch_id"] == "b1" for r in kept)


def test_split_rows_puts_each_image_in_the_split_its_hash_picks() -> None:
    cfg = PrepareConfig(val_fraction=0.2, test_fraction=0.3, split_salt="x")
    splits = split_rows(rows_for(random_hashes(300, seed=4)), cfg)

    assert list(splits) == list(SPLITS)
    for split, members in splits.items():
        assert [r["sha256"] for r in members] == sorted(r["sha256"] for r in members)
        assert all(assign_split(r["sha256"], 0.2, 0.3, "x") == split for r in members)
    assert all(splits[s] for s in SPLITS)


def test_split_rows_is_stable_when_new_batches_arrive() -> None:
    old = rows_for(random_hashes(500, seed=5), "b1")
    new = rows_for(random_hashes(300, seed=6), "b2")
    # A later batch re-delivering some old images with another batch id must not move them.
    redelivered = [{**r, "batch_id": "b3"} for r in old[:40]]

    def where(splits: dict[str, list[dict[str, str]]]) -> dict[str, str]:
        return {r["sha256"]: split for split, members in splits.items() for r in members}

    before = where(split_rows(old, PrepareConfig()))
    after = where(split_rows(old + new + redelivered, PrepareConfig()))

    assert len(after) == 800
    assert {sha: after[sha] for sha in before} == before


@pytest.mark.parametrize(("val", "test"), [(0.5, 0.5), (0.3, 0.8), (0.6, 0.4)])
def test_fractions_that_leave_no_training_data_fail_at_load(
    val: float, test: float, make_cfg: Callable[..., PipelineConfig]
) -> None:
    # Checked when params.yaml is read, before any stage runs, in one line naming the keys.
    with pytest.raises(PipelineError, match=re.escape("'prepare': val_fraction + test_fraction must be < 1")) as info:
        make_cfg(prepare={"val_fraction": val, "test_fraction": test})
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- decode_image


def test_decode_image_turns_grey_into_rgb_uint8_at_the_requested_size(tmp_path: Path) -> None:
    path = tmp_path / "g.png"
    Image.fromarray(np.arange(100, dtype=np.uint8).reshape(10, 10), mode="L").save(path)

    out = decode_image(path, 16)

    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    assert out[0, 0, 0] < out[-1, -1, 0]  # the gradient survives the resize


def test_decode_image_keeps_pixels_at_native_size(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (12, 12), dtype=np.uint8)
    path = tmp_path / "g.png"
    Image.fromarray(pixels, mode="L").save(path)

    out = decode_image(path, 12)

    assert np.array_equal(out, np.repeat(pixels[..., None], 3, axis=2))


@pytest.mark.parametrize("mode", ["RGBA", "P", "RGB"])
def test_decode_image_converts_other_modes(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "x.png"
    Image.new(mode, (5, 9)).save(path)

    assert decode_image(path, 7).shape == (7, 7, 3)


# ---------------------------------------------------------------- benchmark and run_prepare


def test_benchmark_rows_absent_or_empty(tmp_path: Path, make_cfg: Callable[..., PipelineConfig]) -> None:
    assert benchmark_rows(tmp_path / "benchmark", make_cfg()) == []
    (tmp_path / "benchmark").mkdir()
    assert benchmark_rows(tmp_path / "benchmark", make_cfg()) == []


def test_benchmark_rows_rejects_unknown_labels(
    tmp_path: Path, write_png: Callable[..., Path], make_cfg: Callable[..., PipelineConfig]
) -> None:
    write_png(tmp_path / "benchmark" / "a" / "1.png")
    write_png(tmp_path / "benchmark" / "dog" / "2.png", seed=1)

    with pytest.raises(PipelineError, match=r"labels outside 'classes': \['dog'\]; allowed: a, b"):
        benchmark_rows(tmp_path / "benchmark", make_cfg())


def test_run_prepare_writes_arrays_an_index_and_a_summary(
    tmp_path: Path, write_png: Callable[..., Path], make_cfg: Callable[..., PipelineConfig]
) -> None:
    ws = Workspace(tmp_path)
    cfg = make_cfg(prepare={"image_size": 10, "val_fraction": 0.25, "test_fraction": 0.25})
    batch = ws.raw / "b1"
    batch.mkdir(parents=True)
    manifest = []
    for i in range(24):
        path = write_png(batch / "images" / f"{i}.png", size=(8, 8), seed=i)
        sha = sha256_file(path)
        manifest.append(["images/" + path.name, f"{i}.png", "ab"[i % 2], sha, sha, 8, 8, "RGB", 3, 1, "PNG", "b1"])
    manifest.append(list(manifest[0]))  # a duplicate row
    with (batch / MANIFEST_NAME).open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([MANIFEST_COLUMNS, *manifest])
    write_png(ws.benchmark / "b" / "x.png", size=(20, 20), seed=99)

    result = run_prepare(cfg, ws)

    assert sum(result.counts[s] for s in SPLITS) == 24
    assert result.counts["benchmark"] == 1
    with (ws.prepared / "index.csv").open(newline="", encoding="utf-8") as fh:
        index = list(csv.DictReader(fh))
    bench = [r for r in index if r["split"] == "benchmark"]
    assert len(index) == 24 + 1
    assert bench == [{"sha256": sha256_file(ws.benchmark / "b" / "x.png"), "split": "benchmark", "label": "b",
                      "batch_id": "benchmark", "path": "b/x.png"}]  # fmt: skip
    label_of = {row[3]: row[2] for row in manifest}
    for split in SPLITS:
        images = np.load(ws.prepared / f"{split}_images.npy")
        labels = np.load(ws.prepared / f"{split}_labels.npy")
        members = [r for r in index if r["split"] == split]
        assert images.shape == (len(members), 10, 10, 3) and images.dtype == np.uint8
        assert labels.tolist() == [cfg.classes.index(label_of[r["sha256"]]) for r in members]
        for image, row in zip(images, members, strict=True):
            assert np.array_equal(image, decode_image(ws.raw / row["batch_id"] / row["path"], 10))
    assert np.load(ws.prepared / "benchmark_labels.npy").tolist() == [1]
    assert read_json(ws.prepared / "classes.json") == ["a", "b"]
    assert read_json(ws.prepared / "summary.json")["image_size"] == 10


def test_run_prepare_without_data(tmp_path: Path, make_cfg: Callable[..., PipelineConfig]) -> None:
    with pytest.raises(PipelineError, match="no ingested data"):
        run_prepare(make_cfg(), Workspace(tmp_path))
