"""ingest: copy new landing batches into DVC-tracked ``data/raw/<batch>/`` with a manifest.

A batch is a directory of the landing zone holding images plus ``labels.csv`` (columns
``path,label``) or class sub-folders (ImageFolder layout). The landing zone is read-only to
us. A batch whose content hash was ingested before (under any name) is a no-op, so running
ingest again is always safe. Directories whose name starts with ``.`` or ``_`` are skipped
(logged): labelers write a batch under such a name and rename it when complete. Any other
name that is not a valid batch name is skipped and reported (``IngestResult.invalid``); it
never blocks the batches beside it. A batch folder, class folder or ``labels.csv`` that is a
symbolic link is rejected unread.

Not a DVC stage (it creates the data DVC versions); the flows run it before the stages.
``python -m tasks.ingest`` exits 0 when every batch was ingested or skipped, 2 on a user error
(nothing done), 3 when it ran but rejected a batch or skipped an invalid name.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.common.config import PipelineConfig, load_params
from tasks.common.dvc import default_remote, dvc_add, dvc_data_hash, push
from tasks.common.errors import PipelineError
from tasks.common.files import FileHashCache, read_json, spreadsheet_safe, write_json
from tasks.common.stage import run_cli
from tasks.common.workspace import Workspace, workspace_lock
from tasks.data.benchmark import benchmark_manifest
from tasks.data.landing import (
    INVALID_NAME,
    BatchRejected,
    hash_batch,
    ingested_batches,
    plan_batches,
    printable,
    rejected_batches,
    scan_landing,
)
from tasks.data.manifest import (
    BATCH_INFO,
    MANIFEST_COLUMNS,
    MANIFEST_NAME,
    QUARANTINE_COLUMNS,
    QUARANTINE_FILE,
    REJECTED_INFO,
    RELEASED_INFO,
    read_all_manifests,
)
from tasks.data.screening import BatchCheck, KnownImage, check_batch, too_many_bad
from tasks.label_noise import load_champion, screen_labels

log = logging.getLogger(__name__)


#: Stored files are named after their real format, whatever extension they landed with.
FORMAT_SUFFIX = {"PNG": ".png", "JPEG": ".jpg"}


@dataclass
class IngestResult:
    ingested: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    #: Batch -> why none of it was ingested (details in data/quarantine/<batch>/).
    rejected: dict[str, str] = field(default_factory=dict)
    #: Batch -> quarantined row count per reason, for batches ingested without their bad rows.
    quarantined: dict[str, dict[str, int]] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)
    #: Landing folder -> why its name is not a batch name (skipped, never read).
    invalid: dict[str, str] = field(default_factory=dict)
    #: Skipped batch -> the batch with the same content that it repeats.
    repeats: dict[str, str] = field(default_factory=dict)
    #: Batch -> the label-noise screen's numbers (tasks/label_noise.py), for every screened batch.
    label_noise: dict[str, dict[str, Any]] = field(default_factory=dict)
    data_hash: str | None = None
    #: Seconds per step of this run ("hash", "check", "copy", "dvc_add", "push"), for the log and benchmarks.
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.ingested)


def known_images(ws: Workspace, cfg: PipelineConfig) -> dict[str, KnownImage]:
    """Pixel hash -> where, for every ingested image and every benchmark image."""
    known = {
        row.get("pixel_sha256") or row["sha256"]: KnownImage(row["label"], f"{row['batch_id']}/{row['source_path']}")
        for row in read_all_manifests(ws.raw)
    }
    if ws.benchmark.is_dir() and any(ws.benchmark.iterdir()):
        for row in benchmark_manifest(ws, cfg):
            known[row["pixel_sha256"]] = KnownImage(row["label"], f"benchmark/{row['source_path']}", benchmark=True)
    return known


def remove_stale_staging(raw: Path) -> None:
    """Staging folders left by a copy that crashed before its rename: never ingested, safe to drop."""
    for staging in raw.glob(".*.partial"):
        log.warning("removing %s left by an interrupted ingest", staging.name)
        shutil.rmtree(staging)


def write_quarantine(batch_dir: Path, check: BatchCheck, quarantine: Path, rejected: BatchRejected | None) -> Path:
    """``data/quarantine/<batch>/``: quarantine.csv (one row per bad row, with its reason), a copy
    of each bad file that lies inside the batch, and rejected.json when the whole batch was."""
    target = quarantine / batch_dir.name
    release = target / RELEASED_INFO
    kept = release.read_bytes() if release.is_file() else None  # an operator's release outlives a rewrite
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    if kept is not None:
        release.write_bytes(kept)
    with (target / QUARANTINE_FILE).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(QUARANTINE_COLUMNS)
        for q in check.quarantined:
            # Labellers' text, opened by operators in a spreadsheet: never a live formula.
            writer.writerow([spreadsheet_safe(printable(q.item.row.path)), spreadsheet_safe(q.item.row.label), q.reason,
                             spreadsheet_safe(q.detail)])  # fmt: skip
            source = q.item.source
            if source is not None and source.is_file() and not source.is_symlink():
                # Named after where the file is, not the row's text: '../' there must not lead out of target.
                copy = target / "files" / printable(source.relative_to(batch_dir.resolve()).as_posix())
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


def _hash_landing(landing: Path, cfg: PipelineConfig, ws: Workspace, result: IngestResult) -> dict[str, tuple]:
    """Hash every candidate batch; structurally broken ones are rejected on the spot."""
    cache = FileHashCache(ws.landing_hashes)
    already_rejected = rejected_batches(ws.quarantine)
    hashed = {}
    scan = scan_landing(landing)
    for name in scan.in_progress:
        log.info("skipped %r: a name starting with '.' or '_' marks a batch in progress; rename it when complete", name)
    for name, why in scan.invalid.items():
        log.warning("skipped landing folder %r: %s", name, why)
    result.invalid = scan.invalid
    for batch_dir in scan.batches:
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
    champion = load_champion(cfg, ws) if names else None
    checks = {}
    for name in names:
        rows, _, notes = hashed[name]
        check = check_batch(rows, cfg, known)
        check.notes[:0] = notes
        if why := too_many_bad(check, cfg):
            _reject(landing / name, check, ws, BatchRejected(name, "too_many_bad_rows", why), result)
            continue
        # The champion screens the good rows; quarantine_rows moves its suspects into check.quarantined.
        if screen := screen_labels(landing / name, check, cfg, ws, champion):
            result.label_noise[name] = screen.info()
        if screen and screen.held:
            _reject(landing / name, check, ws, screen.held, result)
            screen.write(ws.quarantine / name)  # after write_quarantine, which clears the folder
            continue
        if check.quarantined:
            where = write_quarantine(landing / name, check, ws.quarantine, None)
            result.quarantined[name] = dict(check.reasons())
            log.warning("batch %s: %d row(s) quarantined in %s: %s", name, len(check.quarantined), where,
                        ", ".join(f"{r} {n}" for r, n in check.reasons().most_common()))  # fmt: skip
        if screen and screen.result.noisy:
            screen.write(ws.quarantine / name)
        if check.notes:
            result.notes[name] = check.notes
            for note in check.notes:
                log.info("batch %s: %s", name, note)
        checks[name] = check
        known.update((a.info.pixel_sha256, KnownImage(a.label, f"{name}/{a.item.row.path}")) for a in check.accepted)
    return checks


#: The batches copied into data/raw but not yet ``dvc add``-ed (a JSON list; cleared after the add).
ADD_PENDING = "dvc-add.pending"


def mark_pending(pending: Path, names: list[str]) -> None:
    """Add ``names`` to the batches waiting for ``dvc add`` (those of an earlier failed run stay).
    A mark that names no batches is left as it is: it already means "add all of data/raw"."""
    if not pending.exists():
        write_json(pending, sorted(set(names)))
    elif (waiting := pending_batches(pending)) is not None:
        write_json(pending, sorted(set(waiting) | set(names)))


def pending_batches(pending: Path) -> list[str] | None:
    """The batches waiting for ``dvc add``; None when the mark does not name them (written by an
    earlier version of ingest, or damaged), so that all of data/raw is added again."""
    try:
        names = read_json(pending)
    except (OSError, ValueError):
        return None
    return names if isinstance(names, list) and all(isinstance(n, str) for n in names) else None


def add_targets(ws: Workspace, pending: Path) -> list[Path]:
    """What ingest's ``dvc add`` covers: only the new batch folders once data/raw is tracked, so
    its cost follows the size of the batch, not of all the data (a 500-image batch over 61,000
    images: 3.5 s instead of 8.1 s); all of data/raw when it is not tracked yet or the pending
    mark does not name existing folders."""
    names = pending_batches(pending) if pending.exists() else []
    if not ws.raw_dvc.is_file() or not names or not all((ws.raw / n).is_dir() for n in names):
        return [ws.raw]
    return [ws.raw / n for n in names]


def add_batches(ws: Workspace, targets: list[Path]) -> None:
    """``dvc add`` the targets; when DVC cannot update data/raw.dvc's record with the new folders
    alone (its directory listing is gone from the cache), all of data/raw is added instead."""
    try:
        dvc_add(targets, ws.root, own_process=True)
    except PipelineError as exc:
        if targets == [ws.raw]:
            raise
        log.warning("adding the new batches to data/raw.dvc failed (%s); adding all of data/raw", exc)
        dvc_add(ws.raw, ws.root, own_process=True)


#: Marks data added but not yet on the DVC remote (cleared once pushed).
PUSH_PENDING = "dvc-push.pending"


def push_data(ws: Workspace) -> None:
    """With a DVC remote (the cluster profile), the ingested data goes there before anyone is told
    of it: a retrain on another machine pulls it from there. A failed push stays pending and is
    retried by the next run, which announces the data only once it is pushed."""
    pending = ws.cache / PUSH_PENDING
    if not pending.exists():
        return
    if default_remote(ws.root, own_process=True) is None:
        pending.unlink()
        return
    targets = [str(p.relative_to(ws.root)) for p in (ws.raw_dvc, ws.benchmark.with_suffix(".dvc")) if p.is_file()]
    push(targets, ws.root)
    pending.unlink()
    log.info("pushed %s to the DVC remote", ", ".join(targets))


@contextlib.contextmanager
def _timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Add the block's wall time to ``seconds[name]``."""
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = round(seconds.get(name, 0.0) + time.perf_counter() - started, 2)


def run_ingest(cfg: PipelineConfig, ws: Workspace) -> IngestResult:
    landing = (ws.root / cfg.ingest.landing_dir).resolve()
    result = IngestResult()
    with workspace_lock(ws, "ingest"):
        with _timed(result.seconds, "hash"):
            hashed = _hash_landing(landing, cfg, ws, result)
            new, result.skipped, result.repeats = plan_batches(
                {name: h[1] for name, h in hashed.items()}, ingested_batches(ws.raw)
            )
        with _timed(result.seconds, "check"):
            checks = _check_new(new, hashed, landing, cfg, ws, result)
        ws.raw.mkdir(parents=True, exist_ok=True)
        ws.benchmark.mkdir(parents=True, exist_ok=True)  # a dvc.yaml dependency, even when left empty
        remove_stale_staging(ws.raw)
        # Marked before copying, cleared after `dvc add` succeeds: a failure in between is
        # retried by the next run instead of leaving data/raw.dvc stale.
        pending = ws.cache / ADD_PENDING
        if checks:
            mark_pending(pending, list(checks))
        with _timed(result.seconds, "copy"):
            for name, check in checks.items():
                count = _copy_batch(landing / name, check, hashed[name][1], ws.raw)
                log.info("ingested batch %s: %d images", name, count)
        result.ingested = list(checks)
        if pending.exists() or not ws.raw_dvc.is_file():
            # In a process of its own, unlike the parent task's add: DVC lists every folder of the
            # workspace, and this process must read nothing outside the batches it ingests (the
            # hostile-input tests audit its opens). In-process was no faster here (README, Measured).
            with _timed(result.seconds, "dvc_add"):
                add_batches(ws, add_targets(ws, pending))
            pending.unlink(missing_ok=True)
            (ws.cache / PUSH_PENDING).touch()
        with _timed(result.seconds, "push"):
            push_data(ws)
        result.data_hash = dvc_data_hash(ws.raw_dvc)
    for name, original in result.repeats.items():
        log.info("batch %s skipped: same content as batch %s", name, original)
    if same_name := [name for name in result.skipped if name not in result.repeats]:
        log.info("already ingested, skipped: %s", ", ".join(same_name))
    return result


#: Exit code of ``python -m tasks.ingest`` when it ran but rejected a batch or skipped an invalid
#: name, so a script can tell (2 stays "nothing done: fix the input or the params").
EXIT_REJECTED = 3


def main() -> None:
    ws = Workspace(Path.cwd())
    results: list[IngestResult] = []
    run_cli("ingest", lambda: results.append(run_ingest(load_params(ws.params), ws)) or results[-1])
    if results and results[-1].rejected:
        names = ", ".join(sorted(results[-1].rejected))
        print(f"ingest: rejected {names} (why: data/quarantine/<batch>/rejected.json)", file=sys.stderr)
    if results and results[-1].invalid:
        names = ", ".join(repr(name) for name in sorted(results[-1].invalid))
        print(f"ingest: skipped {names}: {INVALID_NAME}", file=sys.stderr)
    if results and (results[-1].rejected or results[-1].invalid):
        raise SystemExit(EXIT_REJECTED)


if __name__ == "__main__":
    main()
