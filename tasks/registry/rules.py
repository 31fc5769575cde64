"""The promotion gate's rules (pure): challenger vs champion on the same images."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from statsmodels.stats.contingency_tables import mcnemar

from tasks.common.config import GateConfig
from tasks.common.metrics import compute_metrics

PROMOTE = "promote"

REJECT = "reject"

#: Slack for threshold comparisons. Metrics are ratios of counts, so a drop of exactly one
#: image can land a few ulps above a threshold of the same size (0.915 - 0.91 > 0.005 in
#: floating point); a value at its threshold must pass.
_EPS = 1e-9


@dataclass(frozen=True)
class McNemarResult:
    challenger_only: int  # b: images the challenger gets right and the champion wrong
    champion_only: int  # c: images the champion gets right and the challenger wrong
    both_right: int
    both_wrong: int
    statistic: float
    p_value: float


def mcnemar_test(challenger_correct: np.ndarray, champion_correct: np.ndarray) -> McNemarResult:
    """Exact (binomial) McNemar test on paired per-image correctness.

    Exact rather than chi-square because the discordant counts of two similar models are
    often small, where the chi-square approximation is poor. With no discordant image
    (b + c == 0) the models are indistinguishable and the p-value is 1.
    """
    challenger = np.asarray(challenger_correct, dtype=bool).ravel()
    champion = np.asarray(champion_correct, dtype=bool).ravel()
    if len(challenger) != len(champion):
        raise ValueError(
            f"paired outcomes differ in length: challenger {len(challenger)}, champion {len(champion)}; "
            "both models must be scored on the same images"
        )
    both_right = int(np.sum(challenger & champion))
    b = int(np.sum(challenger & ~champion))
    c = int(np.sum(~challenger & champion))
    both_wrong = int(np.sum(~challenger & ~champion))
    # Rows: challenger right/wrong; columns: champion right/wrong. Only the off-diagonal counts matter.
    result = mcnemar(np.array([[both_right, b], [c, both_wrong]]), exact=True)
    return McNemarResult(b, c, both_right, both_wrong, float(result.statistic), float(result.pvalue))


@dataclass(frozen=True)
class RuleResult:
    name: str
    value: float | None  # the observed value (accuracy, a drop, a p-value, MB, ms); None when not measured
    threshold: str  # human-readable, e.g. ">= 0.85"
    passed: bool
    detail: str = ""  # one line: why it passed or failed


@dataclass(frozen=True)
class GateReport:
    verdict: str  # "promote" or "reject"
    rules: tuple[RuleResult, ...]
    challenger: dict  # compute_metrics output
    champion: dict | None  # compute_metrics output; None when there is no champion
    mcnemar: McNemarResult | None

    def failures(self) -> list[RuleResult]:
        return [rule for rule in self.rules if not rule.passed]

    def reasons(self) -> str:
        """One line for registry tags and the audit log; empty when promoted."""
        return "; ".join(f"{rule.name}: {rule.detail}" for rule in self.failures())

    def to_dict(self) -> dict[str, Any]:
        """Everything needed to re-read the decision later, as plain JSON types."""
        return {
            "verdict": self.verdict,
            "reasons": self.reasons(),
            "rules": [asdict(rule) for rule in self.rules],
            "mcnemar": asdict(self.mcnemar) if self.mcnemar else None,
            "challenger": _plain_metrics(self.challenger),
            "champion": _plain_metrics(self.champion) if self.champion is not None else None,
        }


def _plain_metrics(metrics: dict) -> dict[str, Any]:
    return {
        "n": int(metrics["n"]),
        "accuracy": float(metrics["accuracy"]),
        "macro_f1": float(metrics["macro_f1"]),
        "per_class": {
            cls: {key: (int(v) if key == "support" else float(v)) for key, v in row.items()}
            for cls, row in metrics["per_class"].items()
        },
        "confusion_matrix": [[int(v) for v in row] for row in metrics["confusion_matrix"]],
    }


def _floor_rule(name: str, value: float, minimum: float) -> RuleResult:
    passed = value >= minimum - _EPS
    return RuleResult(name, value, f">= {minimum:g}", passed, f"{value:.4f} {'>=' if passed else '<'} {minimum:g}")


def _drop_rule(name: str, challenger: float, champion: float, max_drop: float) -> RuleResult:
    """A drop is champion minus challenger: negative when the challenger is better."""
    drop = champion - challenger
    detail = f"{challenger:.4f} vs champion {champion:.4f} (drop {drop:.4f})"
    return RuleResult(name, drop, f"<= {max_drop:g}", drop <= max_drop + _EPS, detail)


def _class_recall_rules(challenger: dict, champion: dict, max_drop: float) -> list[RuleResult]:
    """One rule per class present in the split: a better average must not hide a class the
    challenger has stopped recognising. Absent classes have no recall to compare."""
    rules = []
    for cls, row in challenger["per_class"].items():
        if row["support"] > 0:
            rule = _drop_rule(f"class_recall:{cls}", row["recall"], champion["per_class"][cls]["recall"], max_drop)
            rules.append(rule)
    return rules


def _mcnemar_rule(result: McNemarResult, cfg: GateConfig) -> RuleResult:
    """``not_worse`` fails only a significantly worse challenger; ``significantly_better``
    passes only a significantly better one. Direction comes from the discordant counts."""
    significant = result.p_value < cfg.alpha
    ahead = result.challenger_only > result.champion_only
    behind = result.champion_only > result.challenger_only
    if cfg.significance == "not_worse":
        passed = not (significant and behind)
        threshold = f"p >= {cfg.alpha:g} or challenger ahead"
    else:
        passed = significant and ahead
        threshold = f"p < {cfg.alpha:g} and challenger ahead"
    detail = (
        f"challenger-only {result.challenger_only} vs champion-only {result.champion_only}, "
        f"p={result.p_value:.4g} ({cfg.significance})"
    )
    return RuleResult("mcnemar", result.p_value, threshold, passed, detail)


def _budget_rule(name: str, value: float | None, maximum: float, unit: str) -> RuleResult:
    """A configured budget that was not measured fails: silence must not pass a budget."""
    if value is None:
        return RuleResult(name, None, f"<= {maximum:g} {unit}", False, "not measured")
    passed = value <= maximum + _EPS
    detail = f"{value:.4g} {unit} {'<=' if passed else '>'} {maximum:g} {unit}"
    return RuleResult(name, float(value), f"<= {maximum:g} {unit}", passed, detail)


def _budget_rules(cfg: GateConfig, model_mb: float | None, latency_ms: float | None) -> list[RuleResult]:
    rules = []
    if cfg.max_model_mb is not None:
        rules.append(_budget_rule("max_model_mb", model_mb, cfg.max_model_mb, "MB"))
    if cfg.max_latency_ms is not None:
        rules.append(_budget_rule("max_latency_ms", latency_ms, cfg.max_latency_ms, "ms"))
    return rules


def _check_lengths(y_true: np.ndarray, challenger_pred: np.ndarray, champion_pred: np.ndarray | None) -> None:
    if len(y_true) == 0:
        raise ValueError("no images to gate on: y_true is empty")
    lengths = {"y_true": len(y_true), "challenger_pred": len(challenger_pred)}
    if champion_pred is not None:
        lengths["champion_pred"] = len(champion_pred)
    if len(set(lengths.values())) > 1:
        raise ValueError(f"lengths differ: {lengths}; both models must be scored on the same images")


def evaluate_gate(
    y_true: np.ndarray,
    challenger_pred: np.ndarray,
    champion_pred: np.ndarray | None,
    classes: tuple[str, ...],
    cfg: GateConfig,
    model_mb: float | None = None,
    latency_ms: float | None = None,
) -> GateReport:
    """Apply every configured rule. Without a champion only the absolute floors (and any
    budgets) apply, since there is nothing to compare with."""
    y_true, challenger_pred = np.asarray(y_true), np.asarray(challenger_pred)
    champion_pred = None if champion_pred is None else np.asarray(champion_pred)
    _check_lengths(y_true, challenger_pred, champion_pred)
    challenger = compute_metrics(y_true, challenger_pred, classes)
    rules = [
        _floor_rule("min_accuracy", challenger["accuracy"], cfg.min_accuracy),
        _floor_rule("min_macro_f1", challenger["macro_f1"], cfg.min_macro_f1),
    ]
    champion, paired = None, None
    if champion_pred is not None:
        champion = compute_metrics(y_true, champion_pred, classes)
        paired = mcnemar_test(challenger_pred == y_true, champion_pred == y_true)
        rules += [
            _drop_rule("max_accuracy_drop", challenger["accuracy"], champion["accuracy"], cfg.max_accuracy_drop),
            _drop_rule("max_macro_f1_drop", challenger["macro_f1"], champion["macro_f1"], cfg.max_macro_f1_drop),
            *_class_recall_rules(challenger, champion, cfg.max_class_recall_drop),
            _mcnemar_rule(paired, cfg),
        ]
    rules += _budget_rules(cfg, model_mb, latency_ms)
    verdict = PROMOTE if all(rule.passed for rule in rules) else REJECT
    return GateReport(verdict, tuple(rules), challenger, champion, paired)


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _cell(text: str) -> str:
    """Class names end up in rule names; a pipe would split the Markdown table cell."""
    return text.replace("|", "\\|")


def render_markdown(report: GateReport, challenger_version: str | None, champion_version: str | None) -> str:
    """A Prefect artifact: the verdict first, then every rule, so a reader sees why."""
    challenger = f"v{challenger_version}" if challenger_version else "challenger"
    against = f"champion v{champion_version}" if champion_version else "champion"
    if report.champion is None:
        against = "no champion (absolute floors only)"
    lines = [
        f"# Gate: {report.verdict.upper()}",
        "",
        f"{challenger} vs {against}: accuracy {report.challenger['accuracy']:.4f}, "
        f"macro-F1 {report.challenger['macro_f1']:.4f} on {report.challenger['n']} images.",
        "",
        "| rule | value | threshold | result |",
        "|---|---|---|---|",
    ]
    for rule in report.rules:
        result = "pass" if rule.passed else "**FAIL**"
        lines.append(f"| {_cell(rule.name)} | {_fmt(rule.value)} | {_cell(rule.threshold)} | {result} |")
    if report.mcnemar is not None:
        m = report.mcnemar
        lines += [
            "",
            f"McNemar (exact): challenger-only {m.challenger_only}, champion-only {m.champion_only}, "
            f"both right {m.both_right}, both wrong {m.both_wrong}, p = {m.p_value:.4g}",
        ]
    if report.failures():
        lines += ["", "**Failed:**", ""]
        lines += [f"- {_cell(rule.name)}: {rule.detail}" for rule in report.failures()]
    return "\n".join(lines) + "\n"


def per_class_rows(report: GateReport, classes: tuple[str, ...]) -> list[dict]:
    """Per-class table rows in ``classes`` order; ``recall_change`` is challenger minus
    champion, so negative means the challenger recognises that class less often."""
    missing = [cls for cls in classes if cls not in report.challenger["per_class"]]
    if missing:
        raise ValueError(f"classes {missing} not in the report; it has {list(report.challenger['per_class'])}")
    rows = []
    for cls in classes:
        new = report.challenger["per_class"][cls]
        old = report.champion["per_class"][cls] if report.champion is not None else None
        rows.append(
            {
                "class": cls,
                "challenger_precision": new["precision"],
                "challenger_recall": new["recall"],
                "challenger_f1": new["f1"],
                "champion_precision": old["precision"] if old else None,
                "champion_recall": old["recall"] if old else None,
                "champion_f1": old["f1"] if old else None,
                "recall_change": new["recall"] - old["recall"] if old else None,
            }
        )
    return rows


def measure_latency_ms(model: Any, image_shape: tuple[int, int, int], repeats: int = 20) -> float:
    """Median CPU latency of one single-image forward pass, in ms.

    The model must take uint8 NHWC batches and live on the CPU. Median, after a warm-up,
    because the first calls pay for allocation and lazy initialisation and a single slow
    call (another process, a page fault) should not decide a budget. The model's
    train/eval mode is restored afterwards.
    """
    import torch

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    devices = {p.device.type for p in model.parameters()}
    if devices - {"cpu"}:
        raise ValueError(f"model must be on the CPU to measure CPU latency; its parameters are on {sorted(devices)}")
    batch = torch.zeros((1, *image_shape), dtype=torch.uint8)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for _ in range(3):
                model(batch)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                model(batch)
                times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return float(np.median(times) * 1000.0)


def gate_metrics(report: GateReport) -> dict[str, Any]:
    out: dict[str, Any] = {"promoted": report.verdict == "promote"}
    for who in ("challenger", "champion"):
        metrics = getattr(report, who)
        if metrics:
            out[who] = {k: metrics[k] for k in ("accuracy", "macro_f1", "n")}
    if report.mcnemar:
        m = report.mcnemar
        out["mcnemar"] = {"challenger_only": m.challenger_only, "champion_only": m.champion_only, "p_value": m.p_value}
    return out
