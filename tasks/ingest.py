"""ingest: copy new landing batches into DVC-tracked ``data/raw/<batch>/`` with a manifest.

A batch is a directory of the landing zone holding images plus ``labels.csv`` (columns
``path,label``) or class sub-folders (ImageFolder layout). The landing zone is read-only to
us. A batch whose content hash was ingested before (under any name) is a no-op, so running
ingest again is always safe. Directories whose name starts with ``.`` or ``_`` are ignored:
labelers write a batch under such a name and rename it when complete.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tasks.common import (
    FileHashCache,
    PipelineError,
    Workspace,
    read_json,
    run_cli,
    sha256_lines,
    workspace_lock,
    write_json,
)
from tasks.config import PipelineConfig, load_params
from tasks.validate import (
    BAD_FILENAME,
    DUPLICATE,
    EXTENSION_NOT_ALLOWED,
    LABEL_CONFLICT,
    MANIFEST_COLUMNS,
    MANIFEST_NAME,
    MISSING_FILE,
    PATH_OUTSIDE_BATCH,
    SPLIT_LEAK,
    ImageInfo,
    RowProblem,
    check_image,
    normalise_label,
    read_all_manifests,
)

log = logging.getLogger(__name__)

LABELS_FILE = "labels.csv"
BATCH_INFO = "batch.json"
QUARANTINE_FILE = "quarantine.csv"
QUARANTINE_COLUMNS = ("source_path", "label", "reason", "detail")
REJECTED_INFO = "rejected.json"
#: Stored files are named after their real format, whatever extension they landed with.
FORMAT_SUFFIX = {"PNG": ".png", "JPEG": ".jpg"}
BATCH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class LabeledFile:
    path: str  # relative to the batch directory, POSIX separators
    label: str


@dataclass
class IngestResult:
    ingested: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    #: Batch -> why none of it was ingested (details in data/quarantine/<batch>/).
    rejected: dict[str, str] = field(default_factory=dict)
    #: Batch -> quarantined row count per reason, for batches ingested without their bad rows.
    quarantined: dict[str, dict[str, int]] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)
    data_hash: str | None = None

    @property
    def changed(self) -> bool:
        return bool(self.ingested)


# ---------------------------------------------------------------- pure cores


def is_candidate_batch(name: str) -> bool:
    return not name.startswith((".", "_"))


def content_hash(rows: list[tuple[str, str, str]]) -> str:
    """Hash of a batch's (path, label, sha256) rows, independent of listing order."""
    return sha256_lines("\t".join(row) for row in sorted(rows))


def plan_batches(landing: dict[str, str], ingested: dict[str, str]) -> tuple[list[str], list[str]]:
    """Split landing batches (name -> content hash) into (to ingest, already ingested).

    Raises when a batch name was ingested before with other content: landing batches are
    immutable, a corrected batch must come under a new name.
    """
    known_hashes = set(ingested.values())
    new, old = [], []
    for name, digest in sorted(landing.items()):
        if name in ingested and ingested[name] != digest:
            raise PipelineError(
                f"batch {name!r} was already ingested with different content; landing batches are "
                "immutable: deliver the corrected batch under a new name"
            )
        (old if digest in known_hashes else new).append(name)
        known_hashes.add(digest)  # a second copy of a batch landing in the same run is a no-op too
    return new, old


# ---------------------------------------------------------------- reading a batch


class BatchRejected(PipelineError):
    """A structural problem: nothing of the batch can be trusted, so none of it is ingested."""

    def __init__(self, batch: str, reason: str, detail: str) -> None:
        super().__init__(f"batch {batch!r} rejected ({reason}): {detail}")
        self.reason, self.detail = reason, detail


def resolve_inside(batch_dir: Path, rel: str) -> Path:
    """The file ``rel`` names, refusing anything that leaves the batch directory."""
    if not rel:
        raise RowProblem(MISSING_FILE, "no path given")
    if Path(rel).is_absolute() or "\\" in rel:
        raise RowProblem(PATH_OUTSIDE_BATCH, f"path {rel!r} must be relative to the batch, with '/' separators")
    path = (batch_dir / rel).resolve()
    if not path.is_relative_to(batch_dir.resolve()):
        raise RowProblem(PATH_OUTSIDE_BATCH, f"path {rel!r} points outside the batch")
    return path


def _read_labels_csv(batch_dir: Path) -> tuple[list[LabeledFile], list[str]]:
    labels = batch_dir / LABELS_FILE
    try:
        # utf-8-sig drops a byte order mark; the csv module takes CRLF and LF alike.
        with labels.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            found = list(reader.fieldnames or ())
            missing = {"path", "label"} - set(found)
            if missing:
                raise BatchRejected(
                    batch_dir.name, "missing_columns",
                    f"{LABELS_FILE} lacks column(s) {sorted(missing)}; required: path,label (found {found})",
                )  # fmt: skip
            rows = [LabeledFile(row["path"] or "", row["label"] or "") for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise BatchRejected(batch_dir.name, "unreadable_labels", f"{LABELS_FILE} is not a UTF-8 CSV ({exc})") from None
    extra = [c for c in found if c not in ("path", "label")]
    return rows, [f"ignored extra column(s) in {LABELS_FILE}: {extra}"] if extra else []


def _read_image_folder(batch_dir: Path, extensions: tuple[str, ...]) -> list[LabeledFile]:
    rows = []
    for class_dir in sorted(p for p in batch_dir.iterdir() if p.is_dir()):
        for file in sorted(class_dir.rglob("*")):
            if file.is_file() and file.suffix.lower() in extensions:
                rows.append(LabeledFile(file.relative_to(batch_dir).as_posix(), class_dir.name))
    return rows


def read_batch(batch_dir: Path, extensions: tuple[str, ...]) -> tuple[list[LabeledFile], list[str]]:
    """The labelled files of a batch, from labels.csv or class sub-folders, and notes about it."""
    notes: list[str] = []
    if (batch_dir / LABELS_FILE).is_file():
        rows, notes = _read_labels_csv(batch_dir)
    elif any(p.is_dir() for p in batch_dir.iterdir()):
        rows = _read_image_folder(batch_dir, extensions)
    elif any(batch_dir.iterdir()):
        raise BatchRejected(
            batch_dir.name, "no_labels", f"expected {LABELS_FILE} (columns path,label) or one sub-folder per class"
        )
    else:
        rows = []
    if not rows:
        raise BatchRejected(batch_dir.name, "empty_batch", "no labelled images found")
    return rows, notes


@dataclass(frozen=True)
class _Row:
    row: LabeledFile
    source: Path | None  # None when the path could not be resolved safely
    sha256: str
    problem: RowProblem | None = None


@dataclass(frozen=True)
class Accepted:
    item: _Row
    label: str  # the class name, after normalisation
    info: ImageInfo


@dataclass(frozen=True)
class Quarantined:
    item: _Row
    reason: str
    detail: str


@dataclass
class BatchCheck:
    accepted: list[Accepted] = field(default_factory=list)
    quarantined: list[Quarantined] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def bad_fraction(self) -> float:
        total = len(self.accepted) + len(self.quarantined)
        return len(self.quarantined) / total if total else 0.0

    def reasons(self) -> Counter[str]:
        return Counter(q.reason for q in self.quarantined)


def _resolve_row(batch_dir: Path, row: LabeledFile, cache: FileHashCache) -> _Row:
    try:
        try:
            row.path.encode("utf-8")
        except UnicodeEncodeError:
            raise RowProblem(BAD_FILENAME, "file name is not valid UTF-8") from None
        source = resolve_inside(batch_dir, row.path)
    except RowProblem as problem:
        return _Row(row, None, "", problem)
    return _Row(row, source, cache.sha256(source) if source.is_file() else "")


def hash_batch(
    batch_dir: Path, cfg: PipelineConfig, cache: FileHashCache | None = None
) -> tuple[list[_Row], str, list[str]]:
    """The batch's rows with their file hashes, the batch's content hash, and notes."""
    cache = cache or FileHashCache(None)
    labelled, notes = read_batch(batch_dir, cfg.ingest.image_extensions)
    rows = [_resolve_row(batch_dir, row, cache) for row in labelled]
    digest = content_hash([(printable(r.row.path), r.row.label, r.sha256) for r in rows])
    return rows, digest, notes


@dataclass(frozen=True)
class KnownImage:
    label: str
    where: str  # batch/source path, for messages
    benchmark: bool = False


def _check_row(item: _Row, cfg: PipelineConfig) -> Accepted:
    if item.problem:
        raise item.problem
    label = normalise_label(item.row.label, cfg.classes)
    assert item.source is not None
    if item.source.suffix.lower() not in cfg.ingest.image_extensions:
        raise RowProblem(
            EXTENSION_NOT_ALLOWED, f"extension not allowed; allowed: {', '.join(cfg.ingest.image_extensions)}"
        )
    return Accepted(item, label, check_image(item.source, cfg.validate_))


def _against_known(accepted: Accepted, known: KnownImage) -> RowProblem:
    if known.benchmark:
        return RowProblem(SPLIT_LEAK, f"same image as benchmark image {known.where}: the benchmark must stay unseen")
    if known.label != accepted.label:
        return RowProblem(
            LABEL_CONFLICT, f"labelled {accepted.label!r} but the same image is {known.label!r} in {known.where}"
        )
    return RowProblem(DUPLICATE, f"same image already ingested as {known.where}")


def check_batch(rows: list[_Row], cfg: PipelineConfig, known: dict[str, KnownImage]) -> BatchCheck:
    """Sort a batch's rows into accepted and quarantined (with the reason).

    ``known`` maps the pixel hash of every image ingested so far, and of the benchmark, to
    where it is: the same picture again is a duplicate, a label conflict or a split leak.
    Rows of one batch that show the same picture under different labels are all quarantined:
    nothing says which label is right.
    """
    result = BatchCheck()
    candidates: list[Accepted] = []
    for item in rows:
        try:
            candidates.append(_check_row(item, cfg))
        except RowProblem as problem:
            result.quarantined.append(Quarantined(item, problem.reason, problem.detail))
    labels_in_batch: dict[str, set[str]] = {}
    for acc in candidates:
        labels_in_batch.setdefault(acc.info.pixel_sha256, set()).add(acc.label)
    seen: dict[str, Accepted] = {}
    for acc in candidates:
        pixels = acc.info.pixel_sha256
        if len(labels_in_batch[pixels]) > 1:
            problem = RowProblem(
                LABEL_CONFLICT, f"the same image has labels {sorted(labels_in_batch[pixels])} in this batch"
            )
        elif pixels in known:
            problem = _against_known(acc, known[pixels])
        elif pixels in seen:
            problem = RowProblem(DUPLICATE, f"same image as {seen[pixels].item.row.path} in this batch")
        else:
            seen[pixels] = acc
            result.accepted.append(acc)
            continue
        result.quarantined.append(Quarantined(acc.item, problem.reason, problem.detail))
    normalised = [a for a in result.accepted if a.label != a.item.row.label]
    if normalised:
        first = normalised[0]
        example = f"{first.item.row.label!r} -> {first.label!r}"
        result.notes.append(f"{len(normalised)} label(s) normalised for whitespace/case, e.g. {example}")
    return result


def too_many_bad(check: BatchCheck, cfg: PipelineConfig) -> str | None:
    """Why the whole batch is rejected, or None when its good rows can be ingested."""
    if not check.accepted:
        return "no row of the batch is usable"
    if check.bad_fraction > cfg.ingest.max_bad_fraction:
        reasons = ", ".join(f"{reason} {n}" for reason, n in check.reasons().most_common())
        return (
            f"{len(check.quarantined)} of {len(check.accepted) + len(check.quarantined)} rows are bad "
            f"({check.bad_fraction:.0%} > max_bad_fraction {cfg.ingest.max_bad_fraction:.0%}): {reasons}"
        )
    return None


# ---------------------------------------------------------------- IO


def landing_batches(landing: Path) -> list[Path]:
    if not landing.is_dir():
        raise PipelineError(f"landing zone not found: {landing} (set ingest.landing_dir in params.yaml)")
    batches = []
    for path in sorted(landing.iterdir()):
        if not path.is_dir() or not is_candidate_batch(path.name):
            continue
        if not BATCH_NAME.match(path.name):
            raise PipelineError(
                f"invalid batch name {path.name!r}: use letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        batches.append(path)
    return batches


def ingested_batches(raw: Path) -> dict[str, str]:
    """Batch name -> content hash of everything already in data/raw."""
    if not raw.is_dir():
        return {}
    return {
        p.parent.name: read_json(p)["content_hash"]
        for p in sorted(raw.glob(f"*/{BATCH_INFO}"))
        if is_candidate_batch(p.parent.name)
    }


def rejected_batches(quarantine: Path) -> set[str]:
    return {p.parent.name for p in quarantine.glob(f"*/{REJECTED_INFO}")} if quarantine.is_dir() else set()


def known_images(ws: Workspace, cfg: PipelineConfig) -> dict[str, KnownImage]:
    """Pixel hash -> where, for every ingested image and every benchmark image."""
    known = {
        row.get("pixel_sha256") or row["sha256"]: KnownImage(row["label"], f"{row['batch_id']}/{row['source_path']}")
        for row in read_all_manifests(ws.raw)
    }
    if ws.benchmark.is_dir() and any(ws.benchmark.iterdir()):
        from tasks.validate import benchmark_manifest

        for row in benchmark_manifest(ws, cfg):
            known[row["pixel_sha256"]] = KnownImage(row["label"], f"benchmark/{row['source_path']}", benchmark=True)
    return known


def remove_stale_staging(raw: Path) -> None:
    """Staging folders left by a copy that crashed before its rename: never ingested, safe to drop."""
    for staging in raw.glob(".*.partial"):
        log.warning("removing %s left by an interrupted ingest", staging.name)
        shutil.rmtree(staging)


def printable(rel: str) -> str:
    """A path for CSVs and messages: a file name that is not valid UTF-8 shows its raw bytes as escapes."""
    return os.fsencode(rel).decode("utf-8", "backslashreplace")


def write_quarantine(batch_dir: Path, check: BatchCheck, quarantine: Path, rejected: BatchRejected | None) -> Path:
    """``data/quarantine/<batch>/``: quarantine.csv (one row per bad row, with its reason), a copy
    of each bad file that lies inside the batch, and rejected.json when the whole batch was."""
    target = quarantine / batch_dir.name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    with (target / QUARANTINE_FILE).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(QUARANTINE_COLUMNS)
        for q in check.quarantined:
            writer.writerow([printable(q.item.row.path), q.item.row.label, q.reason, q.detail])
            source = q.item.source
            if source is not None and source.is_file() and not source.is_symlink():
                copy = target / "files" / printable(q.item.row.path)
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, copy)
    if rejected:
        write_json(
            target / REJECTED_INFO, {"batch_id": batch_dir.name, "reason": rejected.reason, "detail": rejected.detail}
        )
    return target


def _copy_batch(batch_dir: Path, check: BatchCheck, digest: str, raw: Path) -> int:
    """Copy into a hidden staging dir, then rename: a crash never leaves half a batch."""
    staging = raw / f".{batch_dir.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "images").mkdir(parents=True)
    manifest_rows = []
    for acc in check.accepted:
        info, item = acc.info, acc.item
        rel = f"images/{item.sha256}{FORMAT_SUFFIX.get(info.format, item.source.suffix.lower())}"
        shutil.copyfile(item.source, staging / rel)
        manifest_rows.append([
            rel, item.row.path, acc.label, item.sha256, info.pixel_sha256, info.width, info.height,
            info.mode, info.channels, info.bytes, info.format, batch_dir.name,
        ])  # fmt: skip
    with (staging / MANIFEST_NAME).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(manifest_rows)
    write_json(
        staging / BATCH_INFO,
        {
            "batch_id": batch_dir.name, "content_hash": digest, "n_images": len(check.accepted),
            "n_quarantined": len(check.quarantined), "notes": check.notes,
        },
    )  # fmt: skip
    os.replace(staging, raw / batch_dir.name)
    return len(check.accepted)


def run_dvc(args: list[str], cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise PipelineError(f"dvc {' '.join(args)} failed: {detail[-1] if detail else proc.returncode}")
    return proc.stdout


def dvc_data_hash(dvc_file: Path) -> str | None:
    """The md5 DVC recorded for a tracked directory (None when it is not tracked yet)."""
    if not dvc_file.is_file():
        return None
    outs = yaml.safe_load(dvc_file.read_text(encoding="utf-8")).get("outs") or [{}]
    return outs[0].get("md5")


def _hash_landing(landing: Path, cfg: PipelineConfig, ws: Workspace, result: IngestResult) -> dict[str, tuple]:
    """Hash every candidate batch; structurally broken ones are rejected on the spot."""
    cache = FileHashCache(ws.cache / "landing-hashes.json")
    already_rejected = rejected_batches(ws.quarantine)
    hashed = {}
    for batch_dir in landing_batches(landing):
        if batch_dir.name in already_rejected:
            continue  # landing batches are immutable: a fixed one comes under a new name
        try:
            hashed[batch_dir.name] = hash_batch(batch_dir, cfg, cache)
        except BatchRejected as exc:
            _reject(batch_dir, BatchCheck(), ws, exc, result)
    cache.save()
    return hashed


def _reject(batch_dir: Path, check: BatchCheck, ws: Workspace, exc: BatchRejected, result: IngestResult) -> None:
    where = write_quarantine(batch_dir, check, ws.quarantine, exc)
    result.rejected[batch_dir.name] = f"{exc.reason}: {exc.detail}"
    log.error("%s; nothing of it was ingested (see %s)", exc, where)


def _check_new(names: list[str], hashed: dict[str, tuple], landing: Path, cfg: PipelineConfig, ws: Workspace,
               result: IngestResult) -> dict[str, BatchCheck]:  # fmt: skip
    """Check every new batch before copying any; a later batch is checked against earlier ones."""
    known = known_images(ws, cfg) if names else {}
    checks = {}
    for name in names:
        rows, _, notes = hashed[name]
        check = check_batch(rows, cfg, known)
        check.notes[:0] = notes
        if why := too_many_bad(check, cfg):
            _reject(landing / name, check, ws, BatchRejected(name, "too_many_bad_rows", why), result)
            continue
        if check.quarantined:
            where = write_quarantine(landing / name, check, ws.quarantine, None)
            result.quarantined[name] = dict(check.reasons())
            log.warning("batch %s: %d row(s) quarantined in %s: %s", name, len(check.quarantined), where,
                        ", ".join(f"{r} {n}" for r, n in check.reasons().most_common()))  # fmt: skip
        if check.notes:
            result.notes[name] = check.notes
            for note in check.notes:
                log.info("batch %s: %s", name, note)
        checks[name] = check
        known.update((a.info.pixel_sha256, KnownImage(a.label, f"{name}/{a.item.row.path}")) for a in check.accepted)
    return checks


def run_ingest(cfg: PipelineConfig, ws: Workspace) -> IngestResult:
    landing = (ws.root / cfg.ingest.landing_dir).resolve()
    result = IngestResult()
    with workspace_lock(ws, "ingest"):
        hashed = _hash_landing(landing, cfg, ws, result)
        new, result.skipped = plan_batches({name: h[1] for name, h in hashed.items()}, ingested_batches(ws.raw))
        checks = _check_new(new, hashed, landing, cfg, ws, result)
        ws.raw.mkdir(parents=True, exist_ok=True)
        ws.benchmark.mkdir(parents=True, exist_ok=True)  # a dvc.yaml dependency, even when left empty
        remove_stale_staging(ws.raw)
        # Marked before copying, cleared after `dvc add` succeeds: a failure in between is
        # retried by the next run instead of leaving data/raw.dvc stale.
        pending = ws.cache / "dvc-add.pending"
        if checks:
            pending.parent.mkdir(parents=True, exist_ok=True)
            pending.touch()
        for name, check in checks.items():
            count = _copy_batch(landing / name, check, hashed[name][1], ws.raw)
            log.info("ingested batch %s: %d images", name, count)
        result.ingested = list(checks)
        raw_dvc = ws.raw.with_suffix(".dvc")
        if pending.exists() or not raw_dvc.is_file():
            run_dvc(["add", "--quiet", str(ws.raw.relative_to(ws.root))], ws.root)
            pending.unlink(missing_ok=True)
        result.data_hash = dvc_data_hash(raw_dvc)
    if result.skipped:
        log.info("already ingested, skipped: %s", ", ".join(result.skipped))
    return result


def main() -> None:
    ws = Workspace(Path.cwd())
    run_cli("ingest", lambda: run_ingest(load_params(ws.params), ws))


if __name__ == "__main__":
    main()
