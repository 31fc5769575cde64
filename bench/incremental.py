"""The incremental case on Fashion-MNIST: a batch of new images arrives after a model was trained.

1. first: train from the pretrained backbone on N images (feature cache on, so the cache holds them);
2. +new_fraction * N new images arrive (a second batch), then:
   (a) full retrain from the pretrained backbone on all 1.1N images, ``epochs`` epochs, as the
       pipeline runs it (feature cache on: only the new images' features are computed);
   (b) automatic warm start as the train stage runs it: the first model fine-tuned for
       ``warm_start_epochs`` at ``lr * warm_start_lr_mult`` on the new images plus
       ``warm_start_replay`` replayed old ones per new one (tasks.model.warm_start.warm_rows);
   (c) with ``--full-live``: the full retrain without the feature cache as well.

Wall times cover model building, feature computation and training (not the test scoring).
Accuracy is on the official 10k test set. Imports only torch/timm/numpy/pydantic (no
orchestration stack), so it runs on the GPU machine. Logs go to stderr; the last line of
stdout is one JSON object.

    python bench/incremental.py --train-images 40000 --set image_size=64 num_threads=2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_fmnist import as_rgb, parse_overrides
from tasks.common.config import TrainConfig
from tasks.data.fashion_mnist import CLASSES, find_source, load_split
from tasks.model.network import ImageClassifier, ModelSpec, Preprocessing, build_model, predict_logits, save_model
from tasks.model.trainer import SplitData, Trainer, cached_inputs, effective_config, resolve_device
from tasks.model.warm_start import warm_rows
from tasks.train import warm_start_weights

log = logging.getLogger("bench.incremental")


def image_hashes(images: np.ndarray) -> list[str]:
    """Content hashes standing in for the files' sha256 that prepare records."""
    return [hashlib.sha256(image.tobytes()).hexdigest() for image in images]


def new_classifier(cfg: TrainConfig, warm_start: Path | None = None) -> tuple[ImageClassifier, ModelSpec]:
    backbone = build_model(cfg.backbone, len(CLASSES), "none" if warm_start else cfg.weights, cfg.drop_rate)
    if warm_start is not None:
        backbone.load_state_dict(warm_start_weights(warm_start, cfg.backbone, CLASSES))
    spec = ModelSpec(cfg.backbone, CLASSES, Preprocessing.for_model(backbone, cfg.image_size), cfg.drop_rate)
    return ImageClassifier(backbone, spec), spec


def train_once(
    cfg: TrainConfig, splits: dict[str, SplitData], cache_root: Path, warm_start: Path | None = None
) -> tuple[ImageClassifier, ModelSpec, dict]:
    """Build, (cache features,) train; return the model, its spec and timings."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    started = time.monotonic()
    model, spec = new_classifier(cfg, warm_start)
    trainer = Trainer(model, cfg, device, checkpoint=None)
    computed, feature_s = 0, 0.0
    if cfg.feature_cache:
        inputs, computed = cached_inputs(model, cfg, cache_root, splits, device)
        feature_s = time.monotonic() - started
        data = {name: inputs[name] for name in splits}
    else:
        data = {name: split.images for name, split in splits.items()}
    history = trainer.fit((data["train"], splits["train"].labels), (data["val"], splits["val"].labels))
    seconds = time.monotonic() - started
    stats = {
        "seconds": round(seconds, 1),
        "feature_seconds": round(feature_s, 1),
        "features_computed": computed,
        "epochs": len(history),
        "val_accuracy": round(history[-1].val_accuracy, 4),
    }
    return model, spec, stats


def test_accuracy(model: ImageClassifier, test: tuple[np.ndarray, np.ndarray], device: torch.device) -> float:
    logits = predict_logits(model, test[0], 1024, device)
    return float((logits.argmax(1) == test[1]).mean())


def subset(split: SplitData, rows: np.ndarray) -> SplitData:
    return SplitData(split.images[rows], split.labels[rows], [split.hashes[i] for i in rows])


def load_data(args: argparse.Namespace) -> tuple[dict[str, SplitData], dict[str, SplitData], tuple]:
    """(first splits, grown splits, test set): the val split stays fixed, train grows by the new batch."""
    source = find_source(Path(args.cache))
    x, y = load_split(source, "train")
    xt, yt = load_split(source, "test")
    n, grown, v = args.train_images, int(args.train_images * (1 + args.new_fraction)), args.val_images
    if grown + v > len(x):
        raise SystemExit(f"--train-images {n} grows to {grown} + {v} val: more than the {len(x)} images")
    images, labels = as_rgb(x[: grown + v]), y[: grown + v].astype(np.int64)
    hashes = image_hashes(images)
    val = SplitData(images[grown:], labels[grown:], hashes[grown:])

    def train(end: int) -> SplitData:
        return SplitData(images[:end], labels[:end], hashes[:end])

    return {"train": train(n), "val": val}, {"train": train(grown), "val": val}, (as_rgb(xt), yt.astype(np.int64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-images", type=int, default=40000)
    parser.add_argument("--new-fraction", type=float, default=0.1)
    parser.add_argument("--val-images", type=int, default=2000)
    parser.add_argument("--cache", default=".cache", help="where Fashion-MNIST is looked for")
    parser.add_argument("--work", default=".cache/bench-incremental", help="scratch: feature cache, first model")
    parser.add_argument("--set", nargs="*", default=[], help="TrainConfig overrides key=value")
    parser.add_argument("--full-live", action="store_true", help="also time a full retrain without the cache")
    parser.add_argument(
        "--previous", help="an earlier run's output: reuse its first model (in --work) and full retrain, run (b) only"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    cfg = TrainConfig(**parse_overrides(args.set))
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    work = Path(args.work)
    previous = json.loads(Path(args.previous).read_text().splitlines()[-1]) if args.previous else None
    if previous is None:
        shutil.rmtree(work, ignore_errors=True)  # a cold feature cache: the first run fills it
    first_splits, grown_splits, test = load_data(args)
    grown, n = grown_splits["train"], len(first_splits["train"].labels)

    if previous is None:
        log.info("first model on %d images (feature cache on)", n)
        first_model, first_spec, first = train_once(cfg.model_copy(update={"feature_cache": True}), first_splits, work)
        first["test_accuracy"] = round(test_accuracy(first_model, test, device), 4)
        save_model(first_model.cpu(), first_spec, work / "first-model")
    else:
        first = previous["first"]

    # The warm start goes first, so it pays for the new images' features (the full retrain then finds them cached).
    batch_ids = ["first"] * n + ["new"] * (len(grown.labels) - n)
    rows, n_new = warm_rows(batch_ids, {"first"}, cfg.warm_start_replay, cfg.seed)
    log.info("(b) warm start: %d new + %d replayed images, feature cache on", n_new, len(rows) - n_new)
    warm_cfg = effective_config(cfg.model_copy(update={"feature_cache": True}), warm=True)
    warm_splits = {"train": subset(grown, rows), "val": grown_splits["val"]}
    warm_model, _, warm = train_once(warm_cfg, warm_splits, work, warm_start=work / "first-model")
    warm["test_accuracy"] = round(test_accuracy(warm_model, test, device), 4)
    warm.update(new_images=n_new, replayed_images=len(rows) - n_new)

    if previous is None:
        log.info("(a) full retrain from pretrained on %d images, feature cache on", len(grown.labels))
        full_model, _, full = train_once(cfg.model_copy(update={"feature_cache": True}), grown_splits, work)
        full["test_accuracy"] = round(test_accuracy(full_model, test, device), 4)
    else:
        full = previous["full_retrain"]

    live = None
    if args.full_live:
        log.info("(c) full retrain from pretrained on %d images, no feature cache", len(grown.labels))
        live_model, _, live = train_once(cfg.model_copy(update={"feature_cache": False}), grown_splits, work)
        live["test_accuracy"] = round(test_accuracy(live_model, test, device), 4)

    ratio = warm["seconds"] / full["seconds"]
    diff = 100 * (warm["test_accuracy"] - full["test_accuracy"])
    print(json.dumps({
        "bench": "incremental", "reused": args.previous,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "train_images": n, "grown_images": len(grown.labels), "config": cfg.model_dump(),
        "first": first, "full_retrain": full, "warm_start": warm, "full_retrain_live": live,
        "time_ratio": round(ratio, 3), "accuracy_diff_points": round(diff, 2),
        "time_ratio_vs_live": round(warm["seconds"] / live["seconds"], 3) if live else None,
        "targets_met": {"time_ratio<=0.15": ratio <= 0.15, "accuracy_within_0.3": diff >= -0.3},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
