"""The manifest table the Great Expectations suite validates, label drift, and the one-screen summary."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.common.config import PipelineConfig, ValidateConfig
from tasks.common.files import sha256_file
from tasks.data.images import check_image
from tasks.data.rows import RowProblem
from tasks.data.splits import BENCHMARK, assign_split

if TYPE_CHECKING:
    import pandas as pd

    from tasks.data.expectations import RuleOutcome


#: How many offending rows the summary names per failed expectation.
MAX_LISTED = 5


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

    p = cfg.prepare
    records = []
    for row in rows:
        checked = reinspect(dict(row), raw / row["batch_id"] / row["path"], cfg.validate_, verify_hashes)
        checked["split"] = assign_split(row["sha256"], p.val_fraction, p.test_fraction, p.split_salt)
        records.append(checked)
    records.extend({**row, "split": BENCHMARK} for row in benchmark)
    table = pd.DataFrame.from_records(records)
    for column in ("decodable", "content_unchanged"):
        table[column] = table.get(column, pd.Series(True, index=table.index)).fillna(True).astype(bool)
    for column in ("width", "height", "channels", "bytes"):
        if column in table:
            table[column] = pd.to_numeric(table[column], errors="coerce").astype("Int64")
    image_key = table["pixel_sha256"] if "pixel_sha256" in table else table["sha256"]
    table["labels_for_image"] = table.groupby(image_key)["label"].transform("nunique")
    table["splits_for_image"] = table.groupby(image_key)["split"].transform("nunique")
    ingested = table[table["split"] != BENCHMARK]
    counts = ingested["label"].value_counts()
    largest = counts.max() if len(counts) else 0
    table["class_count"] = table["label"].map(counts).where(table["split"] != BENCHMARK)
    table["class_imbalance"] = largest / table["class_count"]
    drifts = batch_drifts(ingested.to_dict("records"), cfg.classes)
    # The first batch has nothing to drift from: 0, so the column's max is always defined.
    table["batch_label_drift"] = table["batch_id"].map(drifts).fillna(0.0).where(table["split"] != BENCHMARK)
    return table


def _offending(table: pd.DataFrame, outcome: RuleOutcome) -> list[str]:
    names = []
    for index in outcome.unexpected_rows[:MAX_LISTED]:
        row = table.loc[index]
        names.append(f"{row['batch_id']}/{row['source_path']}")
    if outcome.rule.startswith("label_drift"):
        worst = table.loc[table["batch_label_drift"].idxmax()]
        names.append(f"batch {worst['batch_id']}")
    elif outcome.rule.startswith(("class_imbalance", "class_min")):
        counts = table[table["split"] != BENCHMARK]["label"].value_counts()
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
