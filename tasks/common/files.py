"""Hashing and atomic JSON files."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def regular_file_stat(path: str | Path) -> os.stat_result | None:
    """``os.stat`` of ``path`` (links followed) when it is a regular file; None wherever
    ``Path.is_file()`` is False. One system call where ``is_file()`` and ``stat()`` make two."""
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EBADF):  # what is_file() also reads as "not a file"
            return None
        raise
    return info if stat.S_ISREG(info.st_mode) else None


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

    def sha256(self, file: str | Path, known: os.stat_result | None = None) -> str:
        """``known``: the file's ``os.stat`` when the caller has just taken it."""
        info = known or os.stat(file)
        key, stamp = str(file), [info.st_size, info.st_mtime_ns, info.st_ino]
        entry = self._entries.get(key)
        digest = entry[3] if entry and entry[:3] == stamp else sha256_file(file)
        self._seen[key] = [*stamp, digest]
        return digest

    def save(self) -> None:
        """Keep only the files looked at this time, so the cache never outgrows the landing zone."""
        if self.path is None:
            return
        write_json(self.path, self._seen, indent=None)


def sha256_lines(lines: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def write_json(path: Path, payload: Any, indent: int | None = 2) -> None:
    """Write JSON atomically so a crash never leaves a half-written report behind (``indent=None``:
    compact, for caches)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=indent, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


#: A cell starting with one of these is a formula to Excel, LibreOffice and Google Sheets.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(text: str) -> str:
    """A CSV cell an operator can open in a spreadsheet without running it as a formula (OWASP:
    prefix a single quote)."""
    return f"'{text}" if text.startswith(_FORMULA_START) else text
