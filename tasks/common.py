"""Small helpers shared by every stage: errors, workspace paths, hashing, JSON and the CLI runner."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("ctl")

#: The stages defined in dvc.yaml, in pipeline order. Same names as params.yaml sections,
#: tasks/<name>.py modules and Prefect task names.
DVC_STAGES: tuple[str, ...] = ("validate", "prepare", "train", "evaluate")

#: Prefix of the one-line message a stage prints on a user-facing failure; the flow looks
#: for it in the stage's output so a failed run shows the stage's own words.
ERROR_PREFIX = "error: "


class PipelineError(Exception):
    """A problem with the inputs or configuration that a user must fix (not a bug)."""


class WorkspaceBusy(PipelineError):
    """Another process holds the workspace lock."""


@dataclass(frozen=True)
class Workspace:
    """The paths of a pipeline workspace (a git + DVC repository). dvc.yaml names the same paths."""

    root: Path

    @property
    def landing(self) -> Path:
        return self.root / "landing"

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def quarantine(self) -> Path:
        return self.root / "data" / "quarantine"

    @property
    def benchmark(self) -> Path:
        return self.root / "data" / "benchmark"

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def evaluation(self) -> Path:
        return self.root / "reports" / "evaluation"

    @property
    def cache(self) -> Path:
        """Scratch space outside DVC outputs (DVC deletes outputs before a stage runs)."""
        return self.root / ".cache"

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class FileHashCache:
    """sha256 of files, re-computed only when a file's size, mtime or inode changed (the
    same test git and DVC use), so a watch tick over an unchanged landing zone is cheap.
    With no ``path`` it lives in memory only."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries: dict[str, list] = {}
        self._seen: dict[str, list] = {}
        if path is not None and path.is_file():
            try:
                self._entries = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                log.warning("ignoring unreadable hash cache %s", path)

    def sha256(self, file: Path) -> str:
        stat = file.stat()
        key, stamp = str(file), [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        entry = self._entries.get(key)
        digest = entry[3] if entry and entry[:3] == stamp else sha256_file(file)
        self._seen[key] = [*stamp, digest]
        return digest

    def save(self) -> None:
        """Keep only the files looked at this time, so the cache never outgrows the landing zone."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self._seen), encoding="utf-8")
        os.replace(tmp, self.path)


def sha256_lines(lines: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically so a crash never leaves a half-written report behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


@contextmanager
def workspace_lock(ws: Workspace, name: str, blocking: bool = True) -> Iterator[None]:
    """An exclusive advisory lock on the workspace (``.cache/<name>.lock``), so two ingests,
    or a retrain and a watch tick, never touch the data at the same time."""
    ws.cache.mkdir(parents=True, exist_ok=True)
    with (ws.cache / f"{name}.lock").open("w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkspaceBusy(f"workspace {ws.root} is busy ({name} lock held by another process)") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def setup_cli_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")


def run_cli(stage: str, fn: Callable[[], object]) -> None:
    """Run a stage's ``main`` body: user errors become one line on stderr and exit code 2.

    The closing "finished in" line is the stage's own work time, which bench/orchestration.py
    separates from orchestration overhead.
    """
    setup_cli_logging()
    started = time.monotonic()
    try:
        fn()
        log.info("%s finished in %.1f s", stage, time.monotonic() - started)
    except PipelineError as exc:
        print(f"{ERROR_PREFIX}{stage}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
