"""False-alarm and detection rates of the label-drift check: the old fixed Jensen-Shannon
threshold against the chi-square test the validate stage now runs.

Each trial draws a reference of ``--reference`` labels over ``--classes`` equally likely
classes (all earlier batches) and a batch of ``n`` labels, either clean (the reference's
distribution) or shifted (one class ``--factor`` times as likely as each other one), and applies
both rules with the functions the validate stage uses (``tasks.data.validation``): the old one
warns when the distance exceeds ``--js`` (its default was 0.15), the new one when the p-value is
below ``--alpha`` (``validate.label_drift.warn_alpha``). Seeded; prints a markdown table and
writes JSON to ``--out``.

    uv run python bench/drift.py --trials 1000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.data.validation import drift_p_value, label_drift

SIZES = (40, 300, 3000)


def counts(rng: np.random.Generator, n: int, probs: np.ndarray, classes: list[str]) -> Counter[str]:
    return Counter(dict(zip(classes, rng.multinomial(n, probs).tolist(), strict=True)))


def rates(args: argparse.Namespace, n: int, shifted: bool) -> dict[str, float | int | str]:
    classes = [f"c{i}" for i in range(args.classes)]
    same = np.full(args.classes, 1 / args.classes)
    drawn = same.copy()
    if shifted:
        drawn[0] *= args.factor
        drawn /= drawn.sum()
    rng = np.random.default_rng([args.seed, n, int(shifted)])
    old = new = simulated = 0
    started = time.perf_counter()
    for _ in range(args.trials):
        reference, batch = counts(rng, args.reference, same, classes), counts(rng, n, drawn, classes)
        p_value, test = drift_p_value(batch, reference, classes)
        old += label_drift(batch, reference, classes) > args.js
        new += p_value < args.alpha
        simulated += test == "monte_carlo"
    return {
        "batch": n,
        "kind": f"one class x{args.factor:g}" if shifted else "clean",
        "old_js_rule": old / args.trials,
        "chi2_test": new / args.trials,
        "simulated_share": simulated / args.trials,
        "ms_per_test": 1000 * (time.perf_counter() - started) / args.trials,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--reference", type=int, default=6000, help="labels in the earlier batches")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--factor", type=float, default=2.0, help="how much likelier the shifted class is")
    parser.add_argument("--js", type=float, default=0.15, help="the old rule's Jensen-Shannon threshold")
    parser.add_argument("--alpha", type=float, default=0.01, help="the test's warn_alpha")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/out/drift.json"))
    args = parser.parse_args()

    rows = [rates(args, n, shifted) for shifted in (False, True) for n in args.sizes]
    print(f"{args.trials} trials per row; reference {args.reference} labels over {args.classes} classes")
    print(f"| batch | labels | JS > {args.js:g} warns | p < {args.alpha:g} warns | simulated p | ms/test |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['kind']} | {r['old_js_rule']:.1%} | {r['chi2_test']:.1%} "
            f"| {r['simulated_share']:.0%} | {r['ms_per_test']:.1f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.out.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
