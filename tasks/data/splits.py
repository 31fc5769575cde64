"""A stable split by content hash: a sample's split never moves as batches arrive."""

from __future__ import annotations

import hashlib

from tasks.common.config import PrepareConfig

SPLITS = ("train", "val", "test")

BENCHMARK = "benchmark"


def assign_split(sha256: str, val_fraction: float, test_fraction: float, salt: str = "") -> str:
    """Deterministic split from the content hash: uniform in [0, 1) from a salted digest."""
    digest = hashlib.sha256(f"{salt}:{sha256}".encode()).digest() if salt else bytes.fromhex(sha256)
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def split_rows(rows: list[dict[str, str]], cfg: PrepareConfig) -> dict[str, list[dict[str, str]]]:
    """Unique images (first occurrence wins) per split, sorted by hash for a stable order."""
    unique: dict[str, dict[str, str]] = {}
    for row in rows:
        unique.setdefault(row["sha256"], row)
    splits: dict[str, list[dict[str, str]]] = {s: [] for s in SPLITS}
    for sha in sorted(unique):
        splits[assign_split(sha, cfg.val_fraction, cfg.test_fraction, cfg.split_salt)].append(unique[sha])
    return splits
