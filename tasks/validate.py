"""validate stage: the Great Expectations checkpoint over the manifest table of all ingested data.

Two layers guard training. Ingest checks every row of a new batch (tasks/data/images.py,
tasks/data/screening.py) and quarantines the bad ones. This stage then builds the manifest
table of everything ingested (every batch's manifest plus the split each image falls in and
the fixed benchmark set), re-inspects each image, and runs the ``validate`` checkpoint of
the GX project in ``gx/`` on it (tasks/data/expectations.py). A failed blocking (critical)
expectation fails the stage with a one-screen summary; warnings are reported and pass.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.common.config import PipelineConfig, load_params
from tasks.common.errors import PipelineError
from tasks.common.files import write_json
from tasks.common.stage import run_cli
from tasks.common.workspace import Workspace
from tasks.data.benchmark import benchmark_manifest
from tasks.data.expectations import CheckpointOutcome, expectation_parameters, run_checkpoint
from tasks.data.manifest import read_all_manifests
from tasks.data.validation import build_table, describe, drift_report, render_summary

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidateResult:
    n_images: int
    n_batches: int
    class_counts: dict[str, int]
    warnings: list[str]
    data_docs: str | None


def write_reports(ws: Workspace, report: dict[str, Any], table: pd.DataFrame) -> str:
    write_json(ws.validate_report, report)
    summary = render_summary(report)
    (ws.validate_summary).write_text(summary + "\n", encoding="utf-8")
    table.to_csv(ws.manifest_table, index=False)
    return summary


def run_validate(cfg: PipelineConfig, ws: Workspace) -> ValidateResult:

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
        "label_drift": drift_report(table),
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
        raise PipelineError(f"data validation failed: {failed}. Summary: {ws.validate_summary}")
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
