"""Detection and false-alarm rates of the label-noise screen at ingest, with a real champion.

A champion is trained with the pipeline's own training core on the first Fashion-MNIST training
images (``--train-images``), then scores the official 10,000-image test set, which it never saw,
once; the scores are cached under ``--cache``, so a rerun only samples. Half of the test set
(a seeded random half) is the champion's held-out yardstick, as the benchmark's predictions are at
ingest; batches are drawn from the other half. Each trial draws a batch of ``n`` images and
corrupts a fraction of its labels, shifted (to the next class: the case a label-drift check
cannot see) or flipped (to a random other class), and asks the screen (``tasks.data.noise``, the
functions ingest uses, with ``ingest.label_noise`` from ``--params``) whether it is noisy.
Prints a table and writes it as JSON to ``--out``.

    uv run python bench/label_noise.py --trials 1000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_fmnist import parse_overrides
from tasks.common.config import LabelNoiseConfig, TrainConfig, load_params
from tasks.data.noise import profile, screen

log = logging.getLogger("bench.label_noise")

SIZES = (40, 300, 3000)
FRACTIONS = (0.05, 0.2, 1.0)
KINDS = ("shifted", "flipped")


def champion_scores(cache: Path, train_images: int, train: TrainConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """The trained champion's softmax on the official test set, and the test labels (cached)."""
    key = hashlib.sha256(json.dumps([train_images, train.model_dump()], sort_keys=True).encode()).hexdigest()[:12]
    path = cache / f"scores-{key}.npz"
    if path.is_file():
        saved = np.load(path)
        log.info("champion scores from %s", path)
        return saved["probabilities"], saved["labels"], json.loads(str(saved["info"]))
    import torch

    from bench.train_fmnist import as_rgb
    from tasks.data.fashion_mnist import CLASSES, find_source, load_split
    from tasks.model.network import ImageClassifier, ModelSpec, Preprocessing, build_model, predict_logits
    from tasks.model.predictions import softmax
    from tasks.model.trainer import Trainer, resolve_device

    torch.manual_seed(train.seed)
    source = find_source(cache)
    x, y = load_split(source, "train")
    xt, yt = load_split(source, "test")
    n, v = train_images, 1000
    device = resolve_device(train.device)
    backbone = build_model(train.backbone, len(CLASSES), train.weights, train.drop_rate)
    spec = ModelSpec(train.backbone, CLASSES, Preprocessing.for_model(backbone, train.image_size), train.drop_rate)
    model = ImageClassifier(backbone, spec)
    started = time.monotonic()
    Trainer(model, train, device, checkpoint=None).fit(
        (as_rgb(x[:n]), y[:n].astype(np.int64)), (as_rgb(x[n : n + v]), y[n : n + v].astype(np.int64))
    )
    train_s = time.monotonic() - started
    started = time.monotonic()
    probabilities = softmax(predict_logits(model, as_rgb(xt), 512, device).astype(np.float64))
    info = {
        "train_images": n, "train_seconds": round(train_s, 1), "score_seconds": round(time.monotonic() - started, 1),
        "test_accuracy": round(float((probabilities.argmax(1) == yt).mean()), 4), "train": train.model_dump(),
    }  # fmt: skip
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, probabilities=probabilities, labels=yt.astype(np.int64), info=json.dumps(info))
    log.info("champion: %s; scores cached in %s", info, path)
    return probabilities, yt.astype(np.int64), info


def time_scoring(cache: Path, images: int, train: TrainConfig) -> dict:
    """Seconds the ingest path (``tasks.label_noise.Champion.probabilities``: read each PNG file,
    decode it as prepare does, run the network in chunks) takes for ``images`` Fashion-MNIST test
    images, with a network of the champion's architecture and input size on the CPU."""
    import torch
    from PIL import Image

    from tasks.data.fashion_mnist import CLASSES, find_source, load_split
    from tasks.label_noise import Champion
    from tasks.model.network import ImageClassifier, ModelSpec, Preprocessing, build_model
    from tasks.model.serving import Decoding, ImageClassifierModel

    folder = cache / f"pngs-{images}"
    if not (folder / "complete").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(load_split(find_source(cache), "test")[0][:images]):
            Image.fromarray(image, mode="L").save(folder / f"{i:05d}.png")
        (folder / "complete").touch()
    backbone = build_model(train.backbone, len(CLASSES), train.weights, train.drop_rate)
    spec = ModelSpec(train.backbone, CLASSES, Preprocessing.for_model(backbone, train.image_size), train.drop_rate)
    model = ImageClassifierModel(Decoding(28, ("PNG", "JPEG"), 4096 * 4096))
    model.classifier = ImageClassifier(backbone, spec).to(torch.device("cpu")).eval()
    files = sorted(folder.glob("*.png"))
    started = time.monotonic()
    Champion("-", "-", None, model).probabilities(files, "bench")  # type: ignore[arg-type]
    seconds = time.monotonic() - started
    log.info("scored %d PNG files in %.1f s (%.0f images/s)", len(files), seconds, len(files) / seconds)
    return {"images": len(files), "seconds": round(seconds, 1), "images_per_s": round(len(files) / seconds, 1)}


def corrupt(labels: np.ndarray, fraction: float, kind: str, classes: int, rng: np.random.Generator) -> np.ndarray:
    """``labels`` with round(fraction * n) of them shifted to the next class or flipped to a random other one."""
    out = labels.copy()
    rows = rng.choice(len(labels), round(fraction * len(labels)), replace=False)
    step = 1 if kind == "shifted" else rng.integers(1, classes, len(rows))
    out[rows] = (labels[rows] + step) % classes
    return out


def measure(
    probabilities: np.ndarray, labels: np.ndarray, noise: LabelNoiseConfig, trials: int, seed: int
) -> tuple[dict, list[dict]]:
    """The champion's yardstick (from one half of the scored images) and one row per batch size and corruption."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    held_out, pool = order[: len(order) // 2], order[len(order) // 2 :]
    champion = profile(labels[held_out], probabilities[held_out], noise.confidence)
    log.info("champion yardstick: %d of %d held-out images suspect (%.2f%%)", champion.suspects, champion.n,
             100 * champion.rate)  # fmt: skip
    classes = probabilities.shape[1]
    rows = []
    for n in SIZES:
        for kind, fraction in [("clean", 0.0), *((k, f) for k in KINDS for f in FRACTIONS)]:
            held, rates = 0, []
            for _ in range(trials):
                batch = rng.choice(pool, n, replace=False)
                given = corrupt(labels[batch], fraction, kind, classes, rng) if fraction else labels[batch]
                result = screen(given, probabilities[batch], champion, noise.alpha, noise.tolerance)
                held += result.noisy
                rates.append(result.rate)
            rows.append({
                "n": n, "labels": kind, "fraction": fraction, "trials": trials, "flagged": held / trials,
                "mean_suspect_rate": round(float(np.mean(rates)), 4),
            })  # fmt: skip
            log.info("n=%d %s %.0f%%: flagged %.3f", n, kind, 100 * fraction, held / trials)
    return {"champion_rate": round(champion.rate, 4), "held_out": champion.n}, rows


def markdown(rows: list[dict]) -> str:
    lines = ["| labels | n = 40 | n = 300 | n = 3000 |", "|---|---|---|---|"]
    cells: dict[tuple[str, float], dict[int, float]] = {}
    for r in rows:
        cells.setdefault((r["labels"], r["fraction"]), {})[r["n"]] = r["flagged"]
    for (kind, fraction), by_n in cells.items():
        name = "clean (false alarms)" if kind == "clean" else f"{fraction:.0%} {kind}"
        lines.append(f"| {name} | " + " | ".join(f"{by_n[n]:.3f}" for n in SIZES) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-images", type=int, default=10000, help="champion training images (default 10000)")
    parser.add_argument("--set", nargs="*", default=["epochs=2"], help="TrainConfig overrides key=value")
    parser.add_argument("--params", default="params.yaml", help="ingest.label_noise is read from here")
    parser.add_argument("--noise", nargs="*", default=[], help="ingest.label_noise overrides key=value")
    parser.add_argument("--trials", type=int, default=1000, help="batches drawn per cell (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scoring-images", type=int, default=3000, help="time ingest's scoring on this many (0: no)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/label-noise-bench"), help="cached champion scores")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default: <cache>/results.json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    started = time.monotonic()
    configured = load_params(args.params).ingest.label_noise.model_dump()
    noise = LabelNoiseConfig(**{**configured, **parse_overrides(args.noise)})
    train = TrainConfig(**parse_overrides(args.set))
    probabilities, labels, champion = champion_scores(args.cache, args.train_images, train)
    yardstick, rows = measure(probabilities, labels, noise, args.trials, args.seed)
    scoring = time_scoring(args.cache, args.scoring_images, train) if args.scoring_images else None
    result = {"champion": champion, "yardstick": yardstick, "label_noise": noise.model_dump(), "seed": args.seed,
              "rows": rows, "scoring": scoring, "seconds": round(time.monotonic() - started, 1)}  # fmt: skip
    out = args.out or args.cache / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(markdown(rows))
    print(
        f"champion test accuracy {champion['test_accuracy']}, own suspect rate {yardstick['champion_rate']:.4f} on "
        f"{yardstick['held_out']} held-out images; {noise.model_dump()}; ingest scoring {scoring}; "
        f"{result['seconds']} s in all; {out}"
    )


if __name__ == "__main__":
    main()
