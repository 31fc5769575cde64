"""The manifest table the Great Expectations suite validates, label drift, and the one-screen summary."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
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
#: Cochran's rule: the chi-square distribution approximates the test statistic's when every
#: expected count is at least this; below it the p-value is computed by simulation.
MIN_EXPECTED = 5
#: Simulated tables for that p-value (resolution 1e-4); seeded, so a re-run gives the same value.
DRIFT_RESAMPLES = 9999


@dataclass(frozen=True)
class LabelDrift:
    """A batch's labels against those of every batch before it: how far apart the distributions
    are (``distance``) and how likely a gap this large is by chance at the batch's size (``p_value``)."""

    distance: float
    p_value: float
    #: ``chi2`` (asymptotic), ``monte_carlo`` (an expected count below ``MIN_EXPECTED``), or
    #: ``none`` (no earlier batch, or a single class in both: nothing to test).
    test: str


def label_drift(batch: Counter[str], reference: Counter[str], classes: Sequence[str]) -> float:
    """Jensen-Shannon distance (base 2) between two label distributions; NaN without a reference."""
    from scipy.spatial.distance import jensenshannon

    if not reference or not batch:
        return math.nan
    p = np.array([batch[c] for c in classes], dtype=float)
    q = np.array([reference[c] for c in classes], dtype=float)
    return float(jensenshannon(p / p.sum(), q / q.sum(), base=2))


def drift_p_value(batch: Counter[str], reference: Counter[str], classes: Sequence[str]) -> tuple[float, str]:
    """The p-value of Pearson's chi-square test of homogeneity of the batch's class counts and the
    reference's, and the test used. With small expected counts (a 40-image batch over 10 classes
    expects 4 per class) the chi-square approximation is poor: the p-value is then simulated over
    tables with the same margins, as R's ``chisq.test(simulate.p.value = TRUE)``."""
    from scipy.stats import MonteCarloMethod, chi2_contingency

    table = np.array([[batch[c] for c in classes], [reference[c] for c in classes]])
    table = table[:, table.sum(axis=0) > 0]  # a class in neither says nothing
    if table[0].sum() == 0 or table[1].sum() == 0 or table.shape[1] < 2:
        return 1.0, "none"
    expected = np.outer(table.sum(axis=1), table.sum(axis=0)) / table.sum()
    if expected.min() >= MIN_EXPECTED:
        return float(chi2_contingency(table, correction=False).pvalue), "chi2"
    simulated = MonteCarloMethod(n_resamples=DRIFT_RESAMPLES, rng=np.random.default_rng(0))
    return float(chi2_contingency(table, correction=False, method=simulated).pvalue), "monte_carlo"


def batch_drifts(rows: Sequence[dict[str, Any]], classes: Sequence[str]) -> dict[str, LabelDrift]:
    """Each batch's label drift against every batch ingested before it (name order)."""
    per_batch: dict[str, Counter[str]] = {}
    for row in rows:
        per_batch.setdefault(row["batch_id"], Counter())[row["label"]] += 1
    drifts, reference = {}, Counter()
    for batch in sorted(per_batch):
        drifts[batch] = LabelDrift(
            label_drift(per_batch[batch], reference, classes), *drift_p_value(per_batch[batch], reference, classes)
        )
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
    # The first batch has nothing to drift from: distance 0, p-value 1 (the columns are always defined).
    in_batches = table["split"] != BENCHMARK
    for column, field, empty in (("batch_label_drift", "distance", 0.0), ("batch_label_drift_p", "p_value", 1.0)):
        values = {batch: getattr(drift, field) for batch, drift in drifts.items()}
        table[column] = table["batch_id"].map(values).fillna(empty).where(in_batches)
    table["batch_label_drift_test"] = table["batch_id"].map({b: d.test for b, d in drifts.items()}).where(in_batches)
    return table


def drift_report(table: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per batch (name order): images, Jensen-Shannon distance and p-value against the batches before it."""
    batches = table[table["split"] != BENCHMARK].groupby("batch_id", sort=True)
    return {
        str(batch): {
            "images": len(rows),
            "js_distance": round(float(rows["batch_label_drift"].iloc[0]), 4),
            "p_value": float(f"{rows['batch_label_drift_p'].iloc[0]:.3g}"),
            "test": str(rows["batch_label_drift_test"].iloc[0]),
        }
        for batch, rows in batches
    }


def describe_drift(batch: str, drift: dict[str, Any]) -> str:
    return (
        f"batch {batch} ({drift['images']} images): JS distance {drift['js_distance']:.3f}, "
        f"p = {drift['p_value']:.2g} ({drift['test']})"
    )


def _offending(table: pd.DataFrame, outcome: RuleOutcome) -> list[str]:
    names = []
    for index in outcome.unexpected_rows[:MAX_LISTED]:
        row = table.loc[index]
        names.append(f"{row['batch_id']}/{row['source_path']}")
    if outcome.rule.startswith("label_drift"):
        worst = str(table.loc[table["batch_label_drift_p"].idxmin(), "batch_id"])
        names.append(describe_drift(worst, drift_report(table)[worst]))
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
    if isinstance(observed, float):  # a small p-value keeps its first digits
        observed = round(observed, 4) if abs(observed) >= 1e-3 else float(f"{observed:.2g}")
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
    if len(drifts := report.get("label_drift", {})) > 1:
        newest = max(drifts)
        lines += [f"Label drift of the newest {describe_drift(newest, drifts[newest])}, against all before it.", ""]
    lines.append(f"Data Docs: {report['data_docs']}")
    return "\n".join(lines)
