"""A generated corpus of bad inputs, one test case each.

Every case lands good images plus one kind of bad input, runs the real ingest (git + DVC
workspace) and the real validate stage (the GX checkpoint in gx/), and checks: the specific
reason reported, that the good rows were ingested (or, when the whole batch is rejected, that
a good batch landed beside it was), that nothing bad reached data/raw, that the landing zone
is untouched, and that nothing was trained or registered.

Cases that spoil one row share one batch (each bad row has a file name of its own, and each
test asserts its own rows' outcome); cases that reject a whole batch share one landing zone
(a batch each), and so do the labels.csv variants that must be read. The corpus thus costs
three ingests and validations instead of one per case. The hostile landing-zone cases
(symlinks out of it, misnamed folders, a batch landed twice) share one more ingest, which
records every file it opens. Cases that need a history of their own (a second batch,
another layout, a failing validation, EXIF orientation) keep their own workspace.

Decision on label spelling (documented in README): surrounding whitespace and letter case
are normalised when that names exactly one class; the note says so. Anything else unknown
is quarantined.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import ExifTags, Image

from tasks.common.config import load_params
from tasks.common.errors import PipelineError
from tasks.common.files import read_json
from tasks.common.workspace import Workspace
from tasks.data.images import decode_image, to_stored_pixels
from tasks.data.landing import INVALID_NAME
from tasks.data.manifest import MANIFEST_NAME, read_all_manifests
from tasks.ingest import EXIT_REJECTED, IngestResult, run_ingest
from tasks.validate import run_validate
from tests.helpers import TINY_CLASSES, Opened, make_images, recorded_opens, tiny_params

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


def corpus_params(**ingest: object) -> dict:
    params = tiny_params()
    params["validate"]["min_images_per_class"] = 3
    params["ingest"].update(ingest)
    return params


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, new_workspace: Callable[..., Path]) -> Workspace:
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    return Workspace(new_workspace(tmp_path / "ws", corpus_params()))


@pytest.fixture(scope="module")
def module_ws(tmp_path_factory: pytest.TempPathFactory, new_workspace: Callable[..., Path]) -> Callable[..., Workspace]:
    """A workspace shared by the tests of one corpus fixture."""

    def make(name: str, **ingest: object) -> Workspace:
        return Workspace(new_workspace(tmp_path_factory.mktemp(name) / "ws", corpus_params(**ingest)))

    return make


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


# ---------------------------------------------------------------- one bad row each, in one batch
#
# Each case adds its bad row(s) to the shared batch and returns the (path, reason) rows it
# expects in quarantine.csv. File names and pixels are unique across cases.

BadRows = list[tuple[str, str]]


def truncated_png(b: Landed, ws: Path) -> BadRows:
    path = b.image("cut.png", "red", seed=101, size=64)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return [("cut.png", "unreadable")]


def zero_byte_file(b: Landed, ws: Path) -> BadRows:
    (b.dir / "empty.png").write_bytes(b"")
    b.row("empty.png", "red")
    return [("empty.png", "empty_file")]


def text_file_named_png(b: Landed, ws: Path) -> BadRows:
    (b.dir / "notes.png").write_text("this is not an image\n")
    b.row("notes.png", "red")
    return [("notes.png", "unreadable")]


def cmyk_jpeg(b: Landed, ws: Path) -> BadRows:
    Image.new("CMYK", (16, 16), (0, 50, 100, 0)).save(b.dir / "print.jpg")
    b.row("print.jpg", "red")
    return [("print.jpg", "mode_not_allowed")]


def sixteen_bit_png(b: Landed, ws: Path) -> BadRows:
    Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(b.dir / "deep.png")
    b.row("deep.png", "blue")
    return [("deep.png", "mode_not_allowed")]


def _frames(offset: int) -> list[Image.Image]:
    return [Image.fromarray(np.full((16, 16), offset + 60 * i, np.uint8)) for i in range(3)]


def animated_gif(b: Landed, ws: Path) -> BadRows:
    frames = _frames(0)
    frames[0].save(b.dir / "spin.gif", save_all=True, append_images=frames[1:])
    b.row("spin.gif", "green")
    return [("spin.gif", "extension_not_allowed")]


def animated_gif_named_png_is_never_decoded(b: Landed, ws: Path) -> BadRows:
    frames = _frames(5)
    frames[0].save(b.dir / "gifspin.png", format="GIF", save_all=True, append_images=frames[1:])
    b.row("gifspin.png", "green")
    return [("gifspin.png", "format_not_allowed")]


def animated_png(b: Landed, ws: Path) -> BadRows:
    frames = _frames(10)
    frames[0].save(b.dir / "apng.png", save_all=True, append_images=frames[1:])
    b.row("apng.png", "green")
    return [("apng.png", "animated")]


def one_pixel_image(b: Landed, ws: Path) -> BadRows:
    Image.new("RGB", (1, 1)).save(b.dir / "dot.png")
    b.row("dot.png", "red")
    return [("dot.png", "too_small")]


def decompression_bomb(b: Landed, ws: Path) -> BadRows:
    Image.new("L", (6000, 6000)).save(b.dir / "bomb.png")  # 36 Mpx of zeros: a few dozen KB on disk
    assert (b.dir / "bomb.png").stat().st_size < 200_000
    b.row("bomb.png", "red")
    return [("bomb.png", "decompression_bomb")]


def missing_file(b: Landed, ws: Path) -> BadRows:
    b.row("never-delivered.png", "red")
    return [("never-delivered.png", "missing_file")]


def unknown_label(b: Landed, ws: Path) -> BadRows:
    b.image("purple.png", "purple", seed=102)
    return [("purple.png", "unknown_label")]


def blank_label(b: Landed, ws: Path) -> BadRows:
    b.image("blank.png", "  ", seed=103)
    return [("blank.png", "blank_label")]


def path_traversal(b: Landed, ws: Path) -> BadRows:
    Image.new("RGB", (16, 16)).save(ws / "landing" / "outside.png")
    b.row("../outside.png", "red")
    return [("../outside.png", "path_outside_batch")]


def absolute_path(b: Landed, ws: Path) -> BadRows:
    secret = ws / "secret.png"
    Image.new("RGB", (16, 16), (1, 2, 3)).save(secret)
    b.row(str(secret), "red")
    return [(str(secret), "path_outside_batch")]


def symlink_out_of_the_batch(b: Landed, ws: Path) -> BadRows:
    target = ws / "elsewhere.png"
    Image.new("RGB", (16, 16), (4, 5, 6)).save(target)
    (b.dir / "link.png").symlink_to(target)
    b.row("link.png", "red")
    return [("link.png", "path_outside_batch")]


def duplicate_image_with_the_same_label(b: Landed, ws: Path) -> BadRows:
    shutil.copyfile(b.dir / "good00.png", b.dir / "again.png")
    b.row("again.png", TINY_CLASSES[0])
    return [("again.png", "duplicate")]


def duplicate_image_with_a_conflicting_label(b: Landed, ws: Path) -> BadRows:
    b.image("x.png", "red", seed=500)
    shutil.copyfile(b.dir / "x.png", b.dir / "y.png")
    b.row("y.png", "blue")
    # Nothing says which label is right: both rows go to quarantine.
    return [("x.png", "label_conflict"), ("y.png", "label_conflict")]


def image_already_in_another_split(b: Landed, ws: Path) -> BadRows:
    # The benchmark is a held-out split: the same picture must not come back as training data.
    bench = Landed(ws / "data" / "benchmark", [], 7)
    held_out = bench.image("held.png", "green", seed=1)
    bench.write_labels()
    shutil.copyfile(held_out, b.dir / "leak.png")
    b.row("leak.png", "green")
    return [("leak.png", "split_leak")]


ONE_BAD_ROW: dict[str, Callable[[Landed, Path], BadRows]] = {
    fn.__name__: fn
    for fn in (
        truncated_png, zero_byte_file, text_file_named_png, cmyk_jpeg, sixteen_bit_png, animated_gif,
        animated_gif_named_png_is_never_decoded, animated_png, one_pixel_image, decompression_bomb, missing_file,
        unknown_label, blank_label, path_traversal, absolute_path, symlink_out_of_the_batch,
        duplicate_image_with_the_same_label, duplicate_image_with_a_conflicting_label, image_already_in_another_split,
    )
}  # fmt: skip


@pytest.fixture(scope="module")
def bad_rows(module_ws: Callable[..., Workspace]) -> dict[str, Any]:
    """One batch: the good rows, every case's bad rows, and one label to normalise. Up to 95 %
    of it may be bad here (the fraction rule has its own case below)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DVC_NO_ANALYTICS", "1")
        ws = module_ws("bad-rows", max_bad_fraction=0.95)
        b = good_batch(ws.root, "b1", 1)
        expected = {name: add(b, ws.root) for name, add in ONE_BAD_ROW.items()}
        b.image("normal.png", " Green ", seed=104)
        b.write_labels()
        result = ingest(ws)
        validation = run_validate(load_params(ws.params), ws)
    return {"ws": ws, "result": result, "expected": expected, "validation": validation}


@pytest.mark.parametrize("case", sorted(ONE_BAD_ROW))
def test_a_bad_row_is_quarantined_for_its_reason(bad_rows: dict[str, Any], case: str) -> None:
    expected = bad_rows["expected"][case]
    paths = {path for path, _ in expected}
    got = [row for row in quarantine_reasons(bad_rows["ws"], "b1") if row[0] in paths]
    assert sorted(got) == sorted(expected)


def test_only_the_bad_rows_are_quarantined_and_the_good_ones_validate(bad_rows: dict[str, Any]) -> None:
    ws, result = bad_rows["ws"], bad_rows["result"]
    assert result.ingested == ["b1"] and result.rejected == {}
    every_bad_row = sorted(row for rows in bad_rows["expected"].values() for row in rows)
    assert sorted(quarantine_reasons(ws, "b1")) == every_bad_row
    assert ingested_paths(ws, "b1") == sorted([*good_names(), "normal.png"])
    assert bad_rows["validation"].n_images == GOOD + 1


def test_an_unknown_label_names_the_allowed_ones_and_params_yaml(bad_rows: dict[str, Any]) -> None:
    with (bad_rows["ws"].quarantine / "b1" / "quarantine.csv").open(newline="", encoding="utf-8") as fh:
        detail = next(row["detail"] for row in csv.DictReader(fh) if row["source_path"] == "purple.png")
    assert "allowed: red, green, blue" in detail and "params.yaml" in detail


def test_nothing_outside_the_batch_is_copied_into_quarantine(bad_rows: dict[str, Any]) -> None:
    files = bad_rows["ws"].quarantine / "b1" / "files"
    copied = {p.name for p in files.rglob("*") if p.is_file()}
    assert "cut.png" in copied  # files inside the batch are kept for inspection
    assert not copied & {"secret.png", "outside.png", "elsewhere.png", "link.png"}


def test_label_with_whitespace_and_other_case_is_normalised(bad_rows: dict[str, Any]) -> None:
    ws, result = bad_rows["ws"], bad_rows["result"]
    assert result.notes["b1"] == ["1 label(s) normalised for whitespace/case, e.g. ' Green ' -> 'green'"]
    labels = {row["source_path"]: row["label"] for row in read_all_manifests(ws.raw)}
    assert labels["normal.png"] == "green" and len(labels) == GOOD + 1


# ---------------------------------------------------------------- one rejected batch each, in one landing zone


def missing_column(ws: Path) -> str:
    good_batch(ws, "missing-column", 11).write_labels(header=("file", "label"))
    return "missing_columns"


def labels_csv_that_is_not_utf8(ws: Path) -> str:
    b = good_batch(ws, "latin-1", 12)
    b.rows.append(("good00.png", "caf\xe9"))
    b.write_labels(encoding="latin-1")
    return "unreadable_labels"


def batch_without_labels(ws: Path) -> str:
    b = good_batch(ws, "no-labels", 13)
    assert not (b.dir / "labels.csv").exists()
    return "no_labels"


def empty_batch(ws: Path) -> str:
    (ws / "landing" / "empty").mkdir(parents=True)
    return "empty_batch"


def too_many_bad_rows(ws: Path) -> str:
    b = good_batch(ws, "too-many-bad", 14)
    for i in range(4):  # 4 of 16 = 25% > max_bad_fraction 20%
        b.row(f"missing{i}.png", "red")
    b.write_labels()
    return "too_many_bad_rows"


REJECTED: dict[str, Callable[[Path], str]] = {
    "missing-column": missing_column,
    "latin-1": labels_csv_that_is_not_utf8,
    "no-labels": batch_without_labels,
    "empty": empty_batch,
    "too-many-bad": too_many_bad_rows,
}


@pytest.fixture(scope="module")
def rejected(module_ws: Callable[..., Workspace]) -> dict[str, Any]:
    """Every rejected batch of the corpus, landed beside one good batch (the default 20 % rule)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DVC_NO_ANALYTICS", "1")
        ws = module_ws("rejected")
        reasons = {batch: land(ws.root) for batch, land in REJECTED.items()}
        good_batch(ws.root, "b0-good", seed=99).write_labels()
        result = ingest(ws)
        validation = run_validate(load_params(ws.params), ws)
    return {"ws": ws, "result": result, "reasons": reasons, "validation": validation}


@pytest.mark.parametrize("batch", sorted(REJECTED))
def test_a_broken_batch_is_rejected_whole_for_its_reason(rejected: dict[str, Any], batch: str) -> None:
    ws, reason = rejected["ws"], rejected["reasons"][batch]
    assert rejected["result"].rejected[batch].startswith(f"{reason}:")
    assert read_json(ws.quarantine / batch / "rejected.json")["reason"] == reason
    assert not (ws.raw / batch).exists()


def test_the_good_batch_beside_rejected_ones_is_ingested(rejected: dict[str, Any]) -> None:
    ws, result = rejected["ws"], rejected["result"]
    assert result.ingested == ["b0-good"]
    assert sorted(result.rejected) == sorted(REJECTED)
    assert ingested_paths(ws, "b0-good") == good_names()
    assert rejected["validation"].n_images == GOOD


def test_rejection_messages_say_what_is_wrong(rejected: dict[str, Any]) -> None:
    why = rejected["result"].rejected
    assert "lacks column(s) ['path']" in why["missing-column"]
    assert "labels.csv" in why["no-labels"]
    assert "4 of 16 rows are bad (25% > max_bad_fraction 20%): missing_file 4" in why["too-many-bad"]
    assert len(quarantine_reasons(rejected["ws"], "too-many-bad")) == 4  # the per-row reasons are still there


# ---------------------------------------------------------------- labels.csv variants to read, in one landing zone


@pytest.fixture(scope="module")
def variants(module_ws: Callable[..., Workspace]) -> dict[str, Any]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DVC_NO_ANALYTICS", "1")
        ws = module_ws("variants")
        good_batch(ws.root, "bom", 21).write_labels(encoding="utf-8-sig")
        good_batch(ws.root, "crlf", 22).write_labels(newline="\r\n")
        extra = good_batch(ws.root, "extra-column", 23)
        extra.rows = [(path, label, "alice") for path, label in extra.rows]
        extra.write_labels(header=("path", "label", "annotator"))
        result = ingest(ws)
    return {"ws": ws, "result": result}


def test_labels_csv_with_bom_is_read(variants: dict[str, Any]) -> None:
    ws, result = variants["ws"], variants["result"]
    assert (ws.landing / "bom" / "labels.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    assert "bom" in result.ingested and "bom" not in result.quarantined and ingested_paths(ws, "bom") == good_names()


def test_labels_csv_with_crlf_is_read(variants: dict[str, Any]) -> None:
    ws, result = variants["ws"], variants["result"]
    assert b"\r\n" in (ws.landing / "crlf" / "labels.csv").read_bytes()
    assert "crlf" in result.ingested and "crlf" not in result.quarantined
    assert ingested_paths(ws, "crlf") == good_names()
    labels = {row["label"] for row in read_all_manifests(ws.raw) if row["batch_id"] == "crlf"}
    assert labels == set(TINY_CLASSES)  # no stray "\r"


def test_labels_csv_with_extra_columns_ignores_them(variants: dict[str, Any]) -> None:
    ws, result = variants["ws"], variants["result"]
    assert "extra-column" in result.ingested and ingested_paths(ws, "extra-column") == good_names()
    assert result.notes["extra-column"] == ["ignored extra column(s) in labels.csv: ['annotator']"]
    assert "bom" not in result.notes and "crlf" not in result.notes


# ---------------------------------------------------------------- cases with a workspace of their own


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
    assert warning["observed"] < 0.01 and warning["rows"][-1].startswith("batch b2 (")  # p-value


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


# ---------------------------------------------------------------- a hostile landing zone (issue 12), in one ingest
#
# Symlinks that lead out of the landing zone, misnamed folders, a batch in progress, a batch
# landed twice under two names, a batch with no usable row and a row listed twice, all beside
# good batches. The ingest runs once, recording every file it opens or lists.

INVALID_NAMES = ["bad name with spaces", "oops|`x`"]


@pytest.fixture(scope="module")
def hostile(module_ws: Callable[..., Workspace]) -> dict[str, Any]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DVC_NO_ANALYTICS", "1")
        ws = module_ws("hostile")
        outside = ws.root / "outside"  # next to the landing zone: the symlinks below lead there
        good_batch(outside, "batch", 31).write_labels()
        (ws.landing / "linked").symlink_to(outside / "landing" / "batch", target_is_directory=True)
        classes = ws.landing / "classes"
        for i, cls in enumerate(TINY_CLASSES * 2):
            folder = (outside if cls == "blue" else classes) / cls
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(make_images(1, seed=3200 + i)[0][0]).save(folder / f"{i}.png")
        (classes / "blue").symlink_to(outside / "blue", target_is_directory=True)
        labels_link = good_batch(ws.root, "linked-labels", 33)
        labels_link.write_labels()
        shutil.move(labels_link.dir / "labels.csv", outside / "labels.csv")
        (labels_link.dir / "labels.csv").symlink_to(outside / "labels.csv")
        for seed, name in enumerate(INVALID_NAMES, start=34):
            good_batch(ws.root, name, seed).write_labels()
        good_batch(ws.root, "_half-written", 36)
        all_bad = Landed(ws.landing / "all-bad", [], 37)
        all_bad.dir.mkdir()
        for name in ("a.png", "b.png"):
            (all_bad.dir / name).write_text("not an image\n")
            all_bad.row(name, "red")
        all_bad.image("c.png", "purple")
        all_bad.write_labels()
        first = good_batch(ws.root, "b0-good", 38)
        first.row("good00.png", TINY_CLASSES[0])  # the same file listed twice
        first.write_labels()
        shutil.copytree(first.dir, ws.landing / "b1-copy")

        records: list[logging.LogRecord] = []
        handler = logging.Handler(logging.INFO)
        handler.emit = records.append  # type: ignore[method-assign]
        logger, level = logging.getLogger("tasks.ingest"), logging.getLogger("tasks.ingest").level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        cfg, landing = load_params(ws.params), snapshot(ws.landing)
        try:
            with recorded_opens() as reads:
                result = run_ingest(cfg, ws)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
        assert snapshot(ws.landing) == landing, "the landing zone must never be modified"
    return {"ws": ws, "result": result, "reads": reads, "outside": outside, "logs": [r.getMessage() for r in records]}


def reads_under(opened: list[Opened], folder: Path) -> list[Path]:
    return [o.path for o in opened if o.path.is_relative_to(folder.resolve())]


@pytest.mark.parametrize(
    ("batch", "reason"),
    [("linked", "symlinked_batch"), ("classes", "symlinked_class_folder"), ("linked-labels", "symlinked_labels")],
)
def test_a_symlink_out_of_the_landing_zone_rejects_its_batch_unread(
    hostile: dict[str, Any], batch: str, reason: str
) -> None:
    ws, result = hostile["ws"], hostile["result"]
    assert result.rejected[batch].startswith(f"{reason}: ") and "symbolic link" in result.rejected[batch]
    assert read_json(ws.quarantine / batch / "rejected.json")["reason"] == reason
    assert not (ws.raw / batch).exists() and not list((ws.quarantine / batch).rglob("*.png"))
    assert reads_under(hostile["reads"], hostile["outside"]) == []  # nothing opened or listed through a link


def test_misnamed_folders_are_skipped_and_reported_without_blocking_the_good_batch(hostile: dict[str, Any]) -> None:
    ws, result = hostile["ws"], hostile["result"]
    assert result.invalid == dict.fromkeys(INVALID_NAMES, INVALID_NAME)
    assert result.ingested == ["b0-good"] and ingested_paths(ws, "b0-good") == good_names()
    for name in INVALID_NAMES:
        assert reads_under(hostile["reads"], ws.landing / name) == []  # never read
        assert not (ws.raw / name).exists() and not (ws.quarantine / name).exists()
        assert f"skipped landing folder {name!r}: invalid batch name" in "\n".join(hostile["logs"])


def test_misnamed_folders_are_in_the_ingest_problems_artifact_as_literal_text(hostile: dict[str, Any]) -> None:
    from flows.stages import ingest_markdown

    text = ingest_markdown(asdict(hostile["result"]))
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if "not a valid batch name" in line}
    assert sorted(rows) == ["| `bad name with spaces`", "| `oops\\|'x'`"]  # no table break, no code span break
    assert all(row.count(" | ") == 2 for row in rows.values())


def test_the_ingest_command_exits_3_while_a_misnamed_folder_is_there(hostile: dict[str, Any]) -> None:
    ws = hostile["ws"]
    proc = subprocess.run([sys.executable, "-m", "tasks.ingest"], cwd=ws.root, capture_output=True, text=True)
    assert proc.returncode == EXIT_REJECTED, proc.stderr
    assert "ingest: skipped 'bad name with spaces', 'oops|`x`': invalid batch name" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ctl_status_shows_misnamed_folders_as_such(hostile: dict[str, Any]) -> None:
    from tasks.promote import waiting_batches

    ws = hostile["ws"]
    waiting = waiting_batches(load_params(ws.params), ws)
    assert "2 folder(s) with an invalid batch name, never ingested: 'bad name with spaces', 'oops|`x`'" in waiting
    assert "_half-written" not in waiting


def test_a_batch_in_progress_is_skipped_with_a_log_line(hostile: dict[str, Any]) -> None:
    assert "_half-written" not in hostile["result"].invalid and not (hostile["ws"].raw / "_half-written").exists()
    assert any("'_half-written'" in line and "rename it when complete" in line for line in hostile["logs"])


def test_a_batch_with_no_usable_row_says_why(hostile: dict[str, Any]) -> None:
    why = hostile["result"].rejected["all-bad"]
    assert why == "too_many_bad_rows: no row of the batch is usable: unreadable 2, unknown_label 1"


def test_a_row_listed_twice_is_the_same_file_listed_again(hostile: dict[str, Any]) -> None:
    ws = hostile["ws"]
    with (ws.quarantine / "b0-good" / "quarantine.csv").open(newline="", encoding="utf-8") as fh:
        rows = [(r["source_path"], r["reason"], r["detail"]) for r in csv.DictReader(fh)]
    assert rows == [("good00.png", "duplicate", "the same file listed again (first as 'good00.png')")]


def test_a_batch_landed_again_under_another_name_names_the_batch_it_repeats(hostile: dict[str, Any]) -> None:
    result = hostile["result"]
    assert result.skipped == ["b1-copy"] and result.repeats == {"b1-copy": "b0-good"}
    assert "batch b1-copy skipped: same content as batch b0-good" in hostile["logs"]


# ---------------------------------------------------------------- EXIF orientation


def test_an_exif_rotated_jpeg_is_ingested_decoded_and_served_upright(ws: Workspace) -> None:
    from tasks.model.serving import Decoding, decode_for_model

    b = good_batch(ws.root, "b1", 1)
    upright_scene = np.zeros((24, 16, 3), np.uint8)  # taller than wide, one marked corner
    upright_scene[:6, :4] = (250, 20, 20)
    upright_scene[6:, :, 1] = np.linspace(0, 200, 18, dtype=np.uint8)[:, None]
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # "rotate 90 degrees clockwise to view"
    Image.fromarray(upright_scene).transpose(Image.Transpose.ROTATE_90).save(b.dir / "sideways.jpg", exif=exif)
    b.row("sideways.jpg", "red")
    with Image.open(b.dir / "sideways.jpg") as img:  # the stored (sideways) pixels, as decoded
        stored = np.asarray(img.convert("RGB"))
    assert stored.shape == (16, 24, 3)
    Image.fromarray(stored).transpose(Image.Transpose.ROTATE_270).save(b.dir / "rotated.png")  # lossless
    b.row("rotated.png", "red")
    b.write_labels()

    result = ingest(ws)

    # Same pixel hash as the physically rotated copy: that copy is a duplicate of the JPEG.
    assert result.ingested == ["b1"]
    assert quarantine_reasons(ws, "b1") == [("rotated.png", "duplicate")]
    row = next(r for r in read_all_manifests(ws.raw) if r["source_path"] == "sideways.jpg")
    assert (row["width"], row["height"]) == ("16", "24")  # the upright size
    rotated = decode_image(b.dir / "rotated.png", 20)
    assert np.array_equal(decode_image(ws.raw / "b1" / row["path"], 20), rotated)  # what prepare stores
    decoding = Decoding(stored_size=20, formats=("PNG", "JPEG"), max_pixels=10**6)
    assert np.array_equal(decode_for_model((b.dir / "sideways.jpg").read_bytes(), decoding), rotated)  # serving
    assert not np.array_equal(rotated, to_stored_pixels(Image.fromarray(stored), 20))  # it did turn


def test_an_image_without_orientation_keeps_its_pixel_hash(ws: Workspace) -> None:
    good_batch(ws.root, "b1", 1).write_labels()
    ingest(ws)
    for row in read_all_manifests(ws.raw):
        with Image.open(ws.raw / "b1" / row["path"]) as img:  # the hash as ingest computed it before EXIF
            before = hashlib.sha256(f"{img.mode}:{img.width}x{img.height}:".encode() + img.tobytes()).hexdigest()
        assert row["pixel_sha256"] == before
