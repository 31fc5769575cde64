"""The fixed benchmark set in data/benchmark: same layout as a landing batch, scored apart from
the pipeline's own split."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from tasks.common.config import PipelineConfig
from tasks.common.errors import PipelineError
from tasks.common.files import sha256_file
from tasks.common.workspace import Workspace
from tasks.data.image_cache import Check, ImageInfoCache
from tasks.data.images import check_image
from tasks.data.landing import InsideBatch, read_batch
from tasks.data.rows import RowProblem
from tasks.data.splits import BENCHMARK


def benchmark_rows(benchmark_dir: Path, cfg: PipelineConfig) -> list[tuple[Path, str]]:
    """The fixed benchmark set (same layout as a landing batch), or nothing when absent."""
    if not benchmark_dir.is_dir() or not any(benchmark_dir.iterdir()):
        return []
    classes = cfg.classes
    try:
        labelled, _ = read_batch(benchmark_dir, cfg.ingest.image_extensions)
        inside = InsideBatch(benchmark_dir)
        rows = [(inside.resolve(r.path), r.label) for r in labelled]
    except RowProblem as exc:  # the benchmark is ours, not a labeler's: any problem is fatal
        raise PipelineError(f"benchmark set {benchmark_dir}: {exc}") from None
    unknown = sorted({label for _, label in rows} - set(classes))
    if unknown:
        raise PipelineError(f"benchmark set has labels outside 'classes': {unknown}; allowed: {', '.join(classes)}")
    return rows


def benchmark_manifest(ws: Workspace, cfg: PipelineConfig, check: Check = check_image) -> list[dict[str, str]]:
    """The fixed benchmark set as manifest rows (empty when there is none). Each file is decoded
    only when its content is new to the cache in ``ws.benchmark_checks``."""
    cache = ImageInfoCache(ws.benchmark_checks, cfg.validate_, check)
    rows = []
    for path, label in benchmark_rows(ws.benchmark, cfg):
        sha256 = sha256_file(path)
        info = cache.check(path, sha256)
        rows.append({
            "path": path.relative_to(ws.benchmark).as_posix(), "source_path": path.relative_to(ws.benchmark).as_posix(),
            "label": label, "sha256": sha256, "batch_id": BENCHMARK,
            **asdict(info),
        })  # fmt: skip
    if rows:
        cache.save()
    return rows
