from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tasks import ingest
from tasks.common.config import PipelineConfig
from tasks.common.errors import PipelineError
from tasks.common.files import read_json, sha256_file
from tasks.common.workspace import Workspace
from tasks.data.landing import (
    BatchRejected,
    LabeledFile,
    content_hash,
    hash_batch,
    ingested_batches,
    is_candidate_batch,
    landing_batches,
    plan_batches,
    read_batch,
    resolve_inside,
)
from tasks.data.manifest import BATCH_INFO, MANIFEST_NAME
from tasks.data.rows import RowProblem
from tasks.data.screening import KnownImage, check_batch
from tasks.ingest import run_ingest

EXTS = (".png", ".jpg", ".jpeg")


def write_labels(batch: Path, rows: list[tuple[str, str]], encoding: str = "utf-8", header=("path", "label")) -> None:
    batch.mkdir(parents=True, exist_ok=True)
    with (batch / "labels.csv").open("w", newline="", encoding=encoding) as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def snapshot(directory: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every directory, by relative path."""
    return {
        p.relative_to(directory).as_posix(): (p.read_bytes() if p.is_file() else None)
        for p in sorted(directory.rglob("*"))
    }


# ---------------------------------------------------------------- pure cores


def test_content_hash_ignores_row_order_but_not_content() -> None:
    rows = [("a.png", "a", "11"), ("b.png", "b", "22"), ("c.png", "a", "33")]

    digest = content_hash(rows)

    assert content_hash(list(reversed(rows))) == digest
    assert content_hash([rows[1], rows[2], rows[0]]) == digest
    assert content_hash([("a.png", "b", "11"), *rows[1:]]) != digest  # relabelled
    assert content_hash([("a.png", "a", "12"), *rows[1:]]) != digest  # new pixels
    assert content_hash([("z.png", "a", "11"), *rows[1:]]) != digest  # renamed
    assert content_hash(rows[:2]) != digest


def test_plan_batches_splits_new_from_already_ingested() -> None:
    new, old, repeats = plan_batches({"b3": "h3", "b1": "h1", "b2": "h2"}, {"b1": "h1"})

    assert new == ["b2", "b3"]
    assert old == ["b1"]
    assert repeats == {}  # the same batch again, not a copy under another name


def test_plan_batches_skips_known_content_under_a_new_name() -> None:
    new, old, repeats = plan_batches({"b1-copy": "h1"}, {"b1": "h1"})

    assert (new, old) == ([], ["b1-copy"])
    assert repeats == {"b1-copy": "b1"}


def test_plan_batches_with_nothing_landed() -> None:
    assert plan_batches({}, {"b1": "h1"}) == ([], [], {})


def test_plan_batches_refuses_changed_content_under_an_ingested_name() -> None:
    with pytest.raises(PipelineError, match="already ingested with different content") as info:
        plan_batches({"b1": "changed"}, {"b1": "h1"})

    assert "'b1'" in str(info.value)
    assert "new name" in str(info.value)


@pytest.mark.parametrize(("name", "expected"), [("batch-1", True), ("2024.05", True), (".b", False), ("_b", False)])
def test_is_candidate_batch(name: str, expected: bool) -> None:
    assert is_candidate_batch(name) is expected


def test_resolve_inside_accepts_paths_within_the_batch(tmp_path: Path) -> None:
    batch = tmp_path / "b1"
    (batch / "images").mkdir(parents=True)

    assert resolve_inside(batch, "images/x.png") == (batch / "images" / "x.png").resolve()
    assert resolve_inside(batch, "images/../x.png") == (batch / "x.png").resolve()


@pytest.mark.parametrize("rel", ["../x.png", "images/../../x.png", "../b1-other/x.png"])
def test_resolve_inside_rejects_parent_escapes(tmp_path: Path, rel: str) -> None:
    batch = tmp_path / "b1"
    batch.mkdir()

    with pytest.raises(RowProblem, match="points outside the batch") as info:
        resolve_inside(batch, rel)

    assert info.value.reason == "path_outside_batch"


@pytest.mark.parametrize("rel", ["/etc/passwd", "images\\x.png"])
def test_resolve_inside_rejects_absolute_and_backslash_paths(tmp_path: Path, rel: str) -> None:
    batch = tmp_path / "b1"
    batch.mkdir()

    with pytest.raises(RowProblem, match="must be relative to the batch") as info:
        resolve_inside(batch, rel)

    assert repr(rel) in str(info.value) and info.value.reason == "path_outside_batch"


def test_resolve_inside_needs_a_path(tmp_path: Path) -> None:
    with pytest.raises(RowProblem) as info:
        resolve_inside(tmp_path, "")

    assert info.value.reason == "missing_file"


def test_resolve_inside_rejects_a_symlink_leaving_the_batch(tmp_path: Path) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"outside")
    batch = tmp_path / "b1"
    batch.mkdir()
    (batch / "link.png").symlink_to(secret)
    (batch / "dir").symlink_to(tmp_path)

    with pytest.raises(RowProblem, match="points outside the batch"):
        resolve_inside(batch, "link.png")
    with pytest.raises(RowProblem, match="points outside the batch"):
        resolve_inside(batch, "dir/secret.png")


def test_one_resolver_per_batch_resolves_as_path_resolve(tmp_path: Path) -> None:
    from tasks.data.landing import InsideBatch

    batch = tmp_path / "b1"
    (batch / "images" / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (batch / "inner").symlink_to(batch / "images")  # a link that stays inside
    (batch / "images" / "up").symlink_to(tmp_path / "outside")
    (batch / "images" / "a.png").symlink_to(batch / "images" / "sub" / "b.png")
    (batch / "images" / "out.png").symlink_to(tmp_path / "outside" / "c.png")
    inside = InsideBatch(batch)  # reused for every row, as hash_batch does
    rels = ["x.png", "./x.png", "images/x.png", "images//x.png", "images/sub/../x.png", "images/sub/..",
            "inner/x.png", "inner/../x.png", "images/a.png", "images/out.png", "images/up/c.png",
            "images/up/../x.png", "missing/x.png", "images/sub/", "../b1/x.png"]  # fmt: skip
    for rel in rels * 2:
        expected = (batch / rel).resolve()
        if expected.is_relative_to(batch.resolve()):
            assert inside.resolve(rel) == expected, rel
        else:
            with pytest.raises(RowProblem, match="points outside the batch"):
                inside.resolve(rel)


# ---------------------------------------------------------------- reading a batch


def test_read_batch_from_labels_csv(tmp_path: Path) -> None:
    batch = tmp_path / "b1"
    write_labels(batch, [("images/1.png", "a"), ("2.png", "b")])

    assert read_batch(batch, EXTS) == ([LabeledFile("images/1.png", "a"), LabeledFile("2.png", "b")], [])


def test_read_batch_accepts_a_byte_order_mark(tmp_path: Path) -> None:
    batch = tmp_path / "b1"
    write_labels(batch, [("1.png", "a")], encoding="utf-8-sig")
    assert (batch / "labels.csv").read_bytes().startswith(b"\xef\xbb\xbf")

    assert read_batch(batch, EXTS) == ([LabeledFile("1.png", "a")], [])


def test_read_batch_accepts_extra_columns_in_any_order(tmp_path: Path) -> None:
    batch = tmp_path / "b1"
    write_labels(batch, [("a", "x", "1.png")], header=("label", "note", "path"))

    assert read_batch(batch, EXTS) == ([LabeledFile("1.png", "a")], ["ignored extra column(s) in labels.csv: ['note']"])


def test_read_batch_from_image_folder_layout(tmp_path: Path, write_png: Callable[..., Path]) -> None:
    batch = tmp_path / "b1"
    write_png(batch / "b" / "2.png")
    write_png(batch / "a" / "1.PNG")
    write_png(batch / "a" / "nested" / "3.jpg")
    (batch / "a" / "notes.txt").write_text("not an image")
    (batch / "README").write_text("top-level files are ignored in this layout")

    rows, _ = read_batch(batch, EXTS)

    assert rows == [
        LabeledFile("a/1.PNG", "a"),
        LabeledFile("a/nested/3.jpg", "a"),
        LabeledFile("b/2.png", "b"),
    ]


def test_labels_csv_takes_precedence_over_sub_folders(tmp_path: Path, write_png: Callable[..., Path]) -> None:
    batch = tmp_path / "b1"
    write_png(batch / "a" / "1.png")
    write_labels(batch, [("a/1.png", "b")])

    assert read_batch(batch, EXTS) == ([LabeledFile("a/1.png", "b")], [])


def test_read_batch_names_a_missing_column(tmp_path: Path) -> None:
    batch = tmp_path / "b1"
    write_labels(batch, [("1.png", "a")], header=("file", "label"))

    with pytest.raises(BatchRejected, match=r"lacks column\(s\) \['path'\]") as info:
        read_batch(batch, EXTS)

    assert "required: path,label" in str(info.value) and info.value.reason == "missing_columns"
    assert "'b1'" in str(info.value)


def test_read_batch_rejects_a_non_utf8_labels_file(tmp_path: Path) -> None:
    batch = tmp_path / "b1"
    batch.mkdir()
    (batch / "labels.csv").write_bytes("path,label\n1.png,caf\xe9\n".encode("latin-1"))

    with pytest.raises(BatchRejected, match="not a UTF-8 CSV"):
        read_batch(batch, EXTS)


def test_read_batch_without_labels_says_how_to_label(tmp_path: Path, write_png: Callable[..., Path]) -> None:
    batch = tmp_path / "b1"
    write_png(batch / "1.png")

    with pytest.raises(BatchRejected, match="no_labels") as info:
        read_batch(batch, EXTS)

    assert "labels.csv" in str(info.value)


def test_read_batch_of_an_empty_directory(tmp_path: Path) -> None:
    batch = tmp_path / "b1"
    batch.mkdir()

    with pytest.raises(BatchRejected, match="'b1' rejected \\(empty_batch\\)"):
        read_batch(batch, EXTS)


def test_read_batch_with_a_header_only_labels_csv_is_empty(tmp_path: Path) -> None:
    batch = tmp_path / "b1"
    write_labels(batch, [])

    with pytest.raises(BatchRejected, match="empty_batch"):
        read_batch(batch, EXTS)


def test_landing_batches_skips_hidden_and_in_progress_dirs(tmp_path: Path) -> None:
    for name in ("b2", "b1", ".b3.writing", "_b4"):
        (tmp_path / name).mkdir()
    (tmp_path / "stray.txt").write_text("x")

    assert [p.name for p in landing_batches(tmp_path)] == ["b1", "b2"]


def test_landing_batches_skips_an_unsafe_batch_name(tmp_path: Path) -> None:
    (tmp_path / "bad name").mkdir()
    (tmp_path / "b1").mkdir()

    assert [p.name for p in landing_batches(tmp_path)] == ["b1"]  # reported by scan_landing, never raised


def test_landing_batches_needs_the_landing_zone(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="landing zone not found"):
        landing_batches(tmp_path / "landing")


def test_check_batch_quarantines_each_bad_row_with_its_reason(
    tmp_path: Path, write_png: Callable[..., Path], make_cfg: Callable[..., PipelineConfig]
) -> None:
    cfg = make_cfg(validate={"max_image_side": 16})
    batch = tmp_path / "b1"
    write_png(batch / "ok.png")
    write_png(batch / "big.png", size=(17, 8))
    write_png(batch / "pic.gif")
    (batch / "broken.png").write_text("not a png")
    write_labels(
        batch,
        [("ok.png", "a"), ("big.png", "a"), ("pic.gif", "b"), ("broken.png", "b"), ("gone.png", "a"), ("ok.png", "z")],
    )
    rows, _, _ = hash_batch(batch, cfg)

    check = check_batch(rows, cfg, {})

    assert [a.item.row.path for a in check.accepted] == ["ok.png"]
    assert {(q.item.row.path, q.reason) for q in check.quarantined} == {
        ("big.png", "too_large"),
        ("pic.gif", "extension_not_allowed"),
        ("broken.png", "unreadable"),
        ("gone.png", "missing_file"),
        ("ok.png", "unknown_label"),
    }
    assert check.bad_fraction == pytest.approx(5 / 6)


def test_check_batch_returns_properties_of_good_images(
    tmp_path: Path, write_png: Callable[..., Path], make_cfg: Callable[..., PipelineConfig]
) -> None:
    batch = tmp_path / "b1"
    write_png(batch / "X.PNG", size=(9, 11))  # extensions match case-insensitively
    write_labels(batch, [("X.PNG", "b")])
    rows, digest, _ = hash_batch(batch, make_cfg())

    check = check_batch(rows, make_cfg(), {})

    assert [(a.info.width, a.info.height, a.info.format, a.info.mode) for a in check.accepted] == [
        (9, 11, "PNG", "RGB")
    ]
    assert rows[0].sha256 == sha256_file(batch / "X.PNG")
    assert digest == content_hash([("X.PNG", "b", rows[0].sha256)])


# ---------------------------------------------------------------- run_ingest in a git + DVC workspace


def landed_batch(
    ws: Workspace, name: str, write_png: Callable[..., Path], n: int = 10, labels=("a", "b"), dup: bool = False
) -> Path:
    """A labels.csv batch of ``n`` PNGs distinct across batches; ``dup`` adds a copy of the first image."""
    batch = ws.landing / name
    rows = []
    for i in range(n):
        write_png(batch / "images" / f"img{i:02d}.png", size=(8 + i % 3, 9), seed=zlib.crc32(name.encode()) + i)
        rows.append((f"images/img{i:02d}.png", labels[i % len(labels)]))
    if dup:
        shutil.copyfile(batch / "images" / "img00.png", batch / "dup.png")
        rows.append(("dup.png", labels[0]))
    write_labels(batch, rows)
    return batch


@pytest.mark.integration
def test_run_ingest_copies_a_batch_tracks_it_and_is_idempotent(
    dvc_workspace: Workspace, write_png: Callable[..., Path], make_cfg: Callable[..., PipelineConfig]
) -> None:
    ws, cfg = dvc_workspace, make_cfg()
    batch = landed_batch(ws, "batch-001", write_png, dup=True)
    landing_before = snapshot(ws.landing)

    result = run_ingest(cfg, ws)

    assert result.ingested == ["batch-001"] and result.skipped == [] and result.changed
    target = ws.raw / "batch-001"
    with (target / MANIFEST_NAME).open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == (
            "path", "source_path", "label", "sha256", "pixel_sha256", "width", "height",
            "mode", "channels", "bytes", "format", "batch_id",
        )  # fmt: skip
        manifest = list(reader)
    with (batch / "labels.csv").open(newline="", encoding="utf-8") as fh:
        landed = {row["path"]: row["label"] for row in csv.DictReader(fh)}
    # The duplicate of img00 is quarantined, every other row is ingested.
    assert {row["source_path"]: row["label"] for row in manifest} == {k: v for k, v in landed.items() if k != "dup.png"}
    assert len(manifest) == 10
    for row in manifest:
        source = batch / row["source_path"]
        stored = target / row["path"]
        assert row["sha256"] == sha256_file(source) == sha256_file(stored)
        assert row["path"] == f"images/{row['sha256']}.png"
        with Image.open(source) as img:
            assert (int(row["width"]), int(row["height"]), row["mode"], row["format"]) == (*img.size, img.mode, "PNG")
        assert (row["channels"], row["bytes"]) == ("3", str(source.stat().st_size))
        assert row["batch_id"] == "batch-001"
    assert len(list((target / "images").iterdir())) == 10
    assert read_json(target / BATCH_INFO) == {
        "batch_id": "batch-001",
        "content_hash": hash_batch(batch, cfg)[1],
        "n_images": 10,
        "n_quarantined": 1,
        "notes": [],
    }
    assert result.quarantined == {"batch-001": {"duplicate": 1}}
    assert ingested_batches(ws.raw) == {"batch-001": hash_batch(batch, cfg)[1]}
    assert not any(p.name.endswith(".partial") for p in ws.raw.iterdir())

    raw_dvc = ws.root / "data" / "raw.dvc"
    assert raw_dvc.is_file()
    out = yaml.safe_load(raw_dvc.read_text())["outs"][0]
    assert out["path"] == "raw"
    assert out["md5"].endswith(".dir")
    assert result.data_hash == out["md5"]

    dvc_file_before = raw_dvc.read_bytes()
    raw_before = snapshot(ws.raw)
    again = run_ingest(cfg, ws)

    assert again.ingested == [] and again.skipped == ["batch-001"] and not again.changed
    assert again.data_hash == result.data_hash
    assert raw_dvc.read_bytes() == dvc_file_before
    assert snapshot(ws.raw) == raw_before

    # The same content under another name is also a no-op.
    shutil.copytree(batch, ws.landing / "batch-001-resent")
    renamed = run_ingest(cfg, ws)
    assert renamed.ingested == [] and renamed.skipped == ["batch-001", "batch-001-resent"]
    assert snapshot(ws.raw) == raw_before

    shutil.rmtree(ws.landing / "batch-001-resent")
    assert snapshot(ws.landing) == landing_before


@pytest.mark.integration
def test_run_ingest_rejects_a_batch_with_too_many_bad_rows_and_ingests_the_others(
    dvc_workspace: Workspace, write_png: Callable[..., Path], make_cfg: Callable[..., PipelineConfig]
) -> None:
    ws, cfg = dvc_workspace, make_cfg()
    landed_batch(ws, "b1-good", write_png, n=4)
    landed_batch(ws, "b2-bad", write_png, n=4, labels=("a", "cat"))  # 2 of 4 rows unknown: 50% > 20%
    landing_before = snapshot(ws.landing)

    result = run_ingest(cfg, ws)

    assert result.ingested == ["b1-good"]
    assert result.rejected["b2-bad"].startswith("too_many_bad_rows: 2 of 4 rows are bad (50% > max_bad_fraction 20%)")
    assert not (ws.raw / "b2-bad").exists()
    assert read_json(ws.quarantine / "b2-bad" / "rejected.json")["reason"] == "too_many_bad_rows"
    with (ws.quarantine / "b2-bad" / "quarantine.csv").open(newline="") as fh:
        assert [(r["source_path"], r["reason"]) for r in csv.DictReader(fh)] == [
            ("images/img01.png", "unknown_label"),
            ("images/img03.png", "unknown_label"),
        ]
    assert snapshot(ws.landing) == landing_before
    # A rejected batch is not retried on every run: it stays rejected until re-delivered under a new name.
    assert run_ingest(cfg, ws).rejected == {}


@pytest.mark.integration
def test_run_ingest_refuses_a_changed_batch_under_the_same_name(
    dvc_workspace: Workspace, write_png: Callable[..., Path], make_cfg: Callable[..., PipelineConfig]
) -> None:
    ws, cfg = dvc_workspace, make_cfg()
    batch = landed_batch(ws, "b1", write_png, n=3)
    run_ingest(cfg, ws)
    raw_before = snapshot(ws.raw)

    write_png(batch / "images" / "img01.png", size=(8, 9), seed=999)
    with pytest.raises(PipelineError, match="'b1' was already ingested with different content"):
        run_ingest(cfg, ws)

    assert snapshot(ws.raw) == raw_before


def test_run_ingest_with_a_missing_landing_zone(tmp_path: Path, make_cfg: Callable[..., PipelineConfig]) -> None:
    with pytest.raises(PipelineError, match="landing zone not found"):
        run_ingest(make_cfg(), Workspace(tmp_path))


@pytest.mark.integration
def test_run_ingest_reads_the_configured_landing_dir(
    dvc_workspace: Workspace, write_png: Callable[..., Path], make_cfg: Callable[..., PipelineConfig]
) -> None:
    ws = dvc_workspace
    batch = ws.root / "inbox" / "b1"
    write_png(batch / "a" / "1.png", seed=1)
    write_png(batch / "b" / "2.png", seed=2)
    os.makedirs(ws.landing)  # the default landing dir exists but must not be read
    write_png(ws.landing / "ignored" / "a" / "x.png", seed=3)

    result = run_ingest(make_cfg(ingest={"landing_dir": "inbox"}), ws)

    assert result.ingested == ["b1"]
    assert sorted(p.name for p in ws.raw.iterdir() if p.is_dir()) == ["b1"]


def test_a_crashed_copy_does_not_count_as_ingested(
    tmp_path: Path, write_png: Callable[..., Path], make_cfg: Callable[..., PipelineConfig]
) -> None:
    cfg = make_cfg()
    ws = Workspace(tmp_path)
    batch = landed_batch(ws, "b1", write_png, n=2)
    _, digest, _ = hash_batch(batch, cfg)
    # What _copy_batch leaves behind when it dies between writing batch.json and os.replace.
    staging = ws.raw / ".b1.partial"
    (staging / "images").mkdir(parents=True)
    (staging / BATCH_INFO).write_text(json.dumps({"batch_id": "b1", "content_hash": digest, "n_images": 3}))

    assert ingested_batches(ws.raw) == {}


def dvc_down(*args: object, **kwargs: object) -> None:
    raise PipelineError("dvc add failed: simulated")


@pytest.mark.integration
def test_a_failed_dvc_add_is_retried_on_the_next_run(
    dvc_workspace: Workspace,
    write_png: Callable[..., Path],
    make_cfg: Callable[..., PipelineConfig],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ws, cfg = dvc_workspace, make_cfg()
    landed_batch(ws, "b1", write_png, n=2)
    first = run_ingest(cfg, ws)
    write_png(ws.landing / "b2" / "a" / "x.png", seed=42)

    with monkeypatch.context() as patch:
        patch.setattr(ingest, "dvc_add", dvc_down)
        with pytest.raises(PipelineError, match="simulated"):
            run_ingest(cfg, ws)
    assert (ws.raw / "b2" / MANIFEST_NAME).is_file()  # copied before dvc add failed

    retried = run_ingest(cfg, ws)

    assert retried.data_hash != first.data_hash
    assert_raw_dvc_is_a_full_add(ws)


def assert_raw_dvc_is_a_full_add(ws: Workspace) -> None:
    """data/raw.dvc is byte for byte what ``dvc add data/raw`` writes, and DVC calls it current."""
    recorded = ws.raw_dvc.read_bytes()
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "add", "--quiet", "data/raw"], cwd=ws.root, check=True, capture_output=True)
    assert ws.raw_dvc.read_bytes() == recorded
    status = subprocess.run([*dvc, "status", "--json", "data/raw.dvc"], cwd=ws.root, check=True, capture_output=True)
    assert json.loads(status.stdout) == {}


@pytest.mark.integration
def test_a_new_batch_is_added_alone_and_the_record_equals_a_full_add(
    dvc_workspace: Workspace,
    write_png: Callable[..., Path],
    make_cfg: Callable[..., PipelineConfig],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ws, cfg = dvc_workspace, make_cfg()
    landed_batch(ws, "b1", write_png, n=3)
    added: list[list[str]] = []
    real_add = ingest.dvc_add

    def spy(targets: list[Path], root: Path, **kwargs: object) -> None:
        added.append([p.relative_to(root).as_posix() for p in targets])
        real_add(targets, root, **kwargs)

    monkeypatch.setattr(ingest, "dvc_add", spy)
    run_ingest(cfg, ws)
    landed_batch(ws, "b2", write_png, n=4)
    landed_batch(ws, "b3", write_png, n=2)
    run_ingest(cfg, ws)

    assert added == [["data/raw"], ["data/raw/b2", "data/raw/b3"]]
    assert not (ws.cache / ingest.ADD_PENDING).exists()
    assert_raw_dvc_is_a_full_add(ws)
    assert listed_batches(ws) == {"b1", "b2", "b3"}


def dir_object(ws: Workspace) -> Path:
    """data/raw.dvc's directory object (its listing) in the local cache."""
    md5 = yaml.safe_load(ws.raw_dvc.read_text())["outs"][0]["md5"].removesuffix(".dir")
    return ws.root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / f"{md5[2:]}.dir"


def listed_batches(ws: Workspace) -> set[str]:
    """The batch folders data/raw.dvc's listing holds."""
    return {e["relpath"].split("/")[0] for e in json.loads(dir_object(ws).read_text())}


@pytest.mark.integration
def test_without_the_old_listing_in_the_cache_all_of_data_raw_is_added(
    dvc_workspace: Workspace, write_png: Callable[..., Path], make_cfg: Callable[..., PipelineConfig]
) -> None:
    ws, cfg = dvc_workspace, make_cfg()
    landed_batch(ws, "b1", write_png, n=3)
    run_ingest(cfg, ws)
    dir_object(ws).unlink()  # e.g. after a gc
    landed_batch(ws, "b2", write_png, n=2)

    run_ingest(cfg, ws)

    assert listed_batches(ws) == {"b1", "b2"}  # b1 kept, not dropped
    assert_raw_dvc_is_a_full_add(ws)


@pytest.mark.integration
@pytest.mark.parametrize("mark", ["", "not json", '{"b2": 1}', '["b2", "gone"]'])
def test_a_pending_mark_that_names_no_existing_batches_adds_all_of_data_raw(
    dvc_workspace: Workspace, write_png: Callable[..., Path], make_cfg: Callable[..., PipelineConfig], mark: str
) -> None:
    """An empty mark (what ingest wrote before it named the batches), a damaged one, or one naming
    a folder that is not there: ingest cannot tell what is new, so it adds all of data/raw, also
    when a new batch lands meanwhile (its name must not make the mark look complete)."""
    ws, cfg = dvc_workspace, make_cfg()
    landed_batch(ws, "b1", write_png, n=3)
    run_ingest(cfg, ws)
    landed_batch(ws, "b2", write_png, n=2)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(PipelineError, match="simulated"):
        patch.setattr(ingest, "dvc_add", dvc_down)  # copied, never added: the mark stays
        run_ingest(cfg, ws)
    pending = ws.cache / ingest.ADD_PENDING
    assert read_json(pending) == ["b2"]
    pending.write_text(mark)

    assert ingest.add_targets(ws, pending) == [ws.raw]
    landed_batch(ws, "b3", write_png, n=2)
    assert run_ingest(cfg, ws).ingested == ["b3"]

    assert not pending.exists()
    assert listed_batches(ws) == {"b1", "b2", "b3"}
    assert_raw_dvc_is_a_full_add(ws)


def test_check_batch_quarantines_both_rows_of_a_conflict_within_the_batch(
    tmp_path: Path, write_png: Callable[..., Path], make_cfg: Callable[..., PipelineConfig]
) -> None:
    batch = tmp_path / "b1"
    write_png(batch / "x.png", seed=3)
    write_png(batch / "ok.png", seed=4)
    shutil.copyfile(batch / "x.png", batch / "y.png")
    write_labels(batch, [("x.png", "a"), ("y.png", "b"), ("ok.png", "a")])
    rows, _, _ = hash_batch(batch, make_cfg())

    check = check_batch(rows, make_cfg(), {})

    assert [a.item.row.path for a in check.accepted] == ["ok.png"]
    assert [(q.item.row.path, q.reason) for q in check.quarantined] == [
        ("x.png", "label_conflict"),
        ("y.png", "label_conflict"),
    ]


def test_check_batch_compares_with_ingested_images_by_pixels(
    tmp_path: Path, write_png: Callable[..., Path], make_cfg: Callable[..., PipelineConfig]
) -> None:
    batch = tmp_path / "b2"
    write_png(batch / "x.png", seed=3)
    write_labels(batch, [("x.png", "b")])
    rows, _, _ = hash_batch(batch, make_cfg())
    pixels = check_batch(rows, make_cfg(), {}).accepted[0].info.pixel_sha256

    def reason(known: KnownImage) -> tuple[str, str]:
        q = check_batch(rows, make_cfg(), {pixels: known}).quarantined[0]
        return q.reason, q.detail

    assert reason(KnownImage("a", "b1/x.png")) == (
        "label_conflict",
        "labelled 'b' but the same image is 'a' in b1/x.png",
    )
    assert reason(KnownImage("b", "b1/x.png")) == ("duplicate", "same image already ingested as b1/x.png")
    assert reason(KnownImage("b", "benchmark/x.png", benchmark=True))[0] == "split_leak"


def test_plan_batches_ingests_one_of_two_identical_new_batches() -> None:
    new, old, repeats = plan_batches({"b1": "h", "b2": "h"}, {})
    assert (new, old, repeats) == (["b1"], ["b2"], {"b2": "b1"})


@pytest.mark.integration
def test_run_ingest_quarantines_rows_relabelling_ingested_images(
    dvc_workspace: Workspace, write_png: Callable[..., Path], make_cfg: Callable[..., PipelineConfig]
) -> None:
    ws, cfg = dvc_workspace, make_cfg(ingest={"max_bad_fraction": 0.5})
    landed_batch(ws, "b1", write_png, n=2)
    run_ingest(cfg, ws)
    relabelled = ws.landing / "b2"
    relabelled.mkdir()
    shutil.copyfile(ws.landing / "b1" / "images" / "img00.png", relabelled / "same.png")
    write_png(relabelled / "new.png", seed=77)
    write_labels(relabelled, [("same.png", "b"), ("new.png", "b")])  # img00 was ingested as "a"

    result = run_ingest(cfg, ws)

    assert result.ingested == ["b2"] and result.quarantined == {"b2": {"label_conflict": 1}}
    with (ws.raw / "b2" / MANIFEST_NAME).open(newline="") as fh:
        assert [r["source_path"] for r in csv.DictReader(fh)] == ["new.png"]
    assert (ws.quarantine / "b2" / "files" / "same.png").read_bytes() == (relabelled / "same.png").read_bytes()


def test_file_hash_cache_rehashes_only_changed_files(tmp_path: Path, write_png: Callable[..., Path]) -> None:
    from tasks.common.files import FileHashCache

    image = write_png(tmp_path / "x.png", seed=1)
    cache = FileHashCache(tmp_path / "cache.json")
    first = cache.sha256(image)
    cache.save()
    assert first == sha256_file(image)

    reloaded = FileHashCache(tmp_path / "cache.json")
    assert reloaded.sha256(image) == first
    write_png(image, seed=2, size=(9, 9))  # new content, size and mtime
    assert reloaded.sha256(image) == sha256_file(image) != first


def test_quarantine_csv_never_holds_a_live_spreadsheet_formula(
    tmp_path: Path, write_png: Callable[..., Path], make_cfg: Callable[..., PipelineConfig]
) -> None:
    cfg = make_cfg()
    batch = tmp_path / "b1"
    batch.mkdir()
    write_png(batch / "=cmd.png")
    write_labels(batch, [("=cmd.png", '=HYPERLINK("http://evil.invalid","x")'), ("+1.png", "@SUM(A1)")])
    rows, _, _ = hash_batch(batch, cfg)
    check = check_batch(rows, cfg, {})
    target = ingest.write_quarantine(batch, check, tmp_path / "q", None)
    with (target / "quarantine.csv").open(newline="") as fh:
        cells = [cell for row in list(csv.reader(fh))[1:] for cell in row]
    assert '\'=HYPERLINK("http://evil.invalid","x")' in cells and "'@SUM(A1)" in cells and "'=cmd.png" in cells
    assert not any(cell.startswith(("=", "+", "@", "-")) for cell in cells)


def test_ingest_markdown_shows_labellers_text_literally() -> None:
    from flows.stages import ingest_markdown

    text = ingest_markdown({"rejected": {"b1": "bad | [click](javascript:alert(1)) <img src=x>\n# heading"}})
    row = next(line for line in text.splitlines() if line.startswith("| `b1`"))
    assert "`bad \\| [click](javascript:alert(1)) <img src=x> # heading`" in row
    assert row.count(" | ") == 2  # three cells: the detail's pipe is escaped


def test_the_ingest_command_exits_3_when_it_rejects_a_batch(
    tmp_path: Path, new_workspace: Callable[..., Path], write_png: Callable[..., Path]
) -> None:
    import subprocess
    import sys

    from tests.helpers import write_batch as write_good_batch

    ws = new_workspace(tmp_path / "ws")
    write_good_batch(ws / "landing" / "good", 30)
    (ws / "landing" / "unlabelled").mkdir()
    write_png(ws / "landing" / "unlabelled" / "a.png")
    proc = subprocess.run([sys.executable, "-m", "tasks.ingest"], cwd=ws, capture_output=True, text=True, check=False)
    assert proc.returncode == 3, proc.stderr
    assert "rejected unlabelled" in proc.stderr
    assert (ws / "data" / "raw" / "good").is_dir()  # the good batch beside it still went in
    again = subprocess.run([sys.executable, "-m", "tasks.ingest"], cwd=ws, capture_output=True, text=True, check=False)
    # A rejection is recorded once (data/quarantine/unlabelled/rejected.json); a rerun has nothing new.
    assert again.returncode == 0 and (ws / "data" / "quarantine" / "unlabelled" / "rejected.json").is_file()
