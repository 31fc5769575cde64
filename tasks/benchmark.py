"""benchmark: set or replace the fixed benchmark set (data/benchmark), cleaned and DVC-tracked.

The folder has a landing batch's layout. Every image is checked as ingest checks it; what
cannot be used in a fixed yardstick is dropped and reported, never silently kept:

- unreadable or disallowed files (the ingest row checks);
- duplicates inside the folder (same pixels): the first by path is kept; copies that disagree
  on the label are all dropped, since nobody knows which label is right;
- images that are also in the training data (data/raw): a benchmark must be unseen.

The kept images are written as one sub-folder per class and ``dvc add``-ed. The evaluate
stage scores the benchmark, and the gate judges on it when one exists.

CLI: ``ctl benchmark FOLDER [--replace]``.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tasks.common.config import PipelineConfig
from tasks.common.dvc import dvc_add
from tasks.common.errors import PipelineError
from tasks.common.workspace import Workspace
from tasks.data.images import check_image
from tasks.data.landing import BatchRejected, landing_batches, read_batch, resolve_inside
from tasks.data.manifest import read_all_manifests
from tasks.data.rows import RowProblem


@dataclass
class BenchmarkReport:
    kept: dict[str, int] = field(default_factory=dict)  # class -> images
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)

    def summary(self) -> str:
        total = sum(self.kept.values())
        lines = [f"benchmark: {total} images kept ({', '.join(f'{c} {n}' for c, n in self.kept.items())})"]
        if self.dropped:
            lines.append(f"dropped {len(self.dropped)}:")
            lines += [f"  {path}: {why}" for path, why in self.dropped[:50]]
            if len(self.dropped) > 50:
                lines.append(f"  ... and {len(self.dropped) - 50} more")
        return "\n".join(lines)


def select_images(cfg: PipelineConfig, folder: Path, training_pixels: dict[str, str]) -> tuple[list, BenchmarkReport]:
    """The (source file, label) pairs to keep and the report of what was dropped and why."""
    try:
        rows, _ = read_batch(folder, cfg.ingest.image_extensions)
    except (BatchRejected, RowProblem) as exc:
        raise PipelineError(f"{folder}: {exc}") from None
    unknown = sorted({row.label for row in rows} - set(cfg.classes))
    if unknown:
        raise PipelineError(
            f"{folder}: labels outside params.yaml classes: {unknown}; allowed: {', '.join(cfg.classes)}"
        )
    report = BenchmarkReport()
    by_pixels: dict[str, list[tuple[str, Path, str]]] = defaultdict(list)
    for row in sorted(rows, key=lambda r: r.path):
        try:
            path = resolve_inside(folder, row.path)
            info = check_image(path, cfg.validate_)
        except RowProblem as exc:
            report.dropped.append((row.path, f"{exc.reason}: {exc.detail}"))
            continue
        by_pixels[info.pixel_sha256].append((row.path, path, row.label))
    kept = []
    for digest, copies in by_pixels.items():
        first, *rest = copies
        labels = {label for _, _, label in copies}
        if digest in training_pixels:
            report.dropped += [(rel, f"also in the training data ({training_pixels[digest]})") for rel, _, _ in copies]
        elif len(labels) > 1:
            report.dropped += [
                (rel, f"same image as {first[0]} with another label {sorted(labels)}") for rel, _, _ in copies
            ]
        else:
            kept.append((first[1], first[2], first[0]))
            report.dropped += [(rel, f"duplicate of {first[0]}") for rel, _, _ in rest]
    report.dropped.sort()
    for cls in cfg.classes:
        report.kept[cls] = sum(1 for _, label, _ in kept if label == cls)
    return kept, report


def training_pixels(cfg: PipelineConfig, ws: Workspace) -> dict[str, str]:
    """Pixel hash -> where it is, for the ingested data and what waits in the landing zone (it
    will be trained on too)."""
    found = (
        {row["pixel_sha256"]: f"data/raw/{row['path']}" for row in read_all_manifests(ws.raw)}
        if ws.raw.is_dir()
        else {}
    )
    landing = ws.root / cfg.ingest.landing_dir
    for batch in landing_batches(landing) if landing.is_dir() else []:
        try:
            rows, _ = read_batch(batch, cfg.ingest.image_extensions)
        except (BatchRejected, RowProblem):
            continue  # ingest will reject it: never trained on
        for row in rows:
            try:
                info = check_image(resolve_inside(batch, row.path), cfg.validate_)
            except RowProblem:
                continue
            found.setdefault(info.pixel_sha256, f"{landing.name}/{batch.name}/{row.path}")
    return found


def set_benchmark(cfg: PipelineConfig, ws: Workspace, folder: Path, replace: bool = False) -> BenchmarkReport:
    folder = folder.resolve()
    if not folder.is_dir():
        raise PipelineError(f"{folder} is not a folder")
    if ws.benchmark.is_dir() and any(ws.benchmark.iterdir()) and not replace:
        raise PipelineError(f"{ws.benchmark} already holds a benchmark; pass --replace to replace it")
    training = training_pixels(cfg, ws)
    kept, report = select_images(cfg, folder, training)
    if not kept:
        raise PipelineError(f"{folder}: no usable benchmark image\n{report.summary()}")
    staging = ws.benchmark.with_name(".benchmark-new")
    shutil.rmtree(staging, ignore_errors=True)
    for source, label, rel in kept:
        target = staging / label / rel.replace("/", "__")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    shutil.rmtree(ws.benchmark, ignore_errors=True)
    staging.rename(ws.benchmark)
    dvc_add(ws.benchmark, ws.root)
    return report
