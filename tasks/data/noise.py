"""Label-noise screening of a new batch, from a trained model's probabilities (pure: no IO).

A row is a suspect when the model is confident that it belongs to a class other than its given
label: confident learning (Northcutt et al., JAIR 2021; cleanlab's confident joint, off its
diagonal). "Confident" is a per-class threshold, each class's mean predicted probability over
held-out images of that class, or one number for every class. The thresholds and the model's
own suspect rate come from its predictions on held-out images it never trained on, so a batch
is measured exactly as the model's own mistakes were. A batch is noisy when a one-sided exact
binomial test says its suspect count is above that rate: above the rate's upper confidence
bound (a small held-out set does not pass for a perfect model), plus a tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NoiseProfile:
    """The yardstick: per-class confidence thresholds and the model's own suspect count on
    ``n`` held-out images."""

    thresholds: np.ndarray
    suspects: int
    n: int

    @property
    def rate(self) -> float:
        return self.suspects / self.n if self.n else 0.0


@dataclass(frozen=True)
class NoiseScreen:
    """One batch's screen: its suspect rows (most confident first), the class the model puts
    each in and with what probability, and the test's outcome."""

    suspects: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray
    n: int
    baseline: float  # the model's own suspect rate on held-out images
    reference: float  # the rate the batch is tested against: baseline's upper bound + tolerance
    p_value: float
    noisy: bool

    @property
    def rate(self) -> float:
        return len(self.suspects) / self.n if self.n else 0.0

    def summary(self) -> str:
        return (
            f"{len(self.suspects)} of {self.n} rows suspect ({self.rate:.1%}) against the champion's own "
            f"{self.baseline:.1%} on held-out images (tested above {self.reference:.1%}: p = {self.p_value:.2g})"
        )


def confident_thresholds(labels: np.ndarray, probabilities: np.ndarray, confidence: float | None) -> np.ndarray:
    """Per class: ``confidence`` when given, else the mean probability of the class over the
    rows labelled with it (a class with no row gets a threshold no probability reaches)."""
    if confidence is not None:
        return np.full(probabilities.shape[1], float(confidence))
    from cleanlab.count import get_confident_thresholds

    return np.asarray(get_confident_thresholds(labels, probabilities), dtype=np.float64)


def find_suspects(labels: np.ndarray, probabilities: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Rows counted off the diagonal of the confident joint: confidently in a class other than
    their label."""
    if not len(labels):
        return np.empty(0, dtype=np.int64)
    from cleanlab.count import compute_confident_joint

    _, off_diagonal = compute_confident_joint(
        labels, probabilities, thresholds=thresholds, calibrate=False, return_indices_of_off_diagonals=True
    )
    return np.asarray(off_diagonal, dtype=np.int64)


def profile(labels: np.ndarray, probabilities: np.ndarray, confidence: float | None = None) -> NoiseProfile:
    """The yardstick from a model's predictions on held-out images (``labels`` their true classes)."""
    thresholds = confident_thresholds(labels, probabilities, confidence)
    return NoiseProfile(thresholds, len(find_suspects(labels, probabilities, thresholds)), len(labels))


def reference_rate(champion: NoiseProfile, alpha: float, tolerance: float) -> float:
    """The one-sided (1 - alpha) upper bound of the champion's own suspect rate, plus ``tolerance``."""
    if champion.n == 0:
        return 1.0
    from scipy.stats import binomtest  # not at import: every watch tick imports ingest, few batches are screened

    bound = binomtest(champion.suspects, champion.n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact")
    return min(1.0, bound.high + tolerance)


def screen(
    labels: np.ndarray, probabilities: np.ndarray, champion: NoiseProfile, alpha: float, tolerance: float
) -> NoiseScreen:
    """Suspects of a batch (``labels``: its given classes) and whether their count is
    significantly above the champion's own rate."""
    from scipy.stats import binomtest

    suspects = find_suspects(labels, probabilities, champion.thresholds)
    # The class each suspect is put in: the most probable one other than its given label.
    others = probabilities[suspects].copy()
    others[np.arange(len(suspects)), labels[suspects]] = -1.0
    predicted = others.argmax(1) if len(suspects) else np.empty(0, dtype=np.int64)
    confidence = probabilities[suspects, predicted] if len(suspects) else np.empty(0)
    order = np.argsort(-confidence, kind="stable")
    n, reference = len(labels), reference_rate(champion, alpha, tolerance)
    p_value = binomtest(len(suspects), n, reference, alternative="greater").pvalue if n and reference < 1 else 1.0
    return NoiseScreen(
        suspects[order], predicted[order], confidence[order], n, champion.rate, reference, float(p_value),
        bool(p_value < alpha),
    )  # fmt: skip
