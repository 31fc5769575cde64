"""The landing zone: batch names, reading a batch (labels.csv or class folders), paths confined to
the batch, content hashes."""

from __future__ import annotations

import csv
import errno
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from tasks.common.config import PipelineConfig
from tasks.common.errors import PipelineError
from tasks.common.files import FileHashCache, read_json, regular_file_stat, sha256_lines
from tasks.data.manifest import BATCH_INFO, REJECTED_INFO, RELEASED_INFO
from tasks.data.rows import BAD_FILENAME, MISSING_FILE, PATH_OUTSIDE_BATCH, UNREADABLE, RowProblem

LABELS_FILE = "labels.csv"

BATCH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
INVALID_NAME = (
    "invalid batch name: use letters, digits, '.', '_' or '-' (at most 128), starting with a letter or digit; "
    "rename the folder"
)


@dataclass(frozen=True)
class LabeledFile:
    path: str  # relative to the batch directory, POSIX separators
    label: str


def is_candidate_batch(name: str) -> bool:
    return not name.startswith((".", "_"))


def content_hash(rows: list[tuple[str, str, str]]) -> str:
    """Hash of a batch's (path, label, sha256) rows, independent of listing order."""
    return sha256_lines("\t".join(row) for row in sorted(rows))


class BatchPlan(NamedTuple):
    new: list[str]  # to ingest
    skipped: list[str]  # content already ingested (or landed beside, under an earlier name)
    repeats: dict[str, str]  # skipped batch -> the batch of the same content, when the names differ


def plan_batches(landing: dict[str, str], ingested: dict[str, str]) -> BatchPlan:
    """Split landing batches (name -> content hash) into to ingest and already ingested.

    Raises when a batch name was ingested before with other content: landing batches are
    immutable, a corrected batch must come under a new name.
    """
    holder = {digest: name for name, digest in sorted(ingested.items(), reverse=True)}  # the first name wins
    plan = BatchPlan([], [], {})
    for name, digest in sorted(landing.items()):
        if name in ingested and ingested[name] != digest:
            raise PipelineError(
                f"batch {name!r} was already ingested with different content; landing batches are "
                "immutable: deliver the corrected batch under a new name"
            )
        if digest not in holder:
            plan.new.append(name)
            holder[digest] = name  # a second copy of a batch landing in the same run is a no-op too
            continue
        plan.skipped.append(name)
        if holder[digest] != name:
            plan.repeats[name] = holder[digest]
    return plan


class BatchRejected(PipelineError):
    """A structural problem: nothing of the batch can be trusted, so none of it is ingested."""

    def __init__(self, batch: str, reason: str, detail: str) -> None:
        super().__init__(f"batch {batch!r} rejected ({reason}): {detail}")
        self.reason, self.detail = reason, detail


def resolve_inside(batch_dir: Path, rel: str) -> Path:
    """The file ``rel`` names, refusing anything that leaves the batch directory."""
    return InsideBatch(batch_dir).resolve(rel)


class InsideBatch:
    """``resolve_inside`` for the rows of one batch. The batch folder and each folder the rows name
    are resolved once, so a row costs one lstat rather than one per path component (a watch tick
    re-resolves every landed row)."""

    def __init__(self, batch_dir: Path) -> None:
        self.batch_dir = batch_dir
        self._root = str(batch_dir.resolve())
        self._inside = os.path.join(self._root, "")
        self._folders: dict[str, str] = {}

    def resolve(self, rel: str) -> Path:
        return Path(self.resolve_str(rel))

    def resolve_str(self, rel: str) -> str:
        """``resolve`` as a string: a watch tick resolves every landed row, and a ``Path`` per row
        was a third of a tick that finds nothing new."""
        if not rel:
            raise RowProblem(MISSING_FILE, "no path given")
        if "\x00" in rel:  # no file system takes it (and os calls raise ValueError on it)
            raise RowProblem(BAD_FILENAME, "file name contains a NUL character")
        if os.path.isabs(rel) or "\\" in rel:
            raise RowProblem(PATH_OUTSIDE_BATCH, f"path {rel!r} must be relative to the batch, with '/' separators")
        head, name = os.path.split(rel)
        if name in ("", ".", ".."):
            path = os.path.realpath(os.path.join(self.batch_dir, rel))
        else:
            # realpath resolves component by component: realpath(folder) + name is realpath(folder/name)
            # unless name itself is a link.
            if (folder := self._folders.get(head)) is None:
                folder = self._folders[head] = os.path.realpath(os.path.join(self.batch_dir, head))
            path = os.path.join(folder, name)
            if os.path.islink(path):
                path = os.path.realpath(path)
        if path != self._root and not path.startswith(self._inside):
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
    class_dirs = sorted(p for p in batch_dir.iterdir() if p.is_dir())
    if linked := [p.name for p in class_dirs if p.is_symlink()]:
        # Never listed: the link may lead out of the batch. (rglob does not follow nested ones.)
        raise BatchRejected(
            batch_dir.name, "symlinked_class_folder",
            f"class folder(s) {linked} are symbolic links; deliver the folders themselves",
        )  # fmt: skip
    for class_dir in class_dirs:
        for file in sorted(class_dir.rglob("*")):
            if file.is_file() and file.suffix.lower() in extensions:
                rows.append(LabeledFile(file.relative_to(batch_dir).as_posix(), class_dir.name))
    return rows


def read_batch(batch_dir: Path, extensions: tuple[str, ...]) -> tuple[list[LabeledFile], list[str]]:
    """The labelled files of a batch, from labels.csv or class sub-folders, and notes about it.

    A batch folder or labels.csv that is a symbolic link is refused unread: it may lead out of the batch.
    """
    notes: list[str] = []
    if batch_dir.is_symlink():
        raise BatchRejected(
            batch_dir.name, "symlinked_batch", "the batch folder is a symbolic link; deliver the folder itself"
        )
    if (batch_dir / LABELS_FILE).is_symlink():
        raise BatchRejected(
            batch_dir.name, "symlinked_labels", f"{LABELS_FILE} is a symbolic link; deliver the file itself"
        )
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
    where: str | None  # the resolved file; None when the path could not be resolved safely
    sha256: str
    problem: RowProblem | None = None

    @property
    def source(self) -> Path | None:
        return None if self.where is None else Path(self.where)


def _resolve_row(batch: InsideBatch, row: LabeledFile, cache: FileHashCache) -> _Row:
    try:
        try:
            row.path.encode("utf-8")
        except UnicodeEncodeError:
            raise RowProblem(BAD_FILENAME, "file name is not valid UTF-8") from None
        where = batch.resolve_str(row.path)
        digest = cache.sha256(where, info) if (info := regular_file_stat(where)) else ""
    except RowProblem as problem:
        return _Row(row, None, "", problem)
    except OSError as exc:  # a name the file system refuses (too long), or a file it cannot read
        reason = BAD_FILENAME if exc.errno == errno.ENAMETOOLONG else UNREADABLE
        return _Row(row, None, "", RowProblem(reason, f"cannot read the file ({exc.strerror})"))
    return _Row(row, where, digest)


def hash_batch(
    batch_dir: Path, cfg: PipelineConfig, cache: FileHashCache | None = None
) -> tuple[list[_Row], str, list[str]]:
    """The batch's rows with their file hashes, the batch's content hash, and notes."""
    cache = cache or FileHashCache(None)
    labelled, notes = read_batch(batch_dir, cfg.ingest.image_extensions)
    inside = InsideBatch(batch_dir)
    rows = [_resolve_row(inside, row, cache) for row in labelled]
    digest = content_hash([(printable(r.row.path), r.row.label, r.sha256) for r in rows])
    return rows, digest, notes


def printable(rel: str) -> str:
    """A path for CSVs and messages: a file name that is not valid UTF-8 shows its raw bytes as escapes."""
    return os.fsencode(rel).decode("utf-8", "backslashreplace")


@dataclass
class LandingScan:
    """The folders of the landing zone, sorted by name."""

    batches: list[Path] = field(default_factory=list)  # candidates (symlinked ones too: read_batch refuses them)
    invalid: dict[str, str] = field(default_factory=dict)  # printable name -> why it is not a batch
    in_progress: list[str] = field(default_factory=list)  # named '.x' or '_x': still being written


def scan_landing(landing: Path) -> LandingScan:
    """Sort the landing zone's folders into candidate batches, invalid names and batches in progress.
    Never raises on a name: one misnamed folder must not block the others."""
    if not landing.is_dir():
        raise PipelineError(f"landing zone not found: {landing} (set ingest.landing_dir in params.yaml)")
    scan = LandingScan()
    for path in sorted(landing.iterdir()):
        if not path.is_dir():
            continue
        if not is_candidate_batch(path.name):
            scan.in_progress.append(printable(path.name))
        elif BATCH_NAME.match(path.name):
            scan.batches.append(path)
        else:
            scan.invalid[printable(path.name)] = INVALID_NAME
    return scan


def landing_batches(landing: Path) -> list[Path]:
    """The candidate batch folders (invalid names and batches in progress left out)."""
    return scan_landing(landing).batches


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
    """Batches rejected (or held) and not released by an operator: later ingests skip them."""
    if not quarantine.is_dir():
        return set()
    return {p.parent.name for p in quarantine.glob(f"*/{REJECTED_INFO}") if not (p.parent / RELEASED_INFO).is_file()}
