"""The promotion gate's rules (pure): challenger vs champion on the same images.

The gate judges one split or two (``gate.judge_on``, see ``choose_splits``); on each it applies
the floors (explicit, or derived from the majority class and the evaluate stage's cheap
baseline: ``derive_floors``), and, when there is a champion, the drop margins, a per-class
guard and an exact McNemar test on the paired per-image outcomes. Budgets apply once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import binomtest
from statsmodels.stats.contingency_tables import mcnemar

from tasks.common.config import GateConfig
from tasks.common.errors import PipelineError
from tasks.common.metrics import compute_metrics
from tasks.data.splits import BENCHMARK

PROMOTE = "promote"

REJECT = "reject"

TEST = "test"

JUDGE_ON = ("auto", TEST, BENCHMARK, "both")

#: Slack for threshold comparisons. Metrics are ratios of counts, so a drop of exactly one
#: image can land a few ulps above a threshold of the same size (0.915 - 0.91 > 0.005 in
#: floating point); a value at its threshold must pass.
_EPS = 1e-9


def choose_splits(judge_on: str, benchmark_scored: bool) -> tuple[tuple[str, ...], str]:
    """The split(s) to judge on, headline first, and the rule that chose them.

    ``benchmark_scored``: the evaluate stage wrote predictions for at least one benchmark
    image. ``auto`` prefers the benchmark: its images are fixed, so every version is judged on
    the same evidence, and it is usually larger than the test split. An explicit choice that
    cannot be honoured fails rather than quietly judging something else.
    """
    if judge_on not in JUDGE_ON:
        raise ValueError(f"invalid judge_on {judge_on!r}; supported: {', '.join(JUDGE_ON)}")
    if judge_on == "auto":
        if benchmark_scored:
            return (BENCHMARK,), "auto: the benchmark set was scored; fixed images, usually more than the test split"
        return (TEST,), "auto: no benchmark set was scored, so the test split"
    if judge_on != TEST and not benchmark_scored:
        raise PipelineError(
            f"gate.judge_on is {judge_on!r} but the evaluate stage scored no benchmark set; "
            "put images in data/benchmark (with evaluate.benchmark: true) or set gate.judge_on to auto or test"
        )
    splits = {TEST: (TEST,), BENCHMARK: (BENCHMARK,), "both": (BENCHMARK, TEST)}[judge_on]
    return splits, f"judge_on: {judge_on}"


@dataclass(frozen=True)
class Floor:
    metric: str  # "accuracy" or "macro_f1"
    value: float
    source: str  # "params", or the reference it follows from: "baseline 0.8300 + 0.02; majority 0.1000"


def majority_metrics(y_true: np.ndarray, classes: tuple[str, ...]) -> dict[str, float]:
    """Accuracy and macro-F1 of always predicting the most frequent class of these images: the
    best constant predictor on both metrics (a constant's macro-F1 grows with its class's share)."""
    y_true = np.asarray(y_true)
    majority = int(np.bincount(y_true, minlength=len(classes)).argmax())
    metrics = compute_metrics(y_true, np.full(len(y_true), majority), classes)
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}


def derive_floors(
    y_true: np.ndarray, classes: tuple[str, ...], cfg: GateConfig, baseline: Mapping[str, float] | None = None
) -> tuple[Floor, Floor]:
    """The accuracy and macro-F1 floors on these images. A number in params wins; null takes
    the better reference (the majority-class predictor, the cheap ``baseline`` when given) plus
    ``floor_margin``, capped at 1 (a perfect reference can be matched, not beaten)."""
    references = {"majority": majority_metrics(y_true, classes)}
    if baseline is not None:
        references["baseline"] = {k: float(baseline[k]) for k in ("accuracy", "macro_f1")}
    floors = []
    for metric, configured in (("accuracy", cfg.min_accuracy), ("macro_f1", cfg.min_macro_f1)):
        if configured is not None:
            floors.append(Floor(metric, float(configured), "params"))
            continue
        name = max(references, key=lambda k: references[k][metric])  # a tie keeps the majority
        reference = references[name][metric]
        source = f"{name} {reference:.4f} + {cfg.floor_margin:g}"
        if reference + cfg.floor_margin > 1:
            source += ", capped at 1"
        others = [f"{k} {v[metric]:.4f}" for k, v in references.items() if k != name]
        source += f"; {', '.join(others)}" if others else "; no baseline"
        floors.append(Floor(metric, min(1.0, reference + cfg.floor_margin), source))
    return floors[0], floors[1]


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


def worse_p_value(champion_only: int, challenger_only: int) -> float:
    """One-sided exact test that the challenger is worse on these paired images: the chance of
    at least ``champion_only`` of the discordant images going the champion's way if each went
    either way with probability 1/2 (McNemar's exact test, one tail). 1 without discordant images."""
    discordant = champion_only + challenger_only
    if discordant == 0:
        return 1.0
    return float(binomtest(champion_only, discordant, 0.5, alternative="greater").pvalue)


@dataclass(frozen=True)
class RuleResult:
    name: str
    value: float | None  # the observed value (accuracy, a drop, a p-value, MB, ms); None when not measured
    threshold: str  # human-readable, e.g. ">= 0.85"
    passed: bool
    detail: str = ""  # one line: why it passed or failed


@dataclass(frozen=True)
class SplitPredictions:
    """One split as the gate sees it: true classes, both models' predictions on the same images
    (champion None: there is none to compare with) and the cheap baseline's accuracy and
    macro-F1 there (None: derived floors follow the majority class alone)."""

    y_true: np.ndarray
    challenger: np.ndarray
    champion: np.ndarray | None = None
    baseline: Mapping[str, float] | None = None


@dataclass(frozen=True)
class JudgedSplit:
    split: str
    challenger: dict  # compute_metrics output
    champion: dict | None  # compute_metrics output; None when there is no champion
    mcnemar: McNemarResult | None
    floors: tuple[Floor, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "challenger": _plain_metrics(self.challenger),
            "champion": _plain_metrics(self.champion) if self.champion is not None else None,
            "mcnemar": asdict(self.mcnemar) if self.mcnemar else None,
            "floors": [asdict(floor) for floor in self.floors],
        }


@dataclass(frozen=True)
class GateReport:
    verdict: str  # "promote" or "reject"
    rules: tuple[RuleResult, ...]
    judged: tuple[JudgedSplit, ...]  # the headline split first
    selection: str = ""  # the rule that chose the split(s), e.g. "auto: ..."

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(j.split for j in self.judged)

    @property
    def challenger(self) -> dict:
        """The headline split's metrics (as are ``champion`` and ``mcnemar``)."""
        return self.judged[0].challenger

    @property
    def champion(self) -> dict | None:
        return self.judged[0].champion

    @property
    def mcnemar(self) -> McNemarResult | None:
        return self.judged[0].mcnemar

    def failures(self) -> list[RuleResult]:
        return [rule for rule in self.rules if not rule.passed]

    def reasons(self) -> str:
        """One line for registry tags and the audit log; empty when promoted."""
        return "; ".join(f"{rule.name}: {rule.detail}" for rule in self.failures())

    def to_dict(self) -> dict[str, Any]:
        """Everything needed to re-read the decision later, as plain JSON types. The top-level
        ``challenger``/``champion``/``mcnemar`` are the headline split's; ``splits`` has each."""
        headline = self.judged[0].to_dict()
        return {
            "verdict": self.verdict,
            "reasons": self.reasons(),
            "judged_on": list(self.splits),
            "judge_rule": self.selection,
            "rules": [asdict(rule) for rule in self.rules],
            "mcnemar": headline["mcnemar"],
            "challenger": headline["challenger"],
            "champion": headline["champion"],
            "splits": {j.split: j.to_dict() for j in self.judged},
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


def _floor_rule(name: str, value: float, floor: Floor) -> RuleResult:
    passed = value >= floor.value - _EPS
    threshold = f">= {floor.value:.4f} ({floor.source})"
    return RuleResult(name, value, threshold, passed, f"{value:.4f} {'>=' if passed else '<'} {threshold[3:]}")


def _drop_rule(name: str, challenger: float, champion: float, max_drop: float) -> RuleResult:
    """A drop is champion minus challenger: negative when the challenger is better."""
    drop = champion - challenger
    detail = f"{challenger:.4f} vs champion {champion:.4f} (drop {drop:.4f})"
    return RuleResult(name, drop, f"<= {max_drop:g}", drop <= max_drop + _EPS, detail)


def _class_recall_rules(
    y_true: np.ndarray,
    challenger_ok: np.ndarray,
    champion_ok: np.ndarray,
    challenger: dict,
    champion: dict,
    cfg: GateConfig,
    suffix: str,
) -> list[RuleResult]:
    """One rule per class present in the split: a better average must not hide a class the
    challenger has stopped recognising. A class fails only when its recall drop is both large
    (> ``max_class_recall_drop``) and real: the one-sided exact test on that class's discordant
    images is significant at ``alpha``. One image lost out of two is 50 points of recall and no
    evidence (p = 0.5); it takes at least five one-way discordant images to reach p < 0.05.
    Absent classes have no recall to compare."""
    rules = []
    for i, (cls, row) in enumerate(challenger["per_class"].items()):
        if row["support"] == 0:
            continue
        mine = y_true == i
        gained = int(np.sum(challenger_ok[mine] & ~champion_ok[mine]))
        lost = int(np.sum(~challenger_ok[mine] & champion_ok[mine]))
        p_value = worse_p_value(lost, gained)
        new, old = row["recall"], champion["per_class"][cls]["recall"]
        drop = old - new
        passed = drop <= cfg.max_class_recall_drop + _EPS or p_value >= cfg.alpha
        detail = (
            f"{new:.4f} vs champion {old:.4f} (drop {drop:.4f}) on {row['support']} images: "
            f"champion-only {lost}, challenger-only {gained}, one-sided p={p_value:.4g}"
        )
        threshold = f"<= {cfg.max_class_recall_drop:g} or p >= {cfg.alpha:g}"
        rules.append(RuleResult(f"class_recall:{cls}{suffix}", drop, threshold, passed, detail))
    return rules


def _mcnemar_rule(result: McNemarResult, cfg: GateConfig, suffix: str) -> RuleResult:
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
    return RuleResult(f"mcnemar{suffix}", result.p_value, threshold, passed, detail)


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


def _check_lengths(split: str, data: SplitPredictions) -> None:
    if len(data.y_true) == 0:
        raise ValueError(f"no images to gate on in {split!r}: y_true is empty")
    lengths = {"y_true": len(data.y_true), "challenger_pred": len(data.challenger)}
    if data.champion is not None:
        lengths["champion_pred"] = len(data.champion)
    if len(set(lengths.values())) > 1:
        raise ValueError(f"lengths differ in {split!r}: {lengths}; both models must be scored on the same images")


def _judge_split(
    split: str, data: SplitPredictions, classes: tuple[str, ...], cfg: GateConfig, suffix: str
) -> tuple[JudgedSplit, list[RuleResult]]:
    y_true, challenger_pred = np.asarray(data.y_true), np.asarray(data.challenger)
    challenger = compute_metrics(y_true, challenger_pred, classes)
    floors = derive_floors(y_true, classes, cfg, data.baseline)
    rules = [
        _floor_rule(f"min_accuracy{suffix}", challenger["accuracy"], floors[0]),
        _floor_rule(f"min_macro_f1{suffix}", challenger["macro_f1"], floors[1]),
    ]
    if data.champion is None:
        return JudgedSplit(split, challenger, None, None, floors), rules
    champion_pred = np.asarray(data.champion)
    champion = compute_metrics(y_true, champion_pred, classes)
    challenger_ok, champion_ok = challenger_pred == y_true, champion_pred == y_true
    paired = mcnemar_test(challenger_ok, champion_ok)
    rules += [
        _drop_rule(f"max_accuracy_drop{suffix}", challenger["accuracy"], champion["accuracy"], cfg.max_accuracy_drop),
        _drop_rule(f"max_macro_f1_drop{suffix}", challenger["macro_f1"], champion["macro_f1"], cfg.max_macro_f1_drop),
        *_class_recall_rules(y_true, challenger_ok, champion_ok, challenger, champion, cfg, suffix),
        _mcnemar_rule(paired, cfg, suffix),
    ]
    return JudgedSplit(split, challenger, champion, paired, floors), rules


def evaluate_gate_on(
    splits: Mapping[str, SplitPredictions],
    classes: tuple[str, ...],
    cfg: GateConfig,
    model_mb: float | None = None,
    latency_ms: float | None = None,
    selection: str = "",
) -> GateReport:
    """Apply every configured rule on each split (headline first). With more than one split,
    rule names carry the split (``mcnemar@test``). Without a champion only the floors (and
    any budgets) apply, since there is nothing to compare with."""
    if not splits:
        raise ValueError("no split to gate on")
    with_champion = {name for name, data in splits.items() if data.champion is not None}
    if with_champion and with_champion != set(splits):
        raise ValueError(f"the champion was scored on {sorted(with_champion)} but not on all of {list(splits)}")
    judged, rules = [], []
    for name, data in splits.items():
        _check_lengths(name, data)
        split_result, split_rules = _judge_split(name, data, classes, cfg, f"@{name}" if len(splits) > 1 else "")
        judged.append(split_result)
        rules += split_rules
    rules += _budget_rules(cfg, model_mb, latency_ms)
    verdict = PROMOTE if all(rule.passed for rule in rules) else REJECT
    return GateReport(verdict, tuple(rules), tuple(judged), selection)


def evaluate_gate(
    y_true: np.ndarray,
    challenger_pred: np.ndarray,
    champion_pred: np.ndarray | None,
    classes: tuple[str, ...],
    cfg: GateConfig,
    model_mb: float | None = None,
    latency_ms: float | None = None,
    *,
    baseline: Mapping[str, float] | None = None,
    split: str = TEST,
) -> GateReport:
    """``evaluate_gate_on`` for one split."""
    data = SplitPredictions(np.asarray(y_true), np.asarray(challenger_pred), champion_pred, baseline)
    return evaluate_gate_on({split: data}, classes, cfg, model_mb, latency_ms)


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _cell(text: str) -> str:
    """Class names end up in rule names; a pipe would split the Markdown table cell."""
    return text.replace("|", "\\|")


def _split_line(judged: JudgedSplit) -> str:
    metrics = judged.challenger
    label = {"accuracy": "accuracy", "macro_f1": "macro-F1"}
    floors = ", ".join(f"{label[f.metric]} >= {f.value:.4f} ({f.source})" for f in judged.floors)
    return (
        f"- **{judged.split}**: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} "
        f"on {metrics['n']} images; floors {floors}"
    )


def _mcnemar_line(judged: JudgedSplit, several: bool) -> str:
    m = judged.mcnemar
    where = f", {judged.split}" if several else ""
    return (
        f"McNemar (exact{where}): challenger-only {m.challenger_only}, champion-only {m.champion_only}, "
        f"both right {m.both_right}, both wrong {m.both_wrong}, p = {m.p_value:.4g}"
    )


def render_markdown(report: GateReport, challenger_version: str | None, champion_version: str | None) -> str:
    """A Prefect artifact: the verdict first, then what was judged, then every rule, so a reader sees why."""
    challenger = f"v{challenger_version}" if challenger_version else "challenger"
    against = f"champion v{champion_version}" if champion_version else "champion"
    if report.champion is None:
        against = "no champion (absolute floors only)"
    selection = f" ({_cell(report.selection)})" if report.selection else ""
    lines = [
        f"# Gate: {report.verdict.upper()}",
        "",
        f"{challenger} vs {against}, judged on {' and '.join(report.splits)}{selection}:",
        "",
        *(_split_line(j) for j in report.judged),
        "",
        "| rule | value | threshold | result |",
        "|---|---|---|---|",
    ]
    for rule in report.rules:
        result = "pass" if rule.passed else "**FAIL**"
        lines.append(f"| {_cell(rule.name)} | {_fmt(rule.value)} | {_cell(rule.threshold)} | {result} |")
    compared = [j for j in report.judged if j.mcnemar is not None]
    if compared:
        lines += ["", *(_mcnemar_line(j, len(report.judged) > 1) for j in compared)]
    if report.failures():
        lines += ["", "**Failed:**", ""]
        lines += [f"- {_cell(rule.name)}: {rule.detail}" for rule in report.failures()]
    return "\n".join(lines) + "\n"


def per_class_rows(report: GateReport, classes: tuple[str, ...]) -> list[dict]:
    """Per-class table rows, per judged split (headline first) in ``classes`` order;
    ``recall_change`` is challenger minus champion, so negative means the challenger
    recognises that class less often."""
    missing = [cls for cls in classes if cls not in report.challenger["per_class"]]
    if missing:
        raise ValueError(f"classes {missing} not in the report; it has {list(report.challenger['per_class'])}")
    rows = []
    for judged in report.judged:
        for cls in classes:
            new = judged.challenger["per_class"][cls]
            old = judged.champion["per_class"][cls] if judged.champion is not None else None
            rows.append(
                {
                    "split": judged.split,
                    "class": cls,
                    "support": new["support"],
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


def _split_numbers(judged: JudgedSplit) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for who in ("challenger", "champion"):
        metrics = getattr(judged, who)
        if metrics:
            out[who] = {k: metrics[k] for k in ("accuracy", "macro_f1", "n")}
    if judged.mcnemar:
        m = judged.mcnemar
        out["mcnemar"] = {"challenger_only": m.challenger_only, "champion_only": m.champion_only, "p_value": m.p_value}
    out["floors"] = {f"min_{f.metric}": f.value for f in judged.floors}
    return out


def gate_metrics(report: GateReport) -> dict[str, Any]:
    """Flat numbers for `dvc metrics show` and the audit log: the headline split's, and each
    split's under ``splits`` when more than one was judged."""
    out: dict[str, Any] = {"promoted": report.verdict == "promote", "judged_on": "+".join(report.splits)}
    out.update(_split_numbers(report.judged[0]))
    if len(report.judged) > 1:
        out["splits"] = {j.split: _split_numbers(j) for j in report.judged}
    return out
