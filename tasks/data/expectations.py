"""The Great Expectations project (``gx/``) that the validate stage runs.

The suite, the validation definition and the checkpoint live in ``gx/`` (a GX 1.x file data
context) and are committed, so a reviewer reads the rules in the repository. Thresholds are
not in the suite: every one is a ``$PARAMETER`` filled from params.yaml at run time, so the
suite file only changes when a rule does. This module is the single place the suite is
written from (``python -m tasks.data.expectations`` regenerates ``gx/``; a test checks the
committed files match) and the code that runs the checkpoint.

Importing great_expectations takes seconds, so nothing here imports it at module level.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.common.errors import PipelineError

if TYPE_CHECKING:
    import pandas as pd

    from tasks.common.config import PipelineConfig

log = logging.getLogger(__name__)

GX_DIR = "gx"
DATASOURCE = "pipeline"
ASSET = "manifest"
SUITE = "manifest"
CHECKPOINT = "validate"
CRITICAL, WARNING = "critical", "warning"

#: The manifest table's columns and the pandas dtype kind each must have.
COLUMN_KINDS = {
    "path": "str",
    "source_path": "str",
    "label": "str",
    "sha256": "str",
    "pixel_sha256": "str",
    "width": "int64",
    "height": "int64",
    "mode": "str",
    "channels": "int64",
    "bytes": "int64",
    "format": "str",
    "batch_id": "str",
    "split": "str",
}
LABEL_PATTERN = r"^\S(?:.*\S)?$"  # not blank, no surrounding whitespace


def _param(name: str) -> dict[str, str]:
    return {"$PARAMETER": name}


def suite_expectations() -> list[Any]:
    """Every rule, in the order the summary lists them. ``meta.rule`` is the short name users see."""
    import great_expectations.expectations as gxe

    def rule(expectation: Any, name: str, severity: str = CRITICAL) -> Any:
        expectation.meta = {"rule": name}
        expectation.severity = severity
        return expectation

    rules = [
        rule(gxe.ExpectTableColumnsToMatchSet(column_set=list(COLUMN_KINDS), exact_match=False), "required_columns"),
        *(
            rule(gxe.ExpectColumnValuesToBeOfType(column=col, type_=kind), f"type:{col}")
            for col, kind in COLUMN_KINDS.items()
            if kind != "str"
        ),
        rule(gxe.ExpectColumnValuesToNotBeNull(column="label"), "label_not_null"),
        rule(gxe.ExpectColumnValuesToMatchRegex(column="label", regex=LABEL_PATTERN), "label_not_blank"),
        rule(gxe.ExpectColumnValuesToBeInSet(column="label", value_set=_param("classes")), "label_in_classes"),
        rule(gxe.ExpectColumnValuesToBeUnique(column="sha256"), "sha256_unique"),
        rule(gxe.ExpectColumnValuesToBeBetween(column="labels_for_image", min_value=1, max_value=1), "label_conflict"),
        rule(gxe.ExpectColumnValuesToBeBetween(column="splits_for_image", min_value=1, max_value=1), "split_leak"),
        rule(gxe.ExpectColumnValuesToBeInSet(column="decodable", value_set=[True]), "decodable"),
        rule(gxe.ExpectColumnValuesToBeInSet(column="content_unchanged", value_set=[True]), "content_unchanged"),
        rule(gxe.ExpectColumnValuesToBeInSet(column="format", value_set=_param("formats")), "format_allowed"),
        rule(gxe.ExpectColumnValuesToBeInSet(column="mode", value_set=_param("modes")), "mode_allowed"),
        *(
            rule(
                gxe.ExpectColumnValuesToBeBetween(
                    column=side, min_value=_param("min_image_side"), max_value=_param("max_image_side")
                ),
                f"{side}_in_bounds",
            )
            for side in ("width", "height")
        ),
        rule(gxe.ExpectColumnDistinctValuesToContainSet(column="label", value_set=_param("classes")), "every_class"),
        rule(
            gxe.ExpectColumnMinToBeBetween(column="class_count", min_value=_param("min_images_per_class")), "class_min"
        ),
    ]
    for level in (WARNING, CRITICAL):
        rules.append(
            rule(
                gxe.ExpectColumnMaxToBeBetween(column="class_imbalance", max_value=_param(f"class_imbalance_{level}")),
                f"class_imbalance:{level}",
                level,
            )
        )
        rules.append(
            rule(
                gxe.ExpectColumnMinToBeBetween(
                    column="batch_label_drift_p", min_value=_param(f"label_drift_alpha_{level}")
                ),
                f"label_drift:{level}",
                level,
            )
        )
    return rules


def expectation_parameters(cfg: PipelineConfig) -> dict[str, Any]:
    """The values of the suite's ``$PARAMETER`` references, from params.yaml (null = no bound)."""
    v = cfg.validate_
    return {
        "classes": list(cfg.classes),
        "formats": list(v.formats),
        "modes": list(v.modes),
        "min_image_side": v.min_image_side,
        "max_image_side": v.max_image_side,
        "min_images_per_class": v.min_images_per_class,
        "class_imbalance_warning": v.class_imbalance.warn,
        "class_imbalance_critical": v.class_imbalance.block,
        "label_drift_alpha_warning": v.label_drift.warn_alpha,
        "label_drift_alpha_critical": v.label_drift.block_alpha,
    }


def _quiet_gx() -> None:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    for name in ("great_expectations", "great_expectations.core", "great_expectations.data_context"):
        logging.getLogger(name).setLevel(logging.WARNING)


def open_context(root: Path) -> Any:
    _quiet_gx()
    import great_expectations as gx

    if not (root / GX_DIR / "great_expectations.yml").is_file():
        raise PipelineError(
            f"no Great Expectations project in {root / GX_DIR}; create it with `python -m tasks.data.expectations`"
        )
    return gx.get_context(mode="file", project_root_dir=str(root))


def write_project(root: Path) -> Path:
    """Create or update ``gx/``: datasource, suite, validation definition, checkpoint."""
    _quiet_gx()
    import great_expectations as gx

    context = gx.get_context(mode="file", project_root_dir=str(root))
    context.variables.progress_bars = {"globally": False}
    context.variables.analytics_enabled = False
    context.variables.save()
    source = context.data_sources.add_or_update_pandas(DATASOURCE)
    asset = next((a for a in source.assets if a.name == ASSET), None) or source.add_dataframe_asset(ASSET)
    batch = next((b for b in asset.batch_definitions if b.name == "whole"), None)
    batch = batch or asset.add_batch_definition_whole_dataframe("whole")
    suite = context.suites.add_or_update(gx.ExpectationSuite(name=SUITE, expectations=suite_expectations()))
    definition = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=SUITE, data=batch, suite=suite)
    )
    context.checkpoints.add_or_update(
        gx.Checkpoint(
            name=CHECKPOINT,
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
            result_format={"result_format": "COMPLETE"},
        )
    )
    return root / GX_DIR


@dataclass
class RuleOutcome:
    rule: str
    expectation: str
    severity: str
    success: bool
    observed: Any = None
    unexpected_count: int = 0
    unexpected_rows: list[int] = field(default_factory=list)


@dataclass
class CheckpointOutcome:
    rules: list[RuleOutcome]
    data_docs: str | None

    @property
    def failures(self) -> list[RuleOutcome]:
        return [r for r in self.rules if not r.success and r.severity == CRITICAL]

    @property
    def warnings(self) -> list[RuleOutcome]:
        return [r for r in self.rules if not r.success and r.severity != CRITICAL]


def _outcome(result: Any) -> RuleOutcome:
    config = result.expectation_config
    details = result.result or {}
    severity = getattr(config.severity, "value", str(config.severity)).lower()
    if result.exception_info and result.exception_info.get("raised_exception"):
        observed = f"error: {result.exception_info.get('exception_message')}"
    else:
        observed = details.get("observed_value")
    return RuleOutcome(
        rule=(config.meta or {}).get("rule", config.type),
        expectation=config.type,
        severity=severity,
        success=bool(result.success),
        observed=observed,
        unexpected_count=int(details.get("unexpected_count") or 0),
        unexpected_rows=[int(i) for i in (details.get("unexpected_index_list") or [])],
    )


def run_checkpoint(root: Path, table: pd.DataFrame, parameters: dict[str, Any]) -> CheckpointOutcome:
    """Run the committed checkpoint on the manifest table; Data Docs are rebuilt by its action."""
    context = open_context(root)
    try:
        checkpoint = context.checkpoints.get(CHECKPOINT)
    except Exception as exc:  # GX raises its own DataContextError subclasses
        raise PipelineError(f"{root / GX_DIR}: checkpoint {CHECKPOINT!r} not found ({exc})") from None
    result = checkpoint.run(batch_parameters={"dataframe": table}, expectation_parameters=parameters)
    rules = [_outcome(r) for run in result.run_results.values() for r in run.results]
    sites = context.get_docs_sites_urls()
    return CheckpointOutcome(rules, sites[0]["site_url"] if sites else None)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"wrote {write_project(Path.cwd())}")


if __name__ == "__main__":
    main()
