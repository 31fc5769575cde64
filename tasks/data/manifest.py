"""The file formats of ingested data, each defined once: a batch's manifest, batch info, the
quarantine report and the rejection note."""

from __future__ import annotations

import csv
from pathlib import Path

MANIFEST_NAME = "manifest.csv"

MANIFEST_COLUMNS = (
    "path", "source_path", "label", "sha256", "pixel_sha256", "width", "height",
    "mode", "channels", "bytes", "format", "batch_id",
)  # fmt: skip


def read_manifest(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def read_all_manifests(raw: Path) -> list[dict[str, str]]:
    """Every ingested row, batches in name order."""
    rows: list[dict[str, str]] = []
    for manifest in sorted(raw.glob(f"*/{MANIFEST_NAME}")):
        if not manifest.parent.name.startswith("."):  # skip an interrupted ingest's staging dir
            rows.extend(read_manifest(manifest))
    return rows


BATCH_INFO = "batch.json"

QUARANTINE_FILE = "quarantine.csv"

QUARANTINE_COLUMNS = ("source_path", "label", "reason", "detail")

REJECTED_INFO = "rejected.json"

#: An operator's release of a batch held for label noise (tasks/label_noise.py): the next ingest takes it.
RELEASED_INFO = "released.json"
