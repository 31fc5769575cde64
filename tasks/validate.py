"""validate stage: the Great Expectations checkpoint over the manifest table of all ingested data.

Two layers guard training. Ingest checks every row of a new batch (``check_image``,
``normalise_label``) and quarantines the bad ones. This stage then builds the manifest
table of everything ingested (every batch's manifest plus the split each image falls in and
the fixed benchmark set), re-inspects each image, and runs the ``validate`` checkpoint of
the GX project in ``gx/`` on it (tasks/expectations.py). A failed blocking (critical)
expectation fails the stage with a one-screen summary; warnings are reported and pass.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from tasks.common import PipelineError, Workspace, run_cli, sha256_file, write_json
from tasks.config import PipelineConfig, ValidateConfig, load_params

if TYPE_CHECKING:
    import pandas as pd

    from tasks.expectations import CheckpointOutcome, RuleOutcome

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS = (
    "path", "source_path", "label", "sha256", "pixel_sha256", "width", "height",
    "mode", "channels", "bytes", "format", "batch_id",
)  # fmt: skip
BENCHMARK_BATCH = "benchmark"
#: How many offending rows the summary names per failed expectation.
MAX_LISTED = 5

# Why a row was quarantined: one short code per cause, reported with a detail.
BAD_FILENAME = "bad_filename"
PATH_OUTSIDE_BATCH = "path_outside_batch"
BLANK_LABEL = "blank_label"
UNKNOWN_LABEL = "unknown_label"
MISSING_FILE = "missing_file"
EMPTY_FILE = "empty_file"
EXTENSION_NOT_ALLOWED = "extension_not_allowed"
UNREADABLE = "unreadable"
FORMAT_NOT_ALLOWED = "format_not_allowed"
MODE_NOT_ALLOWED = "mode_not_allowed"
ANIMATED = "animated"
DECOMPRESSION_BOMB = "decompression_bomb"
TOO_SMALL = "too_small"
TOO_LARGE = "too_large"
DUPLICATE = "duplicate"
LABEL_CONFLICT = "label_conflict"
SPLIT_LEAK = "split_leak"


class RowProblem(Exception):
    """Why one labelled row cannot be used: a reason code and a human detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str
    mode: str
    channels: int
    bytes: int
    #: Hash of the decoded pixels (mode, size, data): the same picture re-encoded has the same one.
    pixel_sha256: str


def check_image(path: Path, cfg: ValidateConfig) -> ImageInfo:
    """Open with allow-listed decoders only, check the header, then decode.

    Sizes are checked from the header before any pixel is decoded, so a decompression bomb
    never gets to allocate its memory; the full decode then catches truncated files.
    """
    if not path.is_file():
        raise RowProblem(MISSING_FILE, "file not found")
    size = path.stat().st_size
    if size == 0:
        raise RowProblem(EMPTY_FILE, "zero-byte file")
    try:
        with Image.open(path, formats=list(cfg.formats)) as img:
            info = _check_header(img, size, cfg)
            img.load()
            digest = hashlib.sha256(f"{img.mode}:{img.width}x{img.height}:".encode() + img.tobytes()).hexdigest()
    except RowProblem:
        raise
    except Image.DecompressionBombError as exc:
        raise RowProblem(DECOMPRESSION_BOMB, str(exc)) from None
    except UnidentifiedImageError:
        found = sniff_format(path)
        if found:
            raise RowProblem(FORMAT_NOT_ALLOWED, f"format {found}; allowed: {', '.join(cfg.formats)}") from None
        raise RowProblem(UNREADABLE, f"not an image (allowed formats: {', '.join(cfg.formats)})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise RowProblem(UNREADABLE, f"cannot decode ({exc.__class__.__name__}: {exc})") from None
    return ImageInfo(**{**info, "pixel_sha256": digest})


def sniff_format(path: Path) -> str | None:
    """The image format a file's first bytes announce, without running any decoder."""
    Image.init()
    with path.open("rb") as fh:
        prefix = fh.read(16)
    for name, (_, accept) in Image.OPEN.items():
        if accept is not None and accept(prefix):
            return name
    return None


def _check_header(img: Image.Image, size: int, cfg: ValidateConfig) -> dict[str, Any]:
    width, height = img.size
    if width * height > cfg.max_pixels:
        raise RowProblem(
            DECOMPRESSION_BOMB, f"{width}x{height} = {width * height:,} pixels > max_pixels {cfg.max_pixels:,}"
        )
    if max(width, height) > cfg.max_image_side:
        raise RowProblem(TOO_LARGE, f"{width}x{height} exceeds max_image_side {cfg.max_image_side}")
    if min(width, height) < cfg.min_image_side:
        raise RowProblem(TOO_SMALL, f"{width}x{height} is below min_image_side {cfg.min_image_side}")
    if img.format not in cfg.formats:
        raise RowProblem(FORMAT_NOT_ALLOWED, f"format {img.format}; allowed: {', '.join(cfg.formats)}")
    if img.mode not in cfg.modes:
        raise RowProblem(MODE_NOT_ALLOWED, f"mode {img.mode}; allowed: {', '.join(cfg.modes)}")
    if getattr(img, "n_frames", 1) > 1:
        raise RowProblem(ANIMATED, f"{img.n_frames} frames; only still images are accepted")
    bands = len(img.getbands())
    return {"width": width, "height": height, "format": img.format, "mode": img.mode, "channels": bands, "bytes": size}


def normalise_label(label: str, classes: Sequence[str]) -> str:
    """The class a label names. Surrounding whitespace and letter case are normalised (labelling
    tools differ on both) when that matches exactly one class; anything else is rejected."""
    if label in classes:
        return label
    stripped = label.strip()
    if not stripped:
        raise RowProblem(BLANK_LABEL, "blank label")
    matches = [c for c in classes if c.casefold() == stripped.casefold()]
    if len(matches) == 1:
        return matches[0]
    raise RowProblem(
        UNKNOWN_LABEL,
        f"unknown label {label!r}; allowed: {', '.join(classes)} "
        "(a new class needs a change to 'classes' in params.yaml)",
    )


# ---------------------------------------------------------------- the manifest table


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


def label_drift(batch: Counter[str], reference: Counter[str], classes: Sequence[str]) -> float:
    """Jensen-Shannon distance (base 2) between two label distributions; NaN without a reference."""
    from scipy.spatial.distance import jensenshannon

    if not reference or not batch:
        return math.nan
    p = np.array([batch[c] for c in classes], dtype=float)
    q = np.array([reference[c] for c in classes], dtype=float)
    return float(jensenshannon(p / p.sum(), q / q.sum(), base=2))


def batch_drifts(rows: Sequence[dict[str, Any]], classes: Sequence[str]) -> dict[str, float]:
    """Each batch's label drift against every batch ingested before it (name order)."""
    per_batch: dict[str, Counter[str]] = {}
    for row in rows:
        per_batch.setdefault(row["batch_id"], Counter())[row["label"]] += 1
    drifts, reference = {}, Counter()
    for batch in sorted(per_batch):
        drifts[batch] = label_drift(per_batch[batch], reference, classes)
        reference += per_batch[batch]
    return drifts


def reinspect(row: dict[str, Any], path: Path, cfg: ValidateConfig, verify_hashes: bool) -> dict[str, Any]:
    """The row as the file on disk is now: decodable, unchanged, and its real properties."""
    try:
        info = check_image(path, cfg)
    except RowProblem as exc:
        return {**row, "decodable": False, "problem": exc.detail}
    unchanged = not verify_hashes or sha256_file(path) == row["sha256"]
    return {**row, **asdict(info), "decodable": True, "content_unchanged": unchanged}


def build_table(
    rows: Sequence[dict[str, str]], raw: Path, benchmark: Sequence[dict[str, str]], cfg: PipelineConfig,
    verify_hashes: bool = True,
) -> pd.DataFrame:  # fmt: skip
    """The manifest table the suite validates: one row per image, plus per-image, per-class and
    per-batch columns the dataset-level expectations read."""
    import pandas as pd

    from tasks.prepare import assign_split

    p = cfg.prepare
    records = []
    for row in rows:
        checked = reinspect(dict(row), raw / row["batch_id"] / row["path"], cfg.validate_, verify_hashes)
        checked["split"] = assign_split(row["sha256"], p.val_fraction, p.test_fraction, p.split_salt)
        records.append(checked)
    records.extend({**row, "split": BENCHMARK_BATCH} for row in benchmark)
    table = pd.DataFrame.from_records(records)
    for column in ("decodable", "content_unchanged"):
        table[column] = table.get(column, pd.Series(True, index=table.index)).fillna(True).astype(bool)
    for column in ("width", "height", "channels", "bytes"):
        if column in table:
            table[column] = pd.to_numeric(table[column], errors="coerce").astype("Int64")
    image_key = table["pixel_sha256"] if "pixel_sha256" in table else table["sha256"]
    table["labels_for_image"] = table.groupby(image_key)["label"].transform("nunique")
    table["splits_for_image"] = table.groupby(image_key)["split"].transform("nunique")
    ingested = table[table["split"] != BENCHMARK_BATCH]
    counts = ingested["label"].value_counts()
    largest = counts.max() if len(counts) else 0
    table["class_count"] = table["label"].map(counts).where(table["split"] != BENCHMARK_BATCH)
    table["class_imbalance"] = largest / table["class_count"]
    drifts = batch_drifts(ingested.to_dict("records"), cfg.classes)
    # The first batch has nothing to drift from: 0, so the column's max is always defined.
    table["batch_label_drift"] = table["batch_id"].map(drifts).fillna(0.0).where(table["split"] != BENCHMARK_BATCH)
    return table


def benchmark_manifest(ws: Workspace, cfg: PipelineConfig) -> list[dict[str, str]]:
    """The fixed benchmark set as manifest rows (empty when there is none)."""
    from tasks.prepare import benchmark_rows  # prepare imports ingest, which imports this module

    rows = []
    for path, label in benchmark_rows(ws.benchmark, cfg):
        info = check_image(path, cfg.validate_)
        rows.append({
            "path": path.relative_to(ws.benchmark).as_posix(), "source_path": path.relative_to(ws.benchmark).as_posix(),
            "label": label, "sha256": sha256_file(path), "batch_id": BENCHMARK_BATCH,
            **asdict(info),
        })  # fmt: skip
    return rows


# ---------------------------------------------------------------- the summary


def _offending(table: pd.DataFrame, outcome: RuleOutcome) -> list[str]:
    names = []
    for index in outcome.unexpected_rows[:MAX_LISTED]:
        row = table.loc[index]
        names.append(f"{row['batch_id']}/{row['source_path']}")
    if outcome.rule.startswith("label_drift"):
        worst = table.loc[table["batch_label_drift"].idxmax()]
        names.append(f"batch {worst['batch_id']}")
    elif outcome.rule.startswith(("class_imbalance", "class_min")):
        counts = table[table["split"] != BENCHMARK_BATCH]["label"].value_counts()
        names.append(
            f"smallest class {counts.idxmin()!r} ({counts.min()}), largest {counts.idxmax()!r} ({counts.max()})"
        )
    return names


def describe(table: pd.DataFrame, outcome: RuleOutcome) -> dict[str, Any]:
    observed = outcome.observed
    if hasattr(observed, "item"):  # numpy scalar
        observed = observed.item()
    if observed is None and outcome.unexpected_count:
        observed = f"{outcome.unexpected_count} row(s)"
    if isinstance(observed, float):
        observed = round(observed, 4)
    return {
        "rule": outcome.rule,
        "expectation": outcome.expectation,
        "severity": outcome.severity,
        "observed": observed if isinstance(observed, (int, float, str, bool)) or observed is None else str(observed),
        "rows": _offending(table, outcome),
        "more_rows": max(0, outcome.unexpected_count - MAX_LISTED),
    }


def render_summary(report: dict[str, Any]) -> str:
    """One screen of markdown: the verdict, then each failed and warned expectation."""
    verdict = "PASSED" if report["passed"] else "FAILED"
    lines = [
        f"## Data validation {verdict}",
        "",
        f"{report['n_images']} images in {report['n_batches']} batch(es); "
        f"{len(report['failures'])} blocking failure(s), {len(report['warnings'])} warning(s).",
        "",
    ]
    if report["failures"] or report["warnings"]:
        lines += ["| severity | rule | observed | offending rows |", "|---|---|---|---|"]
        for item in report["failures"] + report["warnings"]:
            rows = ", ".join(item["rows"]) + (f" (+{item['more_rows']} more)" if item["more_rows"] else "")
            lines.append(f"| {item['severity']} | {item['rule']} | {item['observed']} | {rows or '-'} |")
        lines.append("")
    lines.append(f"Data Docs: {report['data_docs']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- IO


@dataclass(frozen=True)
class ValidateResult:
    n_images: int
    n_batches: int
    class_counts: dict[str, int]
    warnings: list[str]
    data_docs: str | None


def write_reports(ws: Workspace, report: dict[str, Any], table: pd.DataFrame) -> str:
    write_json(ws.reports / "validate.json", report)
    summary = render_summary(report)
    (ws.reports / "validate.md").write_text(summary + "\n", encoding="utf-8")
    table.to_csv(ws.reports / "manifest.csv", index=False)
    return summary


def run_validate(cfg: PipelineConfig, ws: Workspace) -> ValidateResult:
    from tasks.expectations import expectation_parameters, run_checkpoint

    rows = read_all_manifests(ws.raw)
    if not rows:
        raise PipelineError(f"no ingested data in {ws.raw}; drop a batch into the landing zone and run ingest")
    table = build_table(rows, ws.raw, benchmark_manifest(ws, cfg), cfg)
    outcome: CheckpointOutcome = run_checkpoint(ws.root, table, expectation_parameters(cfg))
    batches = sorted({row["batch_id"] for row in rows})
    counts = Counter(row["label"] for row in rows)
    report = {
        "n_images": len(rows),
        "n_batches": len(batches),
        "batches": batches,
        "class_counts": {cls: counts[cls] for cls in cfg.classes},
        "passed": not outcome.failures,
        "failures": [describe(table, r) for r in outcome.failures],
        "warnings": [describe(table, r) for r in outcome.warnings],
        "rules_checked": len(outcome.rules),
        "data_docs": outcome.data_docs,
    }
    summary = write_reports(ws, report, table)
    if outcome.failures:
        log.error("\n%s", summary)
        failed = "; ".join(
            f"{f['rule']} (observed {f['observed']}{': ' + ', '.join(f['rows'][:2]) if f['rows'] else ''})"
            for f in report["failures"]
        )
        raise PipelineError(f"data validation failed: {failed}. Summary: {ws.reports / 'validate.md'}")
    for item in report["warnings"]:
        log.warning("validation warning: %s observed %s (%s)", item["rule"], item["observed"], ", ".join(item["rows"]))
    log.info("validated %d images in %d batch(es); Data Docs: %s", len(rows), len(batches), outcome.data_docs)
    return ValidateResult(
        len(rows), len(batches), report["class_counts"], [w["rule"] for w in report["warnings"]], outcome.data_docs
    )


def main() -> None:
    ws = Workspace(Path.cwd())
    run_cli("validate", lambda: run_validate(load_params(ws.params), ws))


if __name__ == "__main__":
    main()
