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
    MANIFEST_COLUMNS,
    MANIFEST_NAME,
    ImageProblem,
    inspect_image,
    read_all_manifests,
    summarise_problems,
    unknown_label_problem,
)

log = logging.getLogger(__name__)

LABELS_FILE = "labels.csv"
BATCH_INFO = "batch.json"
BATCH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class LabeledFile:
    path: str  # relative to the batch directory, POSIX separators
    label: str


@dataclass
class IngestResult:
    ingested: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
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


def resolve_inside(batch_dir: Path, rel: str) -> Path:
    """The file ``rel`` names, refusing anything that leaves the batch directory."""
    if not rel or Path(rel).is_absolute() or "\\" in rel:
        raise PipelineError(f"batch {batch_dir.name!r}: path {rel!r} must be relative to the batch")
    path = (batch_dir / rel).resolve()
    if not path.is_relative_to(batch_dir.resolve()):
        raise PipelineError(f"batch {batch_dir.name!r}: path {rel!r} points outside the batch")
    return path


def _read_labels_csv(batch_dir: Path) -> list[LabeledFile]:
    labels = batch_dir / LABELS_FILE
    try:
        with labels.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = {"path", "label"} - set(reader.fieldnames or ())
            if missing:
                raise PipelineError(
                    f"batch {batch_dir.name!r}: {LABELS_FILE} lacks column(s) {sorted(missing)}; "
                    f"required columns: path,label (found {reader.fieldnames})"
                )
            return [LabeledFile(row["path"] or "", row["label"] or "") for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise PipelineError(f"batch {batch_dir.name!r}: {LABELS_FILE} is not a readable UTF-8 CSV ({exc})") from None


def _read_image_folder(batch_dir: Path, extensions: tuple[str, ...]) -> list[LabeledFile]:
    rows = []
    for class_dir in sorted(p for p in batch_dir.iterdir() if p.is_dir()):
        for file in sorted(class_dir.rglob("*")):
            if file.is_file() and file.suffix.lower() in extensions:
                rows.append(LabeledFile(file.relative_to(batch_dir).as_posix(), class_dir.name))
    return rows


def read_batch(batch_dir: Path, extensions: tuple[str, ...]) -> list[LabeledFile]:
    """The labelled files of a batch, from labels.csv or class sub-folders."""
    if (batch_dir / LABELS_FILE).is_file():
        rows = _read_labels_csv(batch_dir)
    elif any(p.is_dir() for p in batch_dir.iterdir()):
        rows = _read_image_folder(batch_dir, extensions)
    elif any(batch_dir.iterdir()):
        raise PipelineError(
            f"batch {batch_dir.name!r} has no labels: expected {LABELS_FILE} (columns path,label) "
            "or one sub-folder per class"
        )
    else:
        rows = []
    if not rows:
        raise PipelineError(f"batch {batch_dir.name!r} is empty: no labelled images found")
    return rows


@dataclass(frozen=True)
class _Row:
    source: Path
    row: LabeledFile
    sha256: str


@dataclass(frozen=True)
class _Checked:
    item: _Row
    width: int
    height: int


def hash_batch(batch_dir: Path, cfg: PipelineConfig, cache: FileHashCache | None = None) -> tuple[list[_Row], str]:
    """The batch's rows with their file hashes, and the batch's content hash."""
    extensions = cfg.ingest.image_extensions
    cache = cache or FileHashCache(None)
    rows = []
    for row in read_batch(batch_dir, extensions):
        source = resolve_inside(batch_dir, row.path)
        digest = cache.sha256(source) if source.is_file() else ""
        rows.append(_Row(source, row, digest))
    return rows, content_hash([(r.row.path, r.row.label, r.sha256) for r in rows])


def check_batch(
    batch_name: str, rows: list[_Row], cfg: PipelineConfig, known_labels: dict[str, str] | None = None
) -> list[_Checked]:
    """Check every row of a batch; any problem rejects the whole batch.

    ``known_labels`` maps the sha256 of images ingested so far (and of earlier rows of this
    batch) to their label: the same image under another label is a conflict.
    """
    extensions = cfg.ingest.image_extensions
    labels = dict(known_labels or {})
    checked, problems = [], []
    for item in rows:
        where = item.row.path
        if problem := unknown_label_problem(item.row.label, cfg.classes):
            problems.append(f"{where}: {problem}")
            continue
        previous = labels.setdefault(item.sha256, item.row.label) if item.sha256 else item.row.label
        if previous != item.row.label:
            problems.append(f"{where}: labelled {item.row.label!r} but the same image is already labelled {previous!r}")
            continue
        if item.source.suffix.lower() not in extensions:
            problems.append(f"{where}: extension not allowed; allowed: {', '.join(extensions)}")
            continue
        try:
            info = inspect_image(item.source, cfg.validate_.max_image_side)
        except ImageProblem as exc:
            problems.append(f"{where}: {exc}")
            continue
        checked.append(_Checked(item, info.width, info.height))
    if problems:
        raise PipelineError(summarise_problems(problems, f"batch {batch_name!r}"))
    return checked


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


def remove_stale_staging(raw: Path) -> None:
    """Staging folders left by a copy that crashed before its rename: never ingested, safe to drop."""
    for staging in raw.glob(".*.partial"):
        log.warning("removing %s left by an interrupted ingest", staging.name)
        shutil.rmtree(staging)


def _copy_batch(batch_dir: Path, checked: list[_Checked], digest: str, raw: Path) -> int:
    """Copy into a hidden staging dir, then rename: a crash never leaves half a batch."""
    staging = raw / f".{batch_dir.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "images").mkdir(parents=True)
    manifest_rows, seen = [], set()
    for c in checked:
        rel = f"images/{c.item.sha256}{c.item.source.suffix.lower()}"
        if rel not in seen:
            shutil.copyfile(c.item.source, staging / rel)
            seen.add(rel)
        manifest_rows.append(
            [
                rel,
                c.item.row.path,
                c.item.row.label,
                c.item.sha256,
                c.width,
                c.height,
                batch_dir.name,
            ]
        )
    with (staging / MANIFEST_NAME).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(manifest_rows)
    write_json(
        staging / BATCH_INFO,
        {"batch_id": batch_dir.name, "content_hash": digest, "n_images": len(checked)},
    )
    os.replace(staging, raw / batch_dir.name)
    return len(checked)


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


def run_ingest(cfg: PipelineConfig, ws: Workspace) -> IngestResult:
    landing = (ws.root / cfg.ingest.landing_dir).resolve()
    result = IngestResult()
    with workspace_lock(ws, "ingest"):
        cache = FileHashCache(ws.cache / "landing-hashes.json")
        hashed = {p.name: hash_batch(p, cfg, cache) for p in landing_batches(landing)}
        cache.save()
        hashes = {name: digest for name, (_, digest) in hashed.items()}
        new, result.skipped = plan_batches(hashes, ingested_batches(ws.raw))
        # Check every new batch before copying any, so one bad batch ingests nothing.
        known = {row["sha256"]: row["label"] for row in read_all_manifests(ws.raw)}
        checked = {}
        for name in new:
            checked[name] = check_batch(name, hashed[name][0], cfg, known)
            known.update((c.item.sha256, c.item.row.label) for c in checked[name])
        ws.raw.mkdir(parents=True, exist_ok=True)
        ws.benchmark.mkdir(parents=True, exist_ok=True)  # a dvc.yaml dependency, even when left empty
        remove_stale_staging(ws.raw)
        # Marked before copying, cleared after `dvc add` succeeds: a failure in between is
        # retried by the next run instead of leaving data/raw.dvc stale.
        pending = ws.cache / "dvc-add.pending"
        if new:
            pending.touch()
        for name in new:
            count = _copy_batch(landing / name, checked[name], hashes[name], ws.raw)
            log.info("ingested batch %s: %d images", name, count)
        result.ingested = new
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
