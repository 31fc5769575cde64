from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

from tasks.common.config import GateConfig
from tasks.common.errors import PipelineError
from tasks.common.metrics import compute_metrics
from tasks.registry.rules import (
    GateReport,
    SplitPredictions,
    choose_splits,
    derive_floors,
    evaluate_gate,
    evaluate_gate_on,
    gate_metrics,
    mcnemar_test,
    measure_latency_ms,
    per_class_rows,
    render_markdown,
    worse_p_value,
)

AB = ("a", "b")
ABC = ("a", "b", "c")


def lax(**overrides: object) -> GateConfig:
    """A config where every rule passes unless a test tightens the one it is about.
    ``alpha`` cannot be 0, so a vanishing one switches the ``not_worse`` test off."""
    base = {
        "min_accuracy": 0.0,
        "min_macro_f1": 0.0,
        "max_accuracy_drop": 1.0,
        "max_macro_f1_drop": 1.0,
        "max_class_recall_drop": 1.0,
        "significance": "not_worse",
        "alpha": 1e-300,
    }
    return GateConfig(**{**base, **overrides})


def paired(both_right: int, b: int, c: int, both_wrong: int) -> tuple[np.ndarray, np.ndarray]:
    """Challenger and champion correctness with the given 2x2 counts (b: challenger only)."""
    challenger = [True] * both_right + [True] * b + [False] * c + [False] * both_wrong
    champion = [True] * both_right + [False] * b + [True] * c + [False] * both_wrong
    return np.array(challenger), np.array(champion)


def predict(y_true: np.ndarray, correct: np.ndarray, n_classes: int) -> np.ndarray:
    """Predictions right where ``correct`` holds, the next class where it does not."""
    return np.where(correct, y_true, (y_true + 1) % n_classes)


def paired_preds(both_right: int, b: int, c: int, both_wrong: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """y_true, challenger and champion predictions over two classes with the given 2x2 counts."""
    challenger_ok, champion_ok = paired(both_right, b, c, both_wrong)
    y_true = np.arange(len(challenger_ok)) % 2
    return y_true, predict(y_true, challenger_ok, 2), predict(y_true, champion_ok, 2)


def rule(report: GateReport, name: str):
    matches = [r for r in report.rules if r.name == name]
    assert len(matches) == 1, f"expected one rule {name!r}, got {[r.name for r in report.rules]}"
    return matches[0]


def names(report: GateReport) -> list[str]:
    return [r.name for r in report.rules]


# ---------------------------------------------------------------- McNemar


@pytest.mark.parametrize(
    ("both_right", "b", "c", "both_wrong"),
    [
        # Agresti, Categorical Data Analysis, ch. 10: the same 1600 people rate the Prime
        # Minister's performance in two surveys (approve/approve 794, approve/disapprove 150,
        # disapprove/approve 86, disapprove/disapprove 570); McNemar's z^2 = 64^2 / 236 = 17.36.
        (794, 150, 86, 570),
        # Wikipedia, "McNemar's test", worked example: 101, 121, 59, 33; chi^2 = 62^2 / 180 = 21.35.
        (101, 121, 59, 33),
    ],
)
def test_mcnemar_matches_textbook_examples(both_right: int, b: int, c: int, both_wrong: int) -> None:
    challenger, champion = paired(both_right, b, c, both_wrong)

    result = mcnemar_test(challenger, champion)

    assert (result.both_right, result.challenger_only, result.champion_only, result.both_wrong) == (
        both_right,
        b,
        c,
        both_wrong,
    )
    assert result.p_value == pytest.approx(binomtest(b, b + c, 0.5).pvalue, abs=1e-12)
    assert result.p_value < 1e-4  # both examples are highly significant
    assert result.statistic == min(b, c)  # the exact test's statistic is the smaller discordant count


def test_mcnemar_small_example_by_hand() -> None:
    challenger, champion = paired(5, 10, 2, 3)
    expected = 2 * sum(math.comb(12, k) for k in range(3)) / 2**12  # 2 * P(X <= 2 | n=12, p=.5)

    result = mcnemar_test(challenger, champion)

    assert (result.challenger_only, result.champion_only) == (10, 2)
    assert expected == pytest.approx(0.0385742, abs=1e-7)
    assert result.p_value == pytest.approx(expected, abs=1e-12)


def test_mcnemar_identical_outcomes_give_p_one() -> None:
    challenger, champion = paired(7, 0, 0, 3)

    result = mcnemar_test(challenger, champion)

    assert (result.challenger_only, result.champion_only, result.both_right, result.both_wrong) == (0, 0, 7, 3)
    assert result.p_value == 1.0


def test_identical_models_pass_not_worse_but_fail_significantly_better() -> None:
    y_true, challenger, _ = paired_preds(18, 0, 0, 2)

    not_worse = evaluate_gate(y_true, challenger, challenger.copy(), AB, lax(alpha=0.05))
    better = evaluate_gate(
        y_true, challenger, challenger.copy(), AB, lax(alpha=0.05, significance="significantly_better")
    )

    assert rule(not_worse, "mcnemar").passed and not_worse.verdict == "promote"
    assert rule(not_worse, "mcnemar").value == 1.0
    assert not rule(better, "mcnemar").passed and better.verdict == "reject"


def test_mismatched_lengths_raise() -> None:
    with pytest.raises(ValueError, match=r"challenger 3, champion 4"):
        mcnemar_test(np.ones(3, bool), np.ones(4, bool))
    with pytest.raises(ValueError, match=r"'champion_pred': 5"):
        evaluate_gate(np.zeros(4, int), np.zeros(4, int), np.zeros(5, int), AB, lax())
    with pytest.raises(ValueError, match=r"'challenger_pred': 3"):
        evaluate_gate(np.zeros(4, int), np.zeros(3, int), None, AB, lax())


def test_empty_split_raises() -> None:
    with pytest.raises(ValueError, match="empty"):
        evaluate_gate(np.zeros(0, int), np.zeros(0, int), None, AB, lax())


# ---------------------------------------------------------------- floors


@pytest.mark.parametrize(("name", "metric"), [("min_accuracy", "accuracy"), ("min_macro_f1", "macro_f1")])
def test_floor_passes_at_threshold_and_fails_just_above(name: str, metric: str) -> None:
    y_true = np.arange(20) % 2
    challenger = predict(y_true, np.arange(20) >= 3, 2)  # 17 of 20 right
    observed = compute_metrics(y_true, challenger, AB)[metric]

    at = evaluate_gate(y_true, challenger, None, AB, lax(**{name: observed}))
    above = evaluate_gate(y_true, challenger, None, AB, lax(**{name: observed + 1e-6}))

    assert rule(at, name).passed and at.verdict == "promote"
    assert rule(at, name).value == pytest.approx(observed)
    assert not rule(above, name).passed and above.verdict == "reject"
    assert above.reasons().startswith(f"{name}: ")


# ---------------------------------------------------------------- derived floors

#: The user's two classes at 2.2:1 (22 vs 10 images).
IMBALANCED = np.array([0] * 22 + [1] * 10)
MAJORITY_ACCURACY = 22 / 32  # 0.6875
MAJORITY_MACRO_F1 = (2 * MAJORITY_ACCURACY / (1 + MAJORITY_ACCURACY)) / 2  # F1 of "always a", 0 for b: 0.4074


def test_floors_follow_the_majority_class_without_a_baseline() -> None:
    accuracy, macro_f1 = derive_floors(IMBALANCED, AB, GateConfig())

    assert accuracy.value == pytest.approx(MAJORITY_ACCURACY + 0.02)
    assert accuracy.source == "majority 0.6875 + 0.02; no baseline"
    assert macro_f1.value == pytest.approx(MAJORITY_MACRO_F1 + 0.02)
    assert macro_f1.source == "majority 0.4074 + 0.02; no baseline"


def test_floors_follow_the_baseline_when_it_beats_the_majority_and_params_win() -> None:
    baseline = {"accuracy": 0.8, "macro_f1": 0.3}  # better than the majority on accuracy only

    accuracy, macro_f1 = derive_floors(IMBALANCED, AB, GateConfig(floor_margin=0.05), baseline)
    explicit, derived = derive_floors(IMBALANCED, AB, GateConfig(min_accuracy=0.6), baseline)

    assert (accuracy.value, accuracy.source) == (pytest.approx(0.85), "baseline 0.8000 + 0.05; majority 0.6875")
    assert (macro_f1.value, macro_f1.source) == (
        pytest.approx(MAJORITY_MACRO_F1 + 0.05),
        "majority 0.4074 + 0.05; baseline 0.3000",
    )
    assert (explicit.value, explicit.source) == (0.6, "params")
    assert derived.source.startswith("majority 0.4074 + 0.02")


def test_a_floor_above_one_is_capped() -> None:
    accuracy, _ = derive_floors(IMBALANCED, AB, GateConfig(), {"accuracy": 0.995, "macro_f1": 0.99})

    assert accuracy.value == 1.0
    assert accuracy.source == "baseline 0.9950 + 0.02, capped at 1; majority 0.6875"


def test_a_reasonable_model_on_an_imbalanced_two_class_set_passes_derived_floors_not_fashion_mnists() -> None:
    # The user's case: 2.2:1, a challenger right on 20/22 of a and 7/10 of b (accuracy 0.84,
    # macro-F1 0.81) never got past the old fixed 0.85 floors, though it beats both references.
    challenger = predict(IMBALANCED, np.isin(np.arange(32), [0, 1, 22, 23, 24], invert=True), 2)
    baseline = {"accuracy": 0.75, "macro_f1": 0.6}

    derived = evaluate_gate(IMBALANCED, challenger, None, AB, GateConfig(), baseline=baseline)
    fixed = evaluate_gate(IMBALANCED, challenger, None, AB, GateConfig(min_accuracy=0.85, min_macro_f1=0.85))

    assert derived.verdict == "promote" and fixed.verdict == "reject"
    assert rule(derived, "min_accuracy").threshold == ">= 0.7700 (baseline 0.7500 + 0.02; majority 0.6875)"
    assert rule(fixed, "min_macro_f1").detail.endswith("< 0.8500 (params)")
    floors = derived.to_dict()["splits"]["test"]["floors"]
    assert floors[0] == {
        "metric": "accuracy",
        "value": pytest.approx(0.77),
        "source": "baseline 0.7500 + 0.02; majority 0.6875",
    }
    assert "floors accuracy >= 0.7700 (baseline 0.7500 + 0.02; majority 0.6875)" in render_markdown(derived, "2", None)
    assert gate_metrics(derived)["floors"] == {"min_accuracy": pytest.approx(0.77), "min_macro_f1": pytest.approx(0.62)}


def test_a_constant_majority_predictor_fails_the_derived_floors() -> None:
    report = evaluate_gate(IMBALANCED, np.zeros(32, int), None, AB, GateConfig())

    assert report.verdict == "reject"
    assert [r.name for r in report.failures()] == ["min_accuracy", "min_macro_f1"]


# ---------------------------------------------------------------- which split


@pytest.mark.parametrize(
    ("judge_on", "scored", "splits", "why"),
    [
        ("auto", True, ("benchmark",), "auto: the benchmark set was scored"),
        ("auto", False, ("test",), "auto: no benchmark set was scored"),
        ("test", True, ("test",), "judge_on: test"),
        ("benchmark", True, ("benchmark",), "judge_on: benchmark"),
        ("both", True, ("benchmark", "test"), "judge_on: both"),
    ],
)
def test_choose_splits(judge_on: str, scored: bool, splits: tuple[str, ...], why: str) -> None:
    chosen, rule_used = choose_splits(judge_on, scored)

    assert chosen == splits
    assert rule_used.startswith(why)


@pytest.mark.parametrize("judge_on", ["benchmark", "both"])
def test_an_explicit_benchmark_choice_without_benchmark_fails(judge_on: str) -> None:
    with pytest.raises(PipelineError, match=f"judge_on is '{judge_on}' but the evaluate stage scored no benchmark"):
        choose_splits(judge_on, benchmark_scored=False)


def test_an_unknown_judge_on_names_the_choices() -> None:
    with pytest.raises(ValueError, match="supported: auto, test, benchmark, both"):
        choose_splits("val", True)


def _two_splits(test_lost: int) -> dict[str, SplitPredictions]:
    """A benchmark where both models tie, and a test split where the challenger loses ``test_lost`` images."""
    bench_true, bench_new, bench_old = paired_preds(40, 3, 3, 4)
    test_true, test_new, test_old = paired_preds(30, 0, test_lost, 0)
    return {
        "benchmark": SplitPredictions(bench_true, bench_new, bench_old),
        "test": SplitPredictions(test_true, test_new, test_old),
    }


def test_both_splits_apply_every_rule_on_each_with_the_split_in_the_name() -> None:
    report = evaluate_gate_on(_two_splits(test_lost=12), AB, GateConfig(max_model_mb=100), 5.0, None, "judge_on: both")

    per_split = [
        "min_accuracy",
        "min_macro_f1",
        "max_accuracy_drop",
        "max_macro_f1_drop",
        "class_recall:a",
        "class_recall:b",
        "mcnemar",
    ]
    assert names(report) == [f"{n}@benchmark" for n in per_split] + [f"{n}@test" for n in per_split] + ["max_model_mb"]
    assert report.splits == ("benchmark", "test")
    assert report.verdict == "reject"
    assert all(name.endswith("@test") for name in (r.name for r in report.failures()))
    assert rule(report, "mcnemar@benchmark").passed and not rule(report, "mcnemar@test").passed
    # The headline is the first split; the report keeps each.
    assert report.challenger["n"] == 50 and report.mcnemar.champion_only == 3
    loaded = json.loads(json.dumps(report.to_dict()))
    assert loaded["judged_on"] == ["benchmark", "test"] and loaded["judge_rule"] == "judge_on: both"
    assert loaded["splits"]["test"]["mcnemar"]["champion_only"] == 12
    assert loaded["challenger"] == loaded["splits"]["benchmark"]["challenger"]
    numbers = gate_metrics(report)
    assert numbers["judged_on"] == "benchmark+test" and numbers["splits"]["test"]["mcnemar"]["champion_only"] == 12
    text = render_markdown(report, "3", "2")
    assert "judged on benchmark and test (judge_on: both)" in text
    assert "McNemar (exact, test): challenger-only 0, champion-only 12" in text
    rows = per_class_rows(report, AB)
    assert [(row["split"], row["class"]) for row in rows] == [
        ("benchmark", "a"),
        ("benchmark", "b"),
        ("test", "a"),
        ("test", "b"),
    ]


def test_one_split_keeps_plain_rule_names_and_says_what_was_judged() -> None:
    y_true, challenger, champion = paired_preds(40, 3, 3, 4)
    data = {"benchmark": SplitPredictions(y_true, challenger, champion)}

    report = evaluate_gate_on(data, AB, lax(), selection="auto: the benchmark set was scored")

    assert "mcnemar" in names(report) and not any("@" in n for n in names(report))
    assert report.to_dict()["judged_on"] == ["benchmark"]
    assert "judged on benchmark (auto: the benchmark set was scored)" in render_markdown(report, "2", "1")
    assert gate_metrics(report)["judged_on"] == "benchmark" and "splits" not in gate_metrics(report)


def test_a_champion_scored_on_some_splits_only_is_refused() -> None:
    data = _two_splits(test_lost=0)
    data["test"] = SplitPredictions(data["test"].y_true, data["test"].challenger, None)

    with pytest.raises(ValueError, match=r"champion was scored on \['benchmark'\]"):
        evaluate_gate_on(data, AB, lax())


# ---------------------------------------------------------------- champion comparisons


def test_accuracy_drop_of_exactly_the_threshold_passes() -> None:
    # 200 images: champion 183 right (0.915), challenger 182 (0.910), a drop of one image = 0.005,
    # which floating point computes as 0.0050000000000000044.
    y_true, challenger, champion = paired_preds(182, 0, 1, 17)

    at = evaluate_gate(y_true, challenger, champion, AB, lax(max_accuracy_drop=0.005))
    tighter = evaluate_gate(y_true, challenger, champion, AB, lax(max_accuracy_drop=0.0049))

    assert rule(at, "max_accuracy_drop").value == pytest.approx(0.005)
    assert rule(at, "max_accuracy_drop").passed and at.verdict == "promote"
    assert not rule(tighter, "max_accuracy_drop").passed and tighter.verdict == "reject"
    assert "0.9100 vs champion 0.9150" in rule(tighter, "max_accuracy_drop").detail


def test_a_better_challenger_has_a_negative_drop_and_passes_a_zero_budget() -> None:
    y_true, challenger, champion = paired_preds(182, 1, 0, 17)

    report = evaluate_gate(y_true, challenger, champion, AB, lax(max_accuracy_drop=0.0, max_macro_f1_drop=0.0))

    assert rule(report, "max_accuracy_drop").value < 0
    assert report.verdict == "promote"


def test_macro_f1_drop_passes_at_threshold_and_fails_below() -> None:
    y_true, challenger, champion = paired_preds(30, 1, 5, 4)
    drop = compute_metrics(y_true, champion, AB)["macro_f1"] - compute_metrics(y_true, challenger, AB)["macro_f1"]
    assert drop > 0

    at = evaluate_gate(y_true, challenger, champion, AB, lax(max_macro_f1_drop=drop))
    tighter = evaluate_gate(y_true, challenger, champion, AB, lax(max_macro_f1_drop=drop - 1e-6))

    assert rule(at, "max_macro_f1_drop").passed
    assert rule(at, "max_macro_f1_drop").value == pytest.approx(drop)
    assert not rule(tighter, "max_macro_f1_drop").passed and tighter.verdict == "reject"


def test_better_overall_challenger_that_destroys_one_class_is_rejected() -> None:
    # 100 images per class. Champion: 90 right in every class (accuracy 0.90).
    # Challenger: perfect on a and b, 80 right on c (accuracy 0.933): better on average, c recall -10 points.
    y_true = np.repeat([0, 1, 2], 100)
    position = np.tile(np.arange(100), 3)
    champion = predict(y_true, position >= 10, 3)
    challenger = predict(y_true, (y_true != 2) | (position >= 20), 3)

    report = evaluate_gate(y_true, challenger, champion, ABC, GateConfig())

    assert report.challenger["accuracy"] > report.champion["accuracy"]
    assert report.verdict == "reject"
    assert [r.name for r in report.failures()] == ["class_recall:c"]
    assert rule(report, "class_recall:c").value == pytest.approx(0.10)
    assert rule(report, "class_recall:a").value == pytest.approx(-0.10)
    assert report.reasons().startswith("class_recall:c: 0.8000 vs champion 0.9000")


def test_class_recall_drop_passes_at_threshold_and_fails_just_below() -> None:
    # Class a: 20 images; champion gets all, challenger 19: recall drop 0.05 (1.0 - 0.95 is 0.050000000000000044).
    # One lost image is p = 0.5 in the per-class test: alpha 0.6 calls it significant, so the
    # drop threshold alone decides (and the overall McNemar, p = 1, stays quiet).
    y_true = np.array([0] * 20 + [1] * 20)
    champion = y_true.copy()
    challenger = predict(y_true, np.arange(40) != 0, 2)

    at = evaluate_gate(y_true, challenger, champion, AB, lax(max_class_recall_drop=0.05, alpha=0.6))
    tighter = evaluate_gate(y_true, challenger, champion, AB, lax(max_class_recall_drop=0.049, alpha=0.6))

    assert rule(at, "class_recall:a").passed and at.verdict == "promote"
    assert not rule(tighter, "class_recall:a").passed
    assert rule(tighter, "class_recall:b").passed


def test_one_image_lost_of_two_is_no_evidence_and_does_not_fail_the_class() -> None:
    # Class b has 2 images: the champion gets both, the challenger one. Recall drops 50
    # points, but one discordant image is p = 0.5. The test split's 2-3 images per class
    # used to decide promotions this way.
    y_true = np.array([0] * 40 + [1] * 2)
    champion = y_true.copy()
    challenger = predict(y_true, np.arange(42) != 41, 2)

    report = evaluate_gate(y_true, challenger, champion, AB, lax(max_class_recall_drop=0.05, alpha=0.05))

    guard = rule(report, "class_recall:b")
    assert guard.value == pytest.approx(0.5) and guard.passed
    assert (
        guard.detail
        == "0.5000 vs champion 1.0000 (drop 0.5000) on 2 images: champion-only 1, challenger-only 0, one-sided p=0.5"
    )
    assert report.verdict == "promote"


def test_a_real_recall_collapse_on_a_well_supported_class_fails() -> None:
    # Class a: 100 images, recall 0.95 -> 0.60: 35 images lost, none gained (p = 2^-35).
    y_true = np.array([0] * 100 + [1] * 100)
    position = np.arange(200)
    champion = predict(y_true, (y_true == 1) | (position >= 5), 2)
    challenger = predict(y_true, (y_true == 1) | (position >= 40), 2)

    report = evaluate_gate(y_true, challenger, champion, AB, GateConfig())

    guard = rule(report, "class_recall:a")
    assert not guard.passed and guard.value == pytest.approx(0.35)
    assert f"on 100 images: champion-only 35, challenger-only 0, one-sided p={0.5**35:.4g}" in guard.detail
    assert guard.threshold == "<= 0.05 or p >= 0.05"
    assert "class_recall:a" in [r.name for r in report.failures()]


@pytest.mark.parametrize(
    ("lost", "gained", "passed"),
    [
        (4, 0, True),  # 4 of 4 lost: drop 1.0 but p = 1/16 = 0.0625
        (5, 0, False),  # p = 1/32
        (7, 2, True),  # drop 0.5 but p = 0.09
    ],
)
def test_the_class_guard_needs_a_significant_drop(lost: int, gained: int, passed: bool) -> None:
    # Class a: ``lost`` images only the champion gets, ``gained`` only the challenger; class b perfect for both.
    n_a = lost + gained
    y_true = np.array([0] * n_a + [1] * 50)
    champion_ok = np.arange(len(y_true)) >= gained  # wrong on the first ``gained``
    challenger_ok = (np.arange(len(y_true)) < gained) | (np.arange(len(y_true)) >= n_a)

    report = evaluate_gate(
        y_true,
        predict(y_true, challenger_ok, 2),
        predict(y_true, champion_ok, 2),
        AB,
        lax(alpha=0.05, max_class_recall_drop=0.05),
    )

    assert rule(report, "class_recall:a").passed is passed
    assert f"one-sided p={worse_p_value(lost, gained):.4g}" in rule(report, "class_recall:a").detail


def test_a_significant_but_small_class_drop_passes() -> None:
    # 1000 images of a; 30 lost, none gained: p tiny, but 3 points are within the 5-point budget.
    y_true = np.array([0] * 1000 + [1] * 10)
    champion = y_true.copy()
    challenger = predict(y_true, np.arange(1010) >= 30, 2)

    report = evaluate_gate(y_true, challenger, champion, AB, lax(alpha=0.05, max_class_recall_drop=0.05))

    assert rule(report, "class_recall:a").passed


def test_worse_p_value_is_the_one_sided_binomial_tail() -> None:
    assert worse_p_value(0, 0) == 1.0
    assert worse_p_value(1, 0) == 0.5
    assert worse_p_value(5, 0) == pytest.approx(1 / 32)
    assert worse_p_value(7, 2) == pytest.approx(sum(math.comb(9, k) for k in range(7, 10)) / 2**9)
    assert worse_p_value(0, 5) == 1.0  # the challenger ahead is never evidence of a drop


def test_classes_absent_from_the_split_get_no_recall_rule() -> None:
    y_true = np.arange(10) % 2  # no class c
    report = evaluate_gate(y_true, y_true, y_true.copy(), ABC, lax())

    assert "class_recall:a" in names(report) and "class_recall:b" in names(report)
    assert "class_recall:c" not in names(report)


@pytest.mark.parametrize(
    ("counts", "alpha", "passed"),
    [
        ((5, 2, 10, 3), 0.05, False),  # significantly worse
        ((5, 10, 2, 3), 0.05, True),  # significantly better
        ((5, 2, 10, 3), 0.03, True),  # worse but p = 0.039 is not below alpha
        ((5, 3, 3, 3), 0.05, True),  # a tie
    ],
)
def test_mcnemar_not_worse_fails_only_a_significantly_worse_challenger(
    counts: tuple[int, int, int, int], alpha: float, passed: bool
) -> None:
    y_true, challenger, champion = paired_preds(*counts)

    report = evaluate_gate(y_true, challenger, champion, AB, lax(alpha=alpha))

    assert rule(report, "mcnemar").passed is passed
    assert report.verdict == ("promote" if passed else "reject")


@pytest.mark.parametrize(
    ("counts", "alpha", "passed"),
    [
        ((5, 10, 2, 3), 0.05, True),  # significantly better
        ((5, 10, 2, 3), 0.03, False),  # better but p = 0.039 is not below alpha
        ((5, 2, 10, 3), 0.05, False),  # significantly worse
        ((5, 3, 3, 3), 0.05, False),  # a tie
    ],
)
def test_mcnemar_significantly_better_passes_only_a_significantly_better_challenger(
    counts: tuple[int, int, int, int], alpha: float, passed: bool
) -> None:
    y_true, challenger, champion = paired_preds(*counts)

    report = evaluate_gate(y_true, challenger, champion, AB, lax(alpha=alpha, significance="significantly_better"))

    assert rule(report, "mcnemar").passed is passed


def test_mcnemar_p_equal_to_alpha_is_not_significant() -> None:
    y_true, challenger, champion = paired_preds(5, 2, 10, 3)
    p = mcnemar_test(challenger == y_true, champion == y_true).p_value

    at = evaluate_gate(y_true, challenger, champion, AB, lax(alpha=p))
    above = evaluate_gate(y_true, challenger, champion, AB, lax(alpha=float(np.nextafter(p, 1.0))))

    assert rule(at, "mcnemar").passed
    assert not rule(above, "mcnemar").passed
    assert above.mcnemar is not None and (above.mcnemar.challenger_only, above.mcnemar.champion_only) == (2, 10)


# ---------------------------------------------------------------- budgets


@pytest.mark.parametrize(("name", "kwarg"), [("max_model_mb", "model_mb"), ("max_latency_ms", "latency_ms")])
def test_budget_passes_at_threshold_fails_above_and_fails_when_not_measured(name: str, kwarg: str) -> None:
    y_true = np.arange(10) % 2
    cfg = lax(**{name: 20.0})

    at = evaluate_gate(y_true, y_true, None, AB, cfg, **{kwarg: 20.0})
    above = evaluate_gate(y_true, y_true, None, AB, cfg, **{kwarg: 20.01})
    unmeasured = evaluate_gate(y_true, y_true, None, AB, cfg)

    assert rule(at, name).passed and at.verdict == "promote"
    assert not rule(above, name).passed and above.verdict == "reject"
    assert not rule(unmeasured, name).passed and unmeasured.verdict == "reject"
    assert rule(unmeasured, name).value is None
    assert unmeasured.reasons() == f"{name}: not measured"


def test_unconfigured_budgets_add_no_rule_even_when_measured() -> None:
    y_true = np.arange(10) % 2

    report = evaluate_gate(y_true, y_true, None, AB, lax(), model_mb=1e6, latency_ms=1e6)

    assert names(report) == ["min_accuracy", "min_macro_f1"]
    assert report.verdict == "promote"


# ---------------------------------------------------------------- no champion


def test_without_champion_only_floors_and_budgets_apply() -> None:
    y_true = np.arange(10) % 2
    # A challenger that would fail every comparison rule if there were a champion to compare with.
    cfg = GateConfig(min_accuracy=0.5, min_macro_f1=0.5, max_model_mb=10, significance="significantly_better")
    challenger = predict(y_true, np.arange(10) >= 2, 2)

    report = evaluate_gate(y_true, challenger, None, AB, cfg, model_mb=5.0)

    assert names(report) == ["min_accuracy", "min_macro_f1", "max_model_mb"]
    assert report.mcnemar is None and report.champion is None
    assert report.verdict == "promote" and report.reasons() == ""


# ---------------------------------------------------------------- presentation


@pytest.fixture(scope="module")
def rejected() -> GateReport:
    y_true, challenger, champion = paired_preds(50, 2, 10, 3)
    cfg = GateConfig(min_accuracy=0.5, min_macro_f1=0.5, max_model_mb=100)
    return evaluate_gate(y_true, challenger, champion, AB, cfg)


def test_to_dict_is_json_serialisable(rejected: GateReport) -> None:
    loaded = json.loads(json.dumps(rejected.to_dict()))

    assert loaded["verdict"] == "reject"
    assert [r["name"] for r in loaded["rules"]] == names(rejected)
    assert loaded["mcnemar"]["challenger_only"] == 2 and loaded["mcnemar"]["champion_only"] == 10
    assert loaded["challenger"]["accuracy"] == pytest.approx(rejected.challenger["accuracy"])
    assert set(loaded["champion"]["per_class"]) == set(AB)
    assert loaded["reasons"] == rejected.reasons()


def test_to_dict_without_champion_is_json_serialisable() -> None:
    y_true = np.arange(10) % 2
    loaded = json.loads(json.dumps(evaluate_gate(y_true, y_true, None, AB, lax()).to_dict()))

    assert loaded["verdict"] == "promote"
    assert loaded["champion"] is None and loaded["mcnemar"] is None


def test_render_markdown_shows_verdict_rules_counts_and_reasons(rejected: GateReport) -> None:
    text = render_markdown(rejected, "7", "6")

    assert text.startswith("# Gate: REJECT")
    assert "v7 vs champion v6" in text
    for r in rejected.rules:
        assert f"| {r.name} |" in text
    assert "challenger-only 2, champion-only 10" in text
    assert "max_model_mb" in text and "not measured" in text
    for failed in rejected.failures():
        assert f"- {failed.name}: {failed.detail}" in text


def test_render_markdown_without_champion_has_no_mcnemar_section() -> None:
    y_true = np.arange(10) % 2
    text = render_markdown(evaluate_gate(y_true, y_true, None, AB, lax()), "1", None)

    assert text.startswith("# Gate: PROMOTE")
    assert "McNemar" not in text and "Failed" not in text
    assert "no champion" in text


def test_per_class_rows_signs_and_order() -> None:
    # Challenger gains two a-images and loses four b-images versus the champion.
    y_true = np.array([0] * 10 + [1] * 10)
    champion = predict(y_true, np.isin(np.arange(20), [0, 1], invert=True), 2)
    challenger = predict(y_true, np.isin(np.arange(20), [10, 11, 12, 13], invert=True), 2)
    report = evaluate_gate(y_true, challenger, champion, AB, lax())

    rows = per_class_rows(report, AB)

    assert [row["class"] for row in rows] == list(AB)
    assert rows[0]["recall_change"] == pytest.approx(0.2)
    assert rows[1]["recall_change"] == pytest.approx(-0.4)
    assert rows[1]["champion_recall"] == 1.0 and rows[1]["challenger_recall"] == pytest.approx(0.6)


def test_per_class_rows_without_champion() -> None:
    y_true = np.arange(9) % 3
    rows = per_class_rows(evaluate_gate(y_true, y_true, None, ABC, lax()), ABC)

    assert len(rows) == 3
    assert all(row["challenger_recall"] == 1.0 for row in rows)
    assert all(row[key] is None for row in rows for key in ("champion_precision", "champion_recall", "recall_change"))


# ---------------------------------------------------------------- latency


class _Mean(torch.nn.Module):
    """uint8 NHWC in, one score per image out."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2).float().mean(dim=(1, 2, 3)) * self.scale


def test_measure_latency_ms_returns_positive_median_and_restores_mode() -> None:
    model = _Mean().train()

    latency = measure_latency_ms(model, (8, 8, 3), repeats=3)

    assert isinstance(latency, float) and latency > 0
    assert model.training


def test_measure_latency_ms_rejects_zero_repeats() -> None:
    with pytest.raises(ValueError, match="repeats"):
        measure_latency_ms(_Mean(), (8, 8, 3), repeats=0)


# ---------------------------------------------------------------- gate IO (no registry)


def test_benchmark_counts_as_scored_only_with_a_row(tmp_path) -> None:
    from tasks.common.workspace import Workspace
    from tasks.gate import benchmark_scored

    ws = Workspace(tmp_path)
    assert not benchmark_scored(ws)
    ws.evaluation.mkdir(parents=True)
    ws.predictions("benchmark").write_text("sha256,batch_id,path,actual,predicted,confidence,p:a,p:b\n")
    assert not benchmark_scored(ws)
    with ws.predictions("benchmark").open("a") as fh:
        fh.write("x,benchmark,x.png,a,a,0.9,0.9,0.1\n")
    assert benchmark_scored(ws)


def test_derived_floors_need_the_baseline_of_each_judged_split(tmp_path) -> None:
    from tasks.common.config import parse_params
    from tasks.common.files import write_json
    from tasks.common.workspace import Workspace
    from tasks.gate import read_baselines
    from tasks.model.predictions import Predictions

    ws = Workspace(tmp_path)
    judged = {"benchmark": Predictions([], np.zeros(4, int), np.zeros(4, int), np.zeros((4, 2)), AB)}
    derived = parse_params({"classes": list(AB)})
    explicit = parse_params({"classes": list(AB), "gate": {"min_accuracy": 0.5, "min_macro_f1": 0.5}})

    assert read_baselines(explicit, ws, judged) is None  # nothing to derive: evaluate's file is not needed
    with pytest.raises(PipelineError, match=r"missing .*baseline\.json"):
        read_baselines(derived, ws, judged)
    write_json(ws.baseline, {"splits": {"test": {"accuracy": 0.7, "macro_f1": 0.6, "n": 9}}})
    with pytest.raises(PipelineError, match="no scores for the current benchmark split"):
        read_baselines(derived, ws, judged)
    write_json(ws.baseline, {"splits": {"benchmark": {"accuracy": 0.7, "macro_f1": 0.6, "n": 4}}})
    assert read_baselines(derived, ws, judged) == {"benchmark": {"accuracy": 0.7, "macro_f1": 0.6, "n": 4}}
