"""validate stage: structural checks of every ingested image before anything trains on it.

The checks here are the ones a batch must pass to be ingested at all (readable image, known
label, file present); ingest runs them per batch and this stage re-runs them over the whole
dataset so a hand-edited ``data/raw`` cannot slip past ``dvc repro``. The Great Expectations
suite (distribution and drift checks) plugs in at ``run_validate``.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from tasks.common import PipelineError, Workspace, run_cli, sha256_file, write_json
from tasks.config import PipelineConfig, load_params

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS = ("path", "source_path", "label", "sha256", "width", "height", "batch_id")
#: How many problems a failure message lists before it summarises the rest.
MAX_LISTED = 5


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str
    mode: str


class ImageProblem(Exception):
    """Why one image cannot be used."""


def inspect_image(path: Path, max_side: int) -> ImageInfo:
    """Read the header, check the size, then decode fully so a truncated file is caught."""
    if not path.is_file():
        raise ImageProblem("missing file")
    try:
        with Image.open(path) as img:
            width, height = img.size
            if max(width, height) > max_side:
                raise ImageProblem(f"{width}x{height} exceeds max_image_side {max_side}")
            fmt, mode = img.format or "?", img.mode
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageProblem(f"unreadable image ({exc.__class__.__name__}: {exc})") from None
    return ImageInfo(width, height, fmt, mode)


def unknown_label_problem(label: str, classes: Sequence[str]) -> str | None:
    if label in classes:
        return None
    return (
        f"unknown label {label!r}; allowed: {', '.join(classes)} "
        "(a new class needs a change to 'classes' in params.yaml)"
    )


def summarise_problems(problems: Sequence[str], what: str) -> str:
    listed = "; ".join(problems[:MAX_LISTED])
    more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
    return f"{len(problems)} problem(s) in {what}: {listed}{more}"


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


def find_label_conflicts(rows: Iterable[dict[str, str]]) -> list[str]:
    """The same image content labelled differently in two places."""
    labels: dict[str, set[str]] = {}
    for row in rows:
        labels.setdefault(row["sha256"], set()).add(row["label"])
    return [
        f"image {sha[:12]} has conflicting labels {sorted(found)}"
        for sha, found in sorted(labels.items())
        if len(found) > 1
    ]


def check_dataset(
    rows: Sequence[dict[str, str]], raw: Path, cfg: PipelineConfig, verify_hashes: bool = True
) -> tuple[list[str], Counter[str]]:
    problems: list[str] = []
    for row in rows:
        where = f"{row['batch_id']}/{row['source_path']}"
        if problem := unknown_label_problem(row["label"], cfg.classes):
            problems.append(f"{where}: {problem}")
        path = raw / row["batch_id"] / row["path"]
        try:
            inspect_image(path, cfg.validate_.max_image_side)
        except ImageProblem as exc:
            problems.append(f"{where}: {exc}")
            continue
        if verify_hashes and sha256_file(path) != row["sha256"]:
            problems.append(f"{where}: content changed since ingest (sha256 mismatch)")
    problems.extend(find_label_conflicts(rows))
    counts = Counter(row["label"] for row in rows)
    minimum = cfg.validate_.min_images_per_class
    for cls in cfg.classes:
        if counts[cls] < minimum:
            problems.append(f"class {cls!r} has {counts[cls]} image(s), below min_images_per_class {minimum}")
    return problems, counts


@dataclass(frozen=True)
class ValidateResult:
    n_images: int
    n_batches: int
    class_counts: dict[str, int]


def run_validate(cfg: PipelineConfig, ws: Workspace) -> ValidateResult:
    rows = read_all_manifests(ws.raw)
    if not rows:
        raise PipelineError(f"no ingested data in {ws.raw}; drop a batch into the landing zone and run ingest")
    problems, counts = check_dataset(rows, ws.raw, cfg)
    batches = sorted({row["batch_id"] for row in rows})
    report = {
        "n_images": len(rows),
        "n_batches": len(batches),
        "batches": batches,
        "class_counts": {cls: counts[cls] for cls in cfg.classes},
        "problems": problems,
        "passed": not problems,
    }
    write_json(ws.reports / "validate.json", report)
    if problems:
        raise PipelineError(summarise_problems(problems, "the ingested data"))
    log.info("validated %d images in %d batch(es)", len(rows), len(batches))
    return ValidateResult(len(rows), len(batches), report["class_counts"])


def main() -> None:
    ws = Workspace(Path.cwd())
    run_cli("validate", lambda: run_validate(load_params(ws.params), ws))


if __name__ == "__main__":
    main()
