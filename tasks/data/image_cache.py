"""check_image results by file content, so a fixed set of images (the benchmark) is decoded once,
not on every ingest."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import PIL

from tasks.common.config import ValidateConfig
from tasks.common.files import write_json
from tasks.data.images import CHECK_VERSION, ImageInfo, check_image

log = logging.getLogger(__name__)

Check = Callable[[Path, ValidateConfig], ImageInfo]


def cache_key(cfg: ValidateConfig) -> str:
    """What a cached result was computed under: CHECK_VERSION, the checks' settings and Pillow's
    version (another decoder may decode a JPEG to other pixels). Any change makes every entry stale."""
    settings = hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:16]
    return f"{CHECK_VERSION}:{PIL.__version__}:{settings}"


class ImageInfoCache:
    """check_image results keyed by the file's sha256: a touched but identical file still hits, a
    changed one misses. Only images that passed are cached; a failing one is checked (and raises)
    every time. With no ``path`` it lives in memory only."""

    def __init__(self, path: Path | None, cfg: ValidateConfig, check: Check = check_image) -> None:
        self.path, self.cfg, self._check = path, cfg, check
        self.key = cache_key(cfg)
        self._entries: dict[str, ImageInfo] = {}
        self._seen: dict[str, ImageInfo] = {}
        if path is not None and path.is_file():
            self._entries = self._load(path)

    def _load(self, path: Path) -> dict[str, ImageInfo]:
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            if stored["key"] != self.key:
                log.info("image cache %s is from another check (%s, now %s): starting afresh", path, stored["key"],
                         self.key)  # fmt: skip
                return {}
            return {digest: ImageInfo(**fields) for digest, fields in stored["images"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable image cache %s (%s: %s)", path, exc.__class__.__name__, exc)
            return {}

    def check(self, path: Path, sha256: str) -> ImageInfo:
        """check_image(path), or its cached result when a file with this sha256 passed before."""
        info = self._entries.get(sha256) or self._check(path, self.cfg)
        self._seen[sha256] = info
        return info

    def save(self) -> None:
        """Keep only the images looked at this time, so the cache never outgrows the set it serves."""
        if self.path is None:
            return
        payload = {"key": self.key, "images": {digest: asdict(info) for digest, info in self._seen.items()}}
        write_json(self.path, payload, indent=None)
