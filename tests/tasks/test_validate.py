from __future__ import annotations

import csv
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from tasks.common import PipelineError, Workspace, read_json, sha256_file
from tasks.config import PipelineConfig
from tasks.validate import (
    MANIFEST_COLUMNS,
    MANIFEST_NAME,
    MAX_LISTED,
    ImageProblem,
    check_dataset,
    find_label_conflicts,
    inspect_image,
    read_all_manifests,
    run_validate,
    summarise_problems,
    unknown_label_problem,
)

# ---------------------------------------------------------------- inspect_image


def test_inspect_image_reads_a_good_png(tmp_path: Path, write_png: Callable[..., Path]) -> None:
    info = inspect_image(write_png(tmp_path / "x.png", size=(12, 7)), max_side=64)

    assert (info.width, info.height, info.format, info.mode) == (12, 7, "PNG", "RGB")


def test_inspect_image_reports_greyscale_mode(tmp_path: Path, write_png: Callable[..., Path]) -> None:
    info = inspect_image(write_png(tmp_path / "g.png", mode="L"), max_side=64)

    assert info.mode == "L"


def test_inspect_image_catches_a_truncated_png(tmp_path: Path, write_png: Callable[..., Path]) -> None:
    path = write_png(tmp_path / "t.png", size=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(ImageProblem, match="unreadable image"):
        inspect_image(path, max_side=128)


def test_inspect_image_rejects_a_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")

    with pytest.raises(ImageProblem, match="unreadable image"):
        inspect_image(path, max_side=128)


def test_inspect_image_rejects_text_named_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("definitely not pixels\n" * 10)

    with pytest.raises(ImageProblem, match=r"unreadable image \(UnidentifiedImageError"):
        inspect_image(path, max_side=128)


def test_inspect_image_rejects_an_oversize_image(tmp_path: Path, write_png: Callable[..., Path]) -> None:
    path = write_png(tmp_path / "wide.png", size=(20, 10))

    with pytest.raises(ImageProblem, match="20x10 exceeds max_image_side 19"):
        inspect_image(path, max_side=19)
    assert inspect_image(path, max_side=20).width == 20  # the limit itself is allowed


def test_inspect_image_checks_the_taller_side(tmp_path: Path, write_png: Callable[..., Path]) -> None:
    with pytest.raises(ImageProblem, match="3x30 exceeds"):
        inspect_image(write_png(tmp_path / "tall.png", size=(3, 30)), max_side=16)


def test_inspect_image_on_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageProblem, match="missing file"):
        inspect_image(tmp_path / "gone.png", max_side=16)


# ---------------------------------------------------------------- pure checks


def test_unknown_label_problem() -> None:
    assert unknown_label_problem("a", ("a", "b")) is None

    problem = unknown_label_problem("cat", ("a", "b"))

    assert problem is not None
    assert "unknown label 'cat'" in problem
    assert "allowed: a, b" in problem
    assert "params.yaml" in problem


def test_unknown_label_problem_is_case_sensitive() -> None:
    assert unknown_label_problem("A", ("a", "b")) is not None


def test_find_label_conflicts_reports_one_line_per_image() -> None:
    sha_x, sha_y, sha_z = "1" * 64, "2" * 64, "3" * 64
    rows = [
        {"sha256": sha_x, "label": "b"},
        {"sha256": sha_x, "label": "a"},
        {"sha256": sha_x, "label": "a"},
        {"sha256": sha_y, "label": "a"},
        {"sha256": sha_y, "label": "a"},  # a duplicate with the same label is fine
        {"sha256": sha_z, "label": "c"},
    ]

    assert find_label_conflicts(rows) == [f"image {sha_x[:12]} has conflicting labels ['a', 'b']"]


def test_find_label_conflicts_with_none() -> None:
    assert find_label_conflicts([{"sha256": "1" * 64, "label": "a"}]) == []


def test_summarise_problems_lists_a_few_and_counts_the_rest() -> None:
    problems = [f"p{i}" for i in range(MAX_LISTED + 3)]

    message = summarise_problems(problems, "batch 'b1'")

    assert message == f"{MAX_LISTED + 3} problem(s) in batch 'b1': p0; p1; p2; p3; p4 (and 3 more)"
    assert "p5" not in message


def test_summarise_problems_without_truncation() -> None:
    assert summarise_problems(["x", "y"], "data") == "2 problem(s) in data: x; y"
    assert "more" not in summarise_problems([f"p{i}" for i in range(MAX_LISTED)], "data")


# ---------------------------------------------------------------- check_dataset over manifests


def write_raw_batch(raw: Path, batch: str, items: list[tuple[str, str]], write_png: Callable[..., Path]) -> list[dict]:
    """A data/raw/<batch> directory as ingest writes it; ``items`` are (name, label)."""
    rows = []
    for name, label in items:
        path = write_png(raw / batch / "images" / name, seed=zlib.crc32(f"{batch}/{name}".encode()))
        rows.append(
            {
                "path": f"images/{name}",
                "source_path": name,
                "label": label,
                "sha256": sha256_file(path),
                "width": "8",
                "height": "8",
                "batch_id": batch,
            }
        )
    with (raw / batch / MANIFEST_NAME).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def test_check_dataset_passes_clean_data(
    tmp_path: Path, write_png: Callable[..., Path], make_cfg: Callable[..., PipelineConfig]
) -> None:
    write_raw_batch(tmp_path, "b2", [("3.png", "b")], write_png)
    write_raw_batch(tmp_path, "b1", [("1.png", "a"), ("2.png", "b")], write_png)
    rows = read_all_manifests(tmp_path)

    problems, counts = check_dataset(rows, tmp_path, make_cfg())

    assert [r["batch_id"] for r in rows] == ["b1", "b1", "b2"]
    assert problems == []
    assert counts == {"a": 1, "b": 2}


def test_check_dataset_finds_each_kind_of_problem(
    tmp_path: Path, write_png: Callable[..., Path], make_cfg: Callable[..., PipelineConfig]
) -> None:
    cfg = make_cfg(classes=("a", "b", "c"))
    rows = write_raw_batch(tmp_path, "b1", [("1.png", "a"), ("2.png", "a"), ("3.png", "a"), ("4.png", "z")], write_png)
    write_png(tmp_path / "b1" / "images" / "1.png", seed=777)  # edited after ingest
    (tmp_path / "b1" / "images" / "2.png").unlink()
    rows.append({**rows[2], "label": "b", "source_path": "copy-of-3.png"})

    problems, counts = check_dataset(rows, tmp_path, cfg)

    assert problems == [
        "b1/1.png: content changed since ingest (sha256 mismatch)",
        "b1/2.png: missing file",
        f"b1/4.png: {unknown_label_problem('z', cfg.classes)}",
        f"image {rows[2]['sha256'][:12]} has conflicting labels ['a', 'b']",
        "class 'c' has 0 image(s), below min_images_per_class 1",
    ]
    assert counts["a"] == 3 and counts["z"] == 1


def test_check_dataset_can_skip_hash_verification(
    tmp_path: Path, write_png: Callable[..., Path], make_cfg: Callable[..., PipelineConfig]
) -> None:
    rows = write_raw_batch(tmp_path, "b1", [("1.png", "a"), ("2.png", "b")], write_png)
    write_png(tmp_path / "b1" / "images" / "1.png", seed=777)

    assert check_dataset(rows, tmp_path, make_cfg(), verify_hashes=False)[0] == []
    assert len(check_dataset(rows, tmp_path, make_cfg(), verify_hashes=True)[0]) == 1


def test_check_dataset_enforces_min_images_per_class(
    tmp_path: Path, write_png: Callable[..., Path], make_cfg: Callable[..., PipelineConfig]
) -> None:
    rows = write_raw_batch(tmp_path, "b1", [("1.png", "a"), ("2.png", "a"), ("3.png", "b")], write_png)

    problems, _ = check_dataset(rows, tmp_path, make_cfg(validate={"min_images_per_class": 2}))

    assert problems == ["class 'b' has 1 image(s), below min_images_per_class 2"]


def test_run_validate_writes_a_report(
    tmp_path: Path, write_png: Callable[..., Path], make_cfg: Callable[..., PipelineConfig]
) -> None:
    ws = Workspace(tmp_path)
    write_raw_batch(ws.raw, "b1", [("1.png", "a"), ("2.png", "b"), ("3.png", "b")], write_png)

    result = run_validate(make_cfg(), ws)

    assert (result.n_images, result.n_batches, result.class_counts) == (3, 1, {"a": 1, "b": 2})
    report = read_json(ws.reports / "validate.json")
    assert report["passed"] is True and report["problems"] == [] and report["batches"] == ["b1"]


def test_run_validate_fails_and_still_writes_the_report(
    tmp_path: Path, write_png: Callable[..., Path], make_cfg: Callable[..., PipelineConfig]
) -> None:
    ws = Workspace(tmp_path)
    write_raw_batch(ws.raw, "b1", [("1.png", "a")], write_png)

    with pytest.raises(PipelineError, match="1 problem\\(s\\) in the ingested data: class 'b' has 0"):
        run_validate(make_cfg(), ws)

    report = read_json(ws.reports / "validate.json")
    assert report["passed"] is False
    assert report["class_counts"] == {"a": 1, "b": 0}


def test_run_validate_without_data(tmp_path: Path, make_cfg: Callable[..., PipelineConfig]) -> None:
    with pytest.raises(PipelineError, match="no ingested data"):
        run_validate(make_cfg(), Workspace(tmp_path))
