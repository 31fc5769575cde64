"""A bounded fuzz of ingest (fixed seed): corrupted images and corrupted labels.csv files.

Each ingest run takes many batches, each batch many cases, so a few hundred cases cost three
ingests. A sentinel folder beside the landing zone holds what the hostile rows try to reach
(``../``, absolute paths, backslashes, symlinks). For every run:

- ingest raises nothing but a PipelineError (in practice: nothing);
- no file under the sentinel folder is opened or listed (an audit hook records every open), nor
  anything outside the landing zone, the workspace and the Python install; nothing is written
  outside data/ and .cache/;
- every row of a labels.csv that reads as CSV is in its batch's manifest or in quarantine.csv
  with a reason, unless the whole batch is rejected with a reason in rejected.json;
- nothing from the sentinel folder reaches data/raw.
"""

from __future__ import annotations

import csv
import io
import random
import sys
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tasks.common.config import load_params
from tasks.common.errors import PipelineError
from tasks.common.files import read_json, sha256_file, spreadsheet_safe
from tasks.common.workspace import Workspace
from tasks.data.landing import printable
from tasks.data.manifest import MANIFEST_NAME
from tasks.ingest import IngestResult, run_ingest
from tests.helpers import REPO, TINY_CLASSES, recorded_opens, tiny_params

pytestmark = pytest.mark.integration

SEED = 20240512
IMAGE_BATCHES, IMAGE_ROWS = 5, 40  # 200 image cases in one run
CSV_BATCHES = 2 * 50  # 100 labels.csv cases in two runs
HOSTILE_NAMES = ["with space", "new\nline", "-dash", "ünï", "semi;colon"]


# ---------------------------------------------------------------- images


def encoded(rng: random.Random, fmt: str = "PNG", exif: bytes | None = None) -> bytes:
    """A small valid image with pixels of its own."""
    side_w, side_h = rng.randint(8, 24), rng.randint(8, 24)
    pixels = np.random.default_rng(rng.getrandbits(32)).integers(0, 256, (side_h, side_w, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"exif": exif} if exif is not None else {}))
    return buffer.getvalue()


def flip_bytes(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 12)):
        out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


def huge_png(rng: random.Random) -> bytes:
    data = bytearray(encoded(rng))
    width, height = rng.choice([10**5, 2**31 - 1, 70000]), rng.randint(1, 2**31 - 1)
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    if rng.random() < 0.7:  # a consistent header, so only the declared size is wrong
        data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def huge_jpeg(rng: random.Random) -> bytes:
    data = bytearray(encoded(rng, "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = rng.randint(5000, 65535).to_bytes(2, "big") + rng.randint(5000, 65535).to_bytes(2, "big")
    return bytes(data)


def random_exif(rng: random.Random) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = rng.randint(0, 12)  # Orientation, valid or not
    return flip_bytes(rng, exif.tobytes()) if rng.random() < 0.6 else exif.tobytes()


#: name suffix, bytes: one corrupted (or valid) file each.
IMAGE_CASES: dict[str, Callable[[random.Random], tuple[str, bytes]]] = {
    "valid_png": lambda r: (".png", encoded(r)),
    "valid_jpeg": lambda r: (".jpg", encoded(r, "JPEG")),
    "byte_flips": lambda r: (r.choice([".png", ".jpg"]), flip_bytes(r, encoded(r, r.choice(["PNG", "JPEG"])))),
    "truncated": lambda r: (".png", (d := encoded(r))[: r.randrange(1, len(d))]),
    "truncated_jpeg": lambda r: (".jpg", (d := encoded(r, "JPEG"))[: r.randrange(1, len(d))]),
    "random_header": lambda r: (".png", r.randbytes(r.randint(1, 32)) + encoded(r)[r.randint(0, 32) :]),
    "random_bytes": lambda r: (r.choice([".png", ".jpg"]), r.randbytes(r.randint(1, 4000))),
    "zero_bytes": lambda r: (".png", b""),
    "huge_png": lambda r: (".png", huge_png(r)),
    "huge_jpeg": lambda r: (".jpg", huge_jpeg(r)),
    "png_named_jpg": lambda r: (".jpg", encoded(r)),
    "jpeg_named_png": lambda r: (".png", encoded(r, "JPEG")),
    "gif_named_png": lambda r: (".png", encoded(r, "GIF")),
    "bmp_named_png": lambda r: (".png", encoded(r, "BMP")),
    "wrong_extension": lambda r: (r.choice([".txt", ".PNG", ".gif", "", ".png.exe"]), encoded(r)),
    "corrupt_exif_jpeg": lambda r: (".jpg", encoded(r, "JPEG", exif=random_exif(r))),
    "corrupt_exif_png": lambda r: (".png", encoded(r, "PNG", exif=random_exif(r))),
}


def hostile_paths(sentinel: Path) -> list[str]:
    return [
        "../../sentinel/secret.png", "../../../sentinel/secret.png", str(sentinel / "secret.png"),
        "..\\..\\sentinel\\secret.png", "sub/../../../sentinel/secret.png", "peek.png", "peekdir/secret.png",
        "peekdir", "", "missing.png", "./labels.csv", "a\x00b.png", "x" * 5000 + ".png", "~/secret.png",
        "file:///etc/passwd", "//etc/passwd", "C:\\Windows\\win.ini",
    ]  # fmt: skip


def fuzz_label(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.75:
        return rng.choice(TINY_CLASSES)
    return rng.choice([" Red ", "BLUE", "", "purple", "=cmd|' /C calc'!A0", "x" * 3000, "red\nred", "\x00"])


def land_image_batch(rng: random.Random, batch: Path, sentinel: Path) -> list[str]:
    """A batch of corrupted images and hostile rows with a readable labels.csv; its case names."""
    batch.mkdir(parents=True)
    (batch / "peek.png").symlink_to(sentinel / "secret.png")
    (batch / "peekdir").symlink_to(sentinel, target_is_directory=True)
    rows, cases = [], []
    for i in range(IMAGE_ROWS):
        if rng.random() < 0.2 and i:
            cases.append("hostile_path")
            # The last two climb out and back in: inside the batch, but '../' in the row's own text.
            back_in = [f"../{batch.name}/{rows[0][0]}", "../" * 40 + f"{batch.relative_to('/')}/{rows[0][0]}"]
            rows.append((rng.choice(hostile_paths(sentinel) + back_in), fuzz_label(rng)))
            continue
        case = rng.choice(sorted(IMAGE_CASES))
        suffix, data = IMAGE_CASES[case](rng)
        (batch / f"{i:03d}{suffix}").write_bytes(data)
        cases.append(case)
        rows.append((f"{i:03d}{suffix}", fuzz_label(rng)))
        if rng.random() < 0.05:
            rows.append(rows[-1])  # listed twice
    with (batch / "labels.csv").open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([("path", "label"), *rows])
    return cases


# ---------------------------------------------------------------- labels.csv


def long_field(rng: random.Random, text: str) -> str:
    lines = text.split("\n")
    i = rng.randrange(1, len(lines))
    path, _, label = lines[i].partition(",")
    filler = "y" * rng.choice([1000, 50_000, 140_000])  # beyond csv's field limit at 131,072
    lines[i] = f"{filler},{label}" if rng.random() < 0.5 else f"{path},{filler}"
    return "\n".join(lines)


def insert_random_bytes(rng: random.Random, text: str) -> bytes:
    data = text.encode()
    at = rng.randrange(len(data))
    return data[:at] + rng.randbytes(rng.randint(1, 20)) + data[at:]


#: text -> text (or bytes, for encodings): each a corruption of a valid labels.csv.
CSV_CASES: dict[str, Callable[[random.Random, str], str | bytes]] = {
    "random_bytes_inserted": insert_random_bytes,
    "nul_bytes": lambda r, t: "".join(c + ("\x00" if r.random() < 0.05 else "") for c in t),
    "stray_quotes": lambda r, t: "".join(c + ('"' if r.random() < 0.04 else "") for c in t),
    "long_field": long_field,
    "missing_label_column": lambda r, t: t.replace("path,label", r.choice(["path", "path,labels", "file,label"]), 1),
    "missing_fields": lambda r, t: "\n".join(x.split(",")[0] if r.random() < 0.5 else x for x in t.split("\n")),
    "extra_columns": lambda r, t: t.replace("path,label", "path,label,note", 1) + "\nc.png,red,x,y,z\n",
    "extra_fields": lambda r, t: "\n".join(line + ",extra" * r.randint(0, 3) for line in t.split("\n")),
    "utf16": lambda r, t: t.encode(r.choice(["utf-16", "utf-16-le", "utf-32"])),
    "latin1_label": lambda r, t: (t + "\nb.png,ré\n").encode("latin-1", "replace"),
    "shift_jis_label": lambda r, t: (t + "\nb.png,赤\n").encode("shift_jis", "replace"),
    "utf8_bom": lambda r, t: "\ufeff" + t,
    "double_bom": lambda r, t: "\ufeff\ufeff" + t,
    "cr_only": lambda r, t: t.replace("\n", "\r"),
    "header_only": lambda r, t: "path,label\n",
    "empty_file": lambda r, t: "",
    "binary_garbage": lambda r, t: r.randbytes(r.randint(1, 2000)),
    "header_twice": lambda r, t: t + "\npath,label\n",
    "padded_header": lambda r, t: t.replace("path,label", " path , label ", 1),
    "dotdot_path": lambda r, t: t + "\n../../sentinel/secret.png,red\n",
    "absolute_path": lambda r, t: t + "\n{sentinel}/secret.png,red\n",
    "backslash_path": lambda r, t: t + "\n..\\..\\sentinel\\secret.png,red\n",
    "quoted_newline_path": lambda r, t: t + '\n"a.png\n../../sentinel/secret.png",red\n',
    "formula_cells": lambda r, t: t + '\n"=HYPERLINK(""http://x.invalid"")",red\n+a.png,@SUM(1)\n',
}


def land_csv_batch(rng: random.Random, batch: Path, sentinel: Path) -> list[str]:
    """Three good images and a labels.csv corrupted one to three ways; its case names."""
    batch.mkdir(parents=True)
    lines = ["path,label"]
    for name in ("a.png", "b.png", "c.png"):
        (batch / name).write_bytes(encoded(rng))
        lines.append(f"{name},{rng.choice(TINY_CLASSES)}")
    text: str | bytes = "\n".join(lines) + "\n"
    cases = rng.sample(sorted(CSV_CASES), rng.randint(1, 3))
    for case in cases:
        if isinstance(text, bytes):  # already re-encoded: corrupt the bytes further, as bytes
            text = flip_bytes(rng, text) if text else text
            continue
        text = CSV_CASES[case](rng, text)
        if isinstance(text, str):
            text = text.replace("{sentinel}", str(sentinel))
    (batch / "labels.csv").write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    return cases


# ---------------------------------------------------------------- the oracle


def listed_rows(labels: Path) -> list[str] | None:
    """The paths a labels.csv lists, when it reads as a UTF-8 CSV with path and label columns."""
    try:
        with labels.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if not {"path", "label"} <= set(reader.fieldnames or ()):
                return None
            return [row["path"] or "" for row in reader]
    except (UnicodeDecodeError, csv.Error):
        return None


def csv_column(path: Path, column: str) -> list[str]:
    with path.open(newline="", encoding="utf-8") as fh:
        return [row[column] for row in csv.DictReader(fh)]


def check_accounting(ws: Workspace, batch: str, cases: list[str], secret: str) -> None:
    where = f"batch {batch} (cases {cases})"
    rejected = ws.quarantine / batch / "rejected.json"
    quarantine_csv = ws.quarantine / batch / "quarantine.csv"
    if quarantine_csv.is_file():
        assert all(csv_column(quarantine_csv, "reason")), f"{where}: a quarantined row without a reason"
    if rejected.is_file():
        assert read_json(rejected)["reason"], f"{where}: rejected without a reason"
        assert not (ws.raw / batch).exists(), f"{where}: rejected but ingested"
        return
    manifest = ws.raw / batch / MANIFEST_NAME
    assert manifest.is_file(), f"{where}: neither ingested nor rejected"
    listed = listed_rows(ws.landing / batch / "labels.csv")
    assert listed is not None, f"{where}: ingested from a labels.csv that does not read"
    in_manifest = Counter(csv_column(manifest, "source_path"))
    in_quarantine = Counter(csv_column(quarantine_csv, "source_path") if quarantine_csv.is_file() else [])
    for path in listed:
        if in_manifest[path]:
            in_manifest[path] -= 1
        else:
            shown = spreadsheet_safe(printable(path))
            assert in_quarantine[shown], f"{where}: row {path[:80]!r} neither ingested nor quarantined"
            in_quarantine[shown] -= 1
    assert +in_manifest == Counter() and +in_quarantine == Counter(), f"{where}: rows that labels.csv does not list"
    stored = [sha256_file(ws.raw / batch / rel) for rel in csv_column(manifest, "path")]
    assert secret not in stored, f"{where}: the sentinel image was copied in"


# ---------------------------------------------------------------- the test


def fuzz_ingest(ws: Workspace, sentinel: Path) -> IngestResult:
    cfg = load_params(ws.params)
    with recorded_opens() as opened:
        try:  # any other exception fails the test with its traceback: a bug
            result = run_ingest(cfg, ws)
        except PipelineError as exc:  # one clear line, as the contract allows; but no case here stops a whole run
            pytest.fail(f"ingest stopped on a user error: {str(exc)[:300]}")
    touched = sorted({str(o.path) for o in opened if o.path.is_relative_to(sentinel)})
    assert touched == [], f"ingest opened or listed files outside the batch: {touched}"
    allowed = (ws.landing, ws.root / "data", ws.cache, Path(sys.prefix), Path(sys.base_prefix), REPO)
    elsewhere = sorted({str(o.path) for o in opened if not any(o.path.is_relative_to(d) for d in allowed)})
    assert elsewhere == [], f"ingest opened files outside the landing zone and the workspace: {elsewhere[:5]}"
    ours = (ws.root / "data", ws.cache)
    written = sorted({str(o.path) for o in opened if o.write and not any(o.path.is_relative_to(d) for d in ours)})
    assert written == [], f"ingest wrote outside data/ and .cache/: {written[:5]}"
    return result


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory, new_workspace: Callable[..., Path]) -> dict[str, Any]:
    params = tiny_params()
    params["ingest"]["max_bad_fraction"] = 0.9  # most batches are ingested (and copied) without their bad rows
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DVC_NO_ANALYTICS", "1")
        ws = Workspace(new_workspace(tmp_path_factory.mktemp("fuzz") / "ws", params))
        sentinel = (ws.root / "sentinel").resolve()
        sentinel.mkdir()
        rng = random.Random(SEED)
        (sentinel / "secret.png").write_bytes(encoded(rng))
        (sentinel / "labels.csv").write_text("path,label\nsecret.png,red\n")
        cases: dict[str, list[str]] = {}
        results = []
        for i in range(IMAGE_BATCHES):
            cases[f"img-{i}"] = land_image_batch(rng, ws.landing / f"img-{i}", sentinel)
        for name in HOSTILE_NAMES:
            land_csv_batch(rng, ws.landing / name, sentinel)
        results.append(fuzz_ingest(ws, sentinel))
        for run in range(2):
            for i in range(CSV_BATCHES // 2):
                name = f"csv-{run}-{i:02d}"
                cases[name] = land_csv_batch(rng, ws.landing / name, sentinel)
            results.append(fuzz_ingest(ws, sentinel))
    return {"ws": ws, "cases": cases, "results": results, "secret": sha256_file(sentinel / "secret.png")}


def test_fuzzed_ingest_accounts_for_every_listed_row(fuzz: dict[str, Any]) -> None:
    ws = fuzz["ws"]
    for batch, cases in fuzz["cases"].items():
        check_accounting(ws, batch, cases, fuzz["secret"])


def test_fuzzed_ingest_covers_the_outcomes(fuzz: dict[str, Any]) -> None:
    """The corpus is not vacuous: it ingests, quarantines and rejects, for many reasons."""
    results: list[IngestResult] = fuzz["results"]
    ingested = [b for r in results for b in r.ingested]
    rejected = {why.split(":")[0] for r in results for why in r.rejected.values()}
    reasons = {reason for r in results for counts in r.quarantined.values() for reason in counts}
    assert len(ingested) >= 20 and len(rejected) >= 4 and len(reasons) >= 10, (ingested, rejected, reasons)
    assert sum(len(c) for c in fuzz["cases"].values()) >= 300


def test_fuzzed_batch_names_are_reported_not_raised(fuzz: dict[str, Any]) -> None:
    assert sorted(fuzz["results"][0].invalid) == sorted(HOSTILE_NAMES)
