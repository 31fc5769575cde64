"""A generated corpus of bad inputs, one test case each.

Every case lands a batch of good images plus one kind of bad input, runs the real ingest
(git + DVC workspace) and the real validate stage (the GX checkpoint in gx/), and checks:
the specific reason reported, that the good rows were ingested (or, when the whole batch
is rejected, that a good batch landed beside it was), that nothing bad reached data/raw,
that the landing zone is untouched, and that nothing was trained or registered.

Decision on label spelling (documented in README): surrounding whitespace and letter case
are normalised when that names exactly one class; the note says so. Anything else unknown
is quarantined.
"""

from __future__ import annotations

import csv
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tasks.common.config import load_params
from tasks.common.errors import PipelineError
from tasks.common.files import read_json
from tasks.common.workspace import Workspace
from tasks.data.manifest import MANIFEST_NAME, read_all_manifests
from tasks.ingest import IngestResult, run_ingest
from tasks.validate import run_validate
from tests.helpers import TINY_CLASSES, make_images, make_workspace, tiny_params

pytestmark = pytest.mark.integration

GOOD = 12  # good rows per batch, 4 per class


@dataclass
class Landed:
    """A batch under construction: good rows plus whatever a case adds."""

    dir: Path
    rows: list[tuple[str, str]]
    seed: int

    def image(self, name: str, label: str, seed: int | None = None, size: int = 16) -> Path:
        images, _ = make_images(1, seed=self.seed * 1000 + (seed if seed is not None else len(self.rows)), size=size)
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[0]).save(path)
        self.rows.append((name, label))
        return path

    def row(self, name: str, label: str) -> None:
        self.rows.append((name, label))

    def write_labels(self, encoding: str = "utf-8", newline: str = "\n", header=("path", "label")) -> None:
        with (self.dir / "labels.csv").open("w", newline="", encoding=encoding) as fh:
            writer = csv.writer(fh, lineterminator=newline)
            writer.writerow(header)
            writer.writerows(self.rows)


def good_batch(ws: Path, name: str, seed: int) -> Landed:
    batch = Landed(ws / "landing" / name, [], seed)
    batch.dir.mkdir(parents=True)
    for i in range(GOOD):
        batch.image(f"good{i:02d}.png", TINY_CLASSES[i % 3], seed=i)
    return batch


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    params = tiny_params()
    params["validate"]["min_images_per_class"] = 3
    return Workspace(make_workspace(tmp_path / "ws", params))


def snapshot(directory: Path) -> dict[str, bytes | None]:
    return {
        p.relative_to(directory).as_posix(): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
        for p in sorted(directory.rglob("*"))
    }


def ingest(ws: Workspace) -> IngestResult:
    landing = snapshot(ws.landing)
    result = run_ingest(load_params(ws.params), ws)
    assert snapshot(ws.landing) == landing, "the landing zone must never be modified"
    assert not (ws.root / "mlflow").exists() and not ws.models.exists(), "nothing may be trained or registered"
    return result


def quarantine_reasons(ws: Workspace, batch: str) -> list[tuple[str, str]]:
    with (ws.quarantine / batch / "quarantine.csv").open(newline="", encoding="utf-8") as fh:
        return [(row["source_path"], row["reason"]) for row in csv.DictReader(fh)]


def ingested_paths(ws: Workspace, batch: str) -> list[str]:
    with (ws.raw / batch / MANIFEST_NAME).open(newline="", encoding="utf-8") as fh:
        return sorted(row["source_path"] for row in csv.DictReader(fh))


def good_names() -> list[str]:
    return [f"good{i:02d}.png" for i in range(GOOD)]


def assert_quarantined(ws: Workspace, expected: list[tuple[str, str]], batch: str = "b1", total: int = GOOD) -> None:
    """The bad rows are quarantined for their reason; the good ones are ingested and validate."""
    result = ingest(ws)
    assert result.ingested == [batch] and result.rejected == {}
    assert sorted(quarantine_reasons(ws, batch)) == sorted(expected)
    assert ingested_paths(ws, batch) == good_names()
    assert run_validate(load_params(ws.params), ws).n_images == total


def assert_rejected(ws: Workspace, reason: str, batch: str = "b1") -> str:
    """Nothing of the batch is ingested; a good batch delivered with it is."""
    good_batch(ws.root, "b0-good", seed=99).write_labels()
    result = ingest(ws)
    assert result.ingested == ["b0-good"]
    assert result.rejected[batch].startswith(f"{reason}:")
    assert read_json(ws.quarantine / batch / "rejected.json")["reason"] == reason
    assert not (ws.raw / batch).exists()
    assert ingested_paths(ws, "b0-good") == good_names()
    run_validate(load_params(ws.params), ws)
    return result.rejected[batch]


# ---------------------------------------------------------------- unreadable or disallowed files


def test_truncated_png(ws: Workspace) -> None:
    b = good_batch(ws.root, "b1", 1)
    path = b.image("cut.png", "red", size=64)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    b.write_labels()
    assert_quarantined(ws, [("cut.png", "unreadable")])


def test_zero_byte_file(ws: Workspace) -> None:
    b = good_batch(ws.root, "b1", 1)
    (b.dir / "empty.png").write_bytes(b"")
    b.row("empty.png", "red")
    b.write_labels()
    assert_quarantined(ws, [("empty.png", "empty_file")])


def test_text_file_named_png(ws: Workspace) -> None:
    b = good_batch(ws.root, "b1", 1)
    (b.dir / "notes.png").write_text("this is not an image\n")
    b.row("notes.png", "red")
    b.write_labels()
    assert_quarantined(ws, [("notes.png", "unreadable")])


def test_cmyk_jpeg(ws: Workspace) -> None:
    b = good_batch(ws.root, "b1", 1)
    Image.new("CMYK", (16, 16), (0, 50, 100, 0)).save(b.dir / "print.jpg")
    b.row("print.jpg", "red")
    b.write_labels()
    assert_quarantined(ws, [("print.jpg", "mode_not_allowed")])


def test_16_bit_png(ws: Workspace) -> None:
    b = good_batch(ws.root, "b1", 1)
    Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(b.dir / "deep.png")
    b.row("deep.png", "blue")
    b.write_labels()
    assert_quarantined(ws, [("deep.png", "mode_not_allowed")])


def _frames() -> list[Image.Image]:
    return [Image.fromarray(np.full((16, 16), 60 * i, np.uint8)) for i in range(3)]


def test_animated_gif(ws: Workspace) -> None:
    b = good_batch(ws.root, "b1", 1)
    frames = _frames()
    frames[0].save(b.dir / "spin.gif", save_all=True, append_images=frames[1:])
    b.row("spin.gif", "green")
    b.write_labels()
    assert_quarantined(ws, [("spin.gif", "extension_not_allowed")])


def test_animated_gif_named_png_is_never_decoded(ws: Workspace) -> None:
    b = good_batch(ws.root, "b1", 1)
    frames = _frames()
    frames[0].save(b.dir / "spin.png", format="GIF", save_all=True, append_images=frames[1:])
    b.row("spin.png", "green")
    b.write_labels()
    assert_quarantined(ws, [("spin.png", "format_not_allowed")])


def test_animated_png(ws: Workspace) -> None:
    b = good_batch(ws.root, "b1", 1)
    frames = _frames()
    frames[0].save(b.dir / "spin.png", save_all=True, append_images=frames[1:])
    b.row("spin.png", "green")
    b.write_labels()
    assert_quarantined(ws, [("spin.png", "animated")])


def test_1x1_image(ws: Workspace) -> None:
    b = good_batch(ws.root, "b1", 1)
    Image.new("RGB", (1, 1)).save(b.dir / "dot.png")
    b.row("dot.png", "red")
    b.write_labels()
    assert_quarantined(ws, [("dot.png", "too_small")])


def test_decompression_bomb(ws: Workspace) -> None:
    b = good_batch(ws.root, "b1", 1)
    Image.new("L", (6000, 6000)).save(b.dir / "bomb.png")  # 36 Mpx of zeros: a few dozen KB on disk
    assert (b.dir / "bomb.png").stat().st_size < 200_000
    b.row("bomb.png", "red")
    b.write_labels()
    assert_quarantined(ws, [("bomb.png", "decompression_bomb")])


def test_missing_file(ws: Workspace) -> None:
    b = good_batch(ws.root, "b1", 1)
    b.row("never-delivered.png", "red")
    b.write_labels()
    assert_quarantined(ws, [("never-delivered.png", "missing_file")])


# ---------------------------------------------------------------- labels


def test_unknown_label(ws: Workspace) -> None:
    b = good_batch(ws.root, "b1", 1)
    b.image("x.png", "purple")
    b.write_labels()
    assert_quarantined(ws, [("x.png", "unknown_label")])
    detail = (ws.quarantine / "b1" / "quarantine.csv").read_text()
    assert "allowed: red, green, blue" in detail and "params.yaml" in detail


def test_blank_label(ws: Workspace) -> None:
    b = good_batch(ws.root, "b1", 1)
    b.image("x.png", "  ")
    b.write_labels()
    assert_quarantined(ws, [("x.png", "blank_label")])


def test_label_with_whitespace_and_other_case_is_normalised(ws: Workspace) -> None:
    b = good_batch(ws.root, "b1", 1)
    b.image("x.png", " Green ")
    b.write_labels()

    result = ingest(ws)

    assert result.quarantined == {} and result.notes["b1"] == [
        "1 label(s) normalised for whitespace/case, e.g. ' Green ' -> 'green'"
    ]
    labels = {row["source_path"]: row["label"] for row in read_all_manifests(ws.raw)}
    assert labels["x.png"] == "green" and len(labels) == GOOD + 1
    run_validate(load_params(ws.params), ws)


# ---------------------------------------------------------------- paths


def test_path_traversal(ws: Workspace) -> None:
    b = good_batch(ws.root, "b1", 1)
    Image.new("RGB", (16, 16)).save(ws.root / "landing" / "outside.png")
    b.row("../outside.png", "red")
    b.write_labels()
    assert_quarantined(ws, [("../outside.png", "path_outside_batch")])


def test_absolute_path(ws: Workspace) -> None:
    b = good_batch(ws.root, "b1", 1)
    secret = ws.root / "secret.png"
    Image.new("RGB", (16, 16)).save(secret)
    b.row(str(secret), "red")
    b.write_labels()
    assert_quarantined(ws, [(str(secret), "path_outside_batch")])
    assert not (ws.quarantine / "b1" / "files").exists()  # nothing outside the batch is copied


def test_symlink_out_of_the_batch(ws: Workspace) -> None:
    b = good_batch(ws.root, "b1", 1)
    target = ws.root / "elsewhere.png"
    Image.new("RGB", (16, 16)).save(target)
    (b.dir / "link.png").symlink_to(target)
    b.row("link.png", "red")
    b.write_labels()
    assert_quarantined(ws, [("link.png", "path_outside_batch")])


def test_non_utf8_file_name(ws: Workspace) -> None:
    batch = ws.root / "landing" / "b1"
    for i, cls in enumerate(TINY_CLASSES * 4):
        (batch / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(make_images(1, seed=500 + i)[0][0]).save(batch / cls / f"good{i:02d}.png")
    bad = os.fsencode(batch / "red") + b"/caf\xe9.png"  # Latin-1 bytes, not UTF-8
    with open(bad, "wb") as fh:
        Image.fromarray(make_images(1, seed=999)[0][0]).save(fh, format="PNG")

    result = ingest(ws)

    assert result.ingested == ["b1"]
    assert quarantine_reasons(ws, "b1") == [("red/caf\\xe9.png", "bad_filename")]
    assert len(read_all_manifests(ws.raw)) == GOOD
    run_validate(load_params(ws.params), ws)


# ---------------------------------------------------------------- duplicates, conflicts, leaks


def test_duplicate_image_with_the_same_label(ws: Workspace) -> None:
    b = good_batch(ws.root, "b1", 1)
    shutil.copyfile(b.dir / "good00.png", b.dir / "again.png")
    b.row("again.png", TINY_CLASSES[0])
    b.write_labels()
    assert_quarantined(ws, [("again.png", "duplicate")])


def test_duplicate_image_with_a_conflicting_label(ws: Workspace) -> None:
    b = good_batch(ws.root, "b1", 1)
    b.image("x.png", "red", seed=500)
    shutil.copyfile(b.dir / "x.png", b.dir / "y.png")
    b.row("y.png", "blue")
    b.write_labels()
    # Nothing says which label is right: both rows go to quarantine.
    assert_quarantined(ws, [("x.png", "label_conflict"), ("y.png", "label_conflict")])


def test_re_encoded_copy_of_an_ingested_image_with_another_label(ws: Workspace) -> None:
    first = good_batch(ws.root, "b1", 1)
    first.write_labels()
    ingest(ws)
    b2 = good_batch(ws.root, "b2", 2)
    with Image.open(first.dir / "good00.png") as img:
        img.save(b2.dir / "copy.png", compress_level=0)  # other bytes, same pixels
    b2.row("copy.png", "blue")  # good00 was ingested as red
    b2.write_labels()
    assert_quarantined(ws, [("copy.png", "label_conflict")], batch="b2", total=2 * GOOD)
    assert "is 'red' in b1/good00.png" in (ws.quarantine / "b2" / "quarantine.csv").read_text()


def test_image_already_in_another_split(ws: Workspace) -> None:
    # The benchmark is a held-out split: the same picture must not come back as training data.
    bench = Landed(ws.benchmark, [], 7)
    held_out = bench.image("held.png", "green", seed=1)
    bench.write_labels()
    b = good_batch(ws.root, "b1", 1)
    shutil.copyfile(held_out, b.dir / "leak.png")
    b.row("leak.png", "green")
    b.write_labels()
    assert_quarantined(ws, [("leak.png", "split_leak")])


# ---------------------------------------------------------------- labels.csv variants


def test_labels_csv_with_bom_is_read(ws: Workspace) -> None:
    b = good_batch(ws.root, "b1", 1)
    b.write_labels(encoding="utf-8-sig")
    assert (b.dir / "labels.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    result = ingest(ws)
    assert result.ingested == ["b1"] and result.quarantined == {} and ingested_paths(ws, "b1") == good_names()


def test_labels_csv_with_crlf_is_read(ws: Workspace) -> None:
    b = good_batch(ws.root, "b1", 1)
    b.write_labels(newline="\r\n")
    assert b"\r\n" in (b.dir / "labels.csv").read_bytes()
    result = ingest(ws)
    assert result.ingested == ["b1"] and result.quarantined == {} and ingested_paths(ws, "b1") == good_names()
    assert {row["label"] for row in read_all_manifests(ws.raw)} == set(TINY_CLASSES)  # no stray "\r"


def test_labels_csv_with_extra_columns_ignores_them(ws: Workspace) -> None:
    b = good_batch(ws.root, "b1", 1)
    b.rows = [(path, label, "alice") for path, label in b.rows]
    b.write_labels(header=("path", "label", "annotator"))
    result = ingest(ws)
    assert result.ingested == ["b1"] and ingested_paths(ws, "b1") == good_names()
    assert result.notes["b1"] == ["ignored extra column(s) in labels.csv: ['annotator']"]


def test_labels_csv_with_a_missing_column(ws: Workspace) -> None:
    b = good_batch(ws.root, "b1", 1)
    b.write_labels(header=("file", "label"))
    assert "lacks column(s) ['path']" in assert_rejected(ws, "missing_columns")


def test_labels_csv_that_is_not_utf8(ws: Workspace) -> None:
    b = good_batch(ws.root, "b1", 1)
    b.rows.append(("good00.png", "caf\xe9"))
    b.write_labels(encoding="latin-1")
    assert_rejected(ws, "unreadable_labels")


def test_batch_without_labels(ws: Workspace) -> None:
    b = good_batch(ws.root, "b1", 1)
    assert not (b.dir / "labels.csv").exists()
    assert "labels.csv" in assert_rejected(ws, "no_labels")


def test_empty_batch(ws: Workspace) -> None:
    (ws.root / "landing" / "b1").mkdir(parents=True)
    assert_rejected(ws, "empty_batch")


def test_batch_with_too_many_bad_rows(ws: Workspace) -> None:
    b = good_batch(ws.root, "b1", 1)
    for i in range(4):  # 4 of 16 = 25% > max_bad_fraction 20%
        b.row(f"missing{i}.png", "red")
    b.write_labels()
    assert "4 of 16 rows are bad (25% > max_bad_fraction 20%): missing_file 4" in assert_rejected(
        ws, "too_many_bad_rows"
    )
    assert len(quarantine_reasons(ws, "b1")) == 4  # the per-row reasons are still there to read


# ---------------------------------------------------------------- dataset-level expectations


def test_a_first_batch_of_one_class_only_blocks_validation(ws: Workspace) -> None:
    b = Landed(ws.root / "landing" / "b1", [], 1)
    for i in range(GOOD):
        b.image(f"r{i}.png", "red", seed=i)
    b.write_labels()

    assert ingest(ws).ingested == ["b1"]
    with pytest.raises(PipelineError, match="data validation failed: every_class"):
        run_validate(load_params(ws.params), ws)

    failures = read_json(ws.reports / "validate.json")["failures"]
    assert [f["rule"] for f in failures] == ["every_class"]


def test_a_later_batch_of_one_class_only_is_a_drift_warning(ws: Workspace) -> None:
    good_batch(ws.root, "b1", 1).write_labels()
    ingest(ws)
    b2 = Landed(ws.root / "landing" / "b2", [], 2)
    for i in range(GOOD):
        b2.image(f"r{i}.png", "red", seed=i)
    b2.write_labels()

    assert ingest(ws).ingested == ["b2"]
    result = run_validate(load_params(ws.params), ws)

    assert sorted(result.warnings) == ["class_imbalance:warning", "label_drift:warning"]  # warnings do not block
    warning = {w["rule"]: w for w in read_json(ws.reports / "validate.json")["warnings"]}["label_drift:warning"]
    assert warning["observed"] > 0.5 and warning["rows"][-1] == "batch b2"


def test_a_class_below_the_minimum_count(ws: Workspace) -> None:
    b = Landed(ws.root / "landing" / "b1", [], 1)
    for i, cls in enumerate(["red"] * 5 + ["green"] * 5 + ["blue"] * 2):
        b.image(f"x{i}.png", cls, seed=i)
    b.write_labels()

    assert ingest(ws).ingested == ["b1"]
    with pytest.raises(PipelineError, match=r"class_min \(observed 2"):
        run_validate(load_params(ws.params), ws)

    failure = read_json(ws.reports / "validate.json")["failures"][0]
    assert failure["rows"] == ["smallest class 'blue' (2), largest 'red' (5)"]


def test_a_new_class_needs_a_params_change(ws: Workspace) -> None:
    b = good_batch(ws.root, "b1", 1)
    b.image("y.png", "yellow")
    b.write_labels()
    assert_quarantined(ws, [("y.png", "unknown_label")])

    params = yaml.safe_load(ws.params.read_text())
    params["classes"].append("yellow")
    ws.params.write_text(yaml.safe_dump(params))
    b2 = Landed(ws.root / "landing" / "b2", [], 3)
    for i in range(4):
        b2.image(f"y{i}.png", "yellow", seed=i)
    b2.write_labels()

    assert ingest(ws).ingested == ["b2"]
    assert run_validate(load_params(ws.params), ws).class_counts["yellow"] == 4
