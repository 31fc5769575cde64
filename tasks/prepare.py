"""prepare stage: a stable split by content hash, and images decoded once into uint8 arrays.

A sample's split is a function of its sha256 (tasks/data/splits.py), so it never moves when
new batches arrive, and identical images always land in the same split. Each split is stored
as ``<split>_images.npy`` (N, S, S, 3 uint8, memory-mappable) plus ``<split>_labels.npy``, so
training epochs never decode PNG/JPEG again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.common.config import PipelineConfig, load_params
from tasks.common.errors import PipelineError
from tasks.common.files import sha256_file, write_json
from tasks.common.stage import run_cli
from tasks.common.workspace import Workspace
from tasks.data.benchmark import benchmark_rows
from tasks.data.images import decode_image
from tasks.data.manifest import read_all_manifests
from tasks.data.prepared import CLASSES_FILE, SUMMARY_FILE, images_path, labels_path, write_index
from tasks.data.splits import BENCHMARK, split_rows

log = logging.getLogger(__name__)


def write_split(out: Path, name: str, paths: list[Path], labels: list[int], size: int) -> None:
    """Decode into a preallocated memmap so memory stays flat however big the split is."""
    np.save(labels_path(out, name), np.asarray(labels, dtype=np.int64))
    if not paths:  # numpy cannot memory-map an empty file
        np.save(images_path(out, name), np.zeros((0, size, size, 3), dtype=np.uint8))
        return
    images = np.lib.format.open_memmap(
        images_path(out, name), mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3)
    )
    started, last = time.monotonic(), time.monotonic()
    for i, path in enumerate(paths):
        images[i] = decode_image(path, size)
        if time.monotonic() - last > 10:
            last = time.monotonic()
            log.info("%s: decoded %d/%d images (%.0f/s)", name, i + 1, len(paths), (i + 1) / (last - started))
    images.flush()


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
    index: list[list[str]] = []
    for split, members in splits.items():
        paths = [ws.raw / r["batch_id"] / r["path"] for r in members]
        write_split(out, split, paths, [class_index[r["label"]] for r in members], size)
        index += ([r["sha256"], split, r["label"], r["batch_id"], r["path"]] for r in members)
        counts[split] = len(members)
    bench = benchmark_rows(ws.benchmark, cfg)
    write_split(out, BENCHMARK, [p for p, _ in bench], [class_index[label] for _, label in bench], size)
    index += (
        [sha256_file(p), BENCHMARK, label, BENCHMARK, p.relative_to(ws.benchmark).as_posix()] for p, label in bench
    )
    counts[BENCHMARK] = len(bench)
    write_index(out, index)
    write_json(out / CLASSES_FILE, list(cfg.classes))
    write_json(out / SUMMARY_FILE, {"counts": counts, "image_size": size, "config": cfg.prepare.model_dump()})
    log.info("prepared %s", ", ".join(f"{k}={v}" for k, v in counts.items()))
    return PrepareResult(counts)


def main() -> None:
    ws = Workspace(Path.cwd())
    run_cli("prepare", lambda: run_prepare(load_params(ws.params), ws))


if __name__ == "__main__":
    main()
