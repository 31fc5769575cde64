"""prepare stage: a stable split by content hash, and images decoded once into uint8 arrays.

A sample's split is a function of its sha256 (and the salt), so it never moves when new
batches arrive, and identical images always land in the same split. Each split is stored as
``<split>_images.npy`` (N, S, S, 3 uint8, memory-mappable) plus ``<split>_labels.npy``, so
training epochs never decode PNG/JPEG again.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.common import PipelineError, Workspace, run_cli, write_json
from tasks.config import PipelineConfig, PrepareConfig, load_params
from tasks.ingest import read_batch, resolve_inside
from tasks.validate import RowProblem, read_all_manifests

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
BENCHMARK = "benchmark"
INDEX_COLUMNS = ("sha256", "split", "label", "batch_id", "path")


# ---------------------------------------------------------------- pure cores


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
    if cfg.val_fraction + cfg.test_fraction >= 1:
        raise PipelineError(
            f"prepare.val_fraction + prepare.test_fraction must be < 1, got {cfg.val_fraction + cfg.test_fraction}"
        )
    unique: dict[str, dict[str, str]] = {}
    for row in rows:
        unique.setdefault(row["sha256"], row)
    splits: dict[str, list[dict[str, str]]] = {s: [] for s in SPLITS}
    for sha in sorted(unique):
        splits[assign_split(sha, cfg.val_fraction, cfg.test_fraction, cfg.split_salt)].append(unique[sha])
    return splits


def decode_image(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as img:
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(img, dtype=np.uint8)


# ---------------------------------------------------------------- IO


def write_split(out: Path, name: str, paths: list[Path], labels: list[int], size: int) -> None:
    """Decode into a preallocated memmap so memory stays flat however big the split is."""
    np.save(out / f"{name}_labels.npy", np.asarray(labels, dtype=np.int64))
    if not paths:  # numpy cannot memory-map an empty file
        np.save(out / f"{name}_images.npy", np.zeros((0, size, size, 3), dtype=np.uint8))
        return
    images = np.lib.format.open_memmap(
        out / f"{name}_images.npy", mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3)
    )
    started, last = time.monotonic(), time.monotonic()
    for i, path in enumerate(paths):
        images[i] = decode_image(path, size)
        if time.monotonic() - last > 10:
            last = time.monotonic()
            log.info("%s: decoded %d/%d images (%.0f/s)", name, i + 1, len(paths), (i + 1) / (last - started))
    images.flush()


def benchmark_rows(benchmark_dir: Path, cfg: PipelineConfig) -> list[tuple[Path, str]]:
    """The fixed benchmark set (same layout as a landing batch), or nothing when absent."""
    if not benchmark_dir.is_dir() or not any(benchmark_dir.iterdir()):
        return []
    classes = cfg.classes
    try:
        labelled, _ = read_batch(benchmark_dir, cfg.ingest.image_extensions)
        rows = [(resolve_inside(benchmark_dir, r.path), r.label) for r in labelled]
    except RowProblem as exc:  # the benchmark is ours, not a labeler's: any problem is fatal
        raise PipelineError(f"benchmark set {benchmark_dir}: {exc}") from None
    unknown = sorted({label for _, label in rows} - set(classes))
    if unknown:
        raise PipelineError(f"benchmark set has labels outside 'classes': {unknown}; allowed: {', '.join(classes)}")
    return rows


@dataclass(frozen=True)
class PrepareResult:
    counts: dict[str, int]


def run_prepare(cfg: PipelineConfig, ws: Workspace) -> PrepareResult:
    rows = read_all_manifests(ws.raw)
    if not rows:
        raise PipelineError(f"no ingested data in {ws.raw}")
    class_index = {c: i for i, c in enumerate(cfg.classes)}
    out = ws.prepared
    out.mkdir(parents=True, exist_ok=True)
    size = cfg.prepare.image_size
    splits = split_rows(rows, cfg.prepare)
    if not splits["train"]:
        raise PipelineError("the train split is empty; ingest more images")
    counts: dict[str, int] = {}
    with (out / "index.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(INDEX_COLUMNS)
        for split, members in splits.items():
            paths = [ws.raw / r["batch_id"] / r["path"] for r in members]
            write_split(out, split, paths, [class_index[r["label"]] for r in members], size)
            writer.writerows([r["sha256"], split, r["label"], r["batch_id"], r["path"]] for r in members)
            counts[split] = len(members)
    bench = benchmark_rows(ws.benchmark, cfg)
    write_split(out, BENCHMARK, [p for p, _ in bench], [class_index[label] for _, label in bench], size)
    counts[BENCHMARK] = len(bench)
    write_json(out / "classes.json", list(cfg.classes))
    write_json(out / "summary.json", {"counts": counts, "image_size": size, "config": cfg.prepare.model_dump()})
    log.info("prepared %s", ", ".join(f"{k}={v}" for k, v in counts.items()))
    return PrepareResult(counts)


def main() -> None:
    ws = Workspace(Path.cwd())
    run_cli("prepare", lambda: run_prepare(load_params(ws.params), ws))


if __name__ == "__main__":
    main()
