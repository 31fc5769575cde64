"""Our side of the benchmark: the pipeline's training core on the same images, as uint8 arrays.

The model is built as ``bench/train_fmnist.py`` builds it (TrainConfig -> build_model ->
ImageClassifier) and trained by ``tasks.train.Trainer.fit``, the code the train stage runs.
The test set is handed to ``fit`` as its validation split, so the Trainer scores it after
every epoch, outside its training timer. Epoch times are the Trainer's own: the training
loop only; it reads the loss every step, which waits for queued CUDA work.
``bench/run.py`` starts it in its own process; by hand:

    python -m bench.ours --train-dir .cache/bench/png-4000/train --test-dir .cache/bench/png-4000/test \
        --config '{"strategy": "fine_tune", "image_size": 96}'
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch

from bench.data import read_arrays
from bench.reference import emit, epoch_record, peak_memory, reset_peak_memory, synchronize
from tasks.common.config import TrainConfig
from tasks.model.network import ImageClassifier, ModelSpec, Preprocessing, build_model
from tasks.model.trainer import SplitData, Trainer, cached_inputs, resolve_device, uses_feature_cache

log = logging.getLogger("bench.ours")


def load_rgb(directory: Path, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, H, W, 3) images and int64 labels, as the prepare stage hands them to train."""
    images, labels = read_arrays(directory, limit)
    return np.repeat(images[..., None], 3, axis=-1), labels


def build_classifier(cfg: TrainConfig, num_classes: int) -> ImageClassifier:
    backbone = build_model(cfg.backbone, num_classes, cfg.weights, cfg.drop_rate)
    classes = tuple(str(i) for i in range(num_classes))
    spec = ModelSpec(cfg.backbone, classes, Preprocessing.for_model(backbone, cfg.image_size), cfg.drop_rate)
    return ImageClassifier(backbone, spec)


def feature_inputs(
    model: ImageClassifier, cfg: TrainConfig, train: tuple, test: tuple, device: torch.device
) -> tuple[Any, Any]:
    """What the train stage trains on: cached frozen-backbone features when ``feature_cache`` applies
    (computed here from a cold cache, so the cost is counted), else the uint8 arrays themselves."""
    if not uses_feature_cache(cfg):
        return train[0], test[0]
    splits = {
        name: SplitData(images, labels, [hashlib.sha256(img.tobytes()).hexdigest() for img in images])
        for name, (images, labels) in (("train", train), ("val", test))
    }
    with tempfile.TemporaryDirectory(prefix="bench-features-") as cache:
        inputs, computed = cached_inputs(model, cfg, Path(cache), splits, device)
        # The shards are memory-mapped: load them before the directory goes away.
        for item in inputs.values():
            item.features = np.asarray(item.features[np.arange(len(item.features))])
            if item.mirrored is not None:
                item.mirrored = np.asarray(item.mirrored[np.arange(len(item.mirrored))])
    log.info("computed %d cached feature rows", computed)
    return inputs["train"], inputs["val"]


def describe(cfg: TrainConfig, model: ImageClassifier, device: torch.device) -> str:
    cached = ", cached features" if uses_feature_cache(cfg) else ""
    precision = "bf16 autocast + channels_last" if device.type == "cuda" else "fp32"
    return (
        f"timm {cfg.backbone} ({cfg.strategy}{cached}), uint8 arrays, resize + augment as tensor ops to "
        f"{model.input_size} px, {precision}, batch {cfg.batch_size}, AdamW lr {cfg.lr} warm-up + cosine"
    )


def run_ours(train_dir: Path, test_dir: Path, test_images: int | None, cfg: TrainConfig, num_classes: int) -> dict:
    torch.manual_seed(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    reset_peak_memory(device)
    train, test = load_rgb(train_dir), load_rgb(test_dir, test_images)
    model = build_classifier(cfg, num_classes)
    trainer = Trainer(model, cfg, device, checkpoint=None)
    synchronize(device)
    feature_started = time.perf_counter()
    train_inputs, test_inputs = feature_inputs(model, cfg, train, test, device)
    synchronize(device)
    feature_seconds = time.perf_counter() - feature_started
    started = time.perf_counter()
    history = trainer.fit((train_inputs, train[1]), (test_inputs, test[1]))
    synchronize(device)
    fit_seconds = time.perf_counter() - started
    seen = len(train[1])
    train_seconds = [seen / h.images_per_s for h in history]
    # The Trainer does not time its evaluation; what fit took beyond training is that.
    eval_seconds = (fit_seconds - sum(train_seconds)) / len(history)
    train_seconds[0] += feature_seconds  # a cold feature cache is paid in the first epoch
    epochs = [
        epoch_record(h.epoch, seen, s, h.train_loss, h.val_accuracy, eval_seconds)
        for h, s in zip(history, train_seconds, strict=True)
    ]
    return {
        "side": "ours",
        "description": describe(cfg, model, device),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
        "config": cfg.model_dump(),
        "weights": cfg.weights,
        "trainable_params": trainer.trainable,
        "train_images": seen,
        "test_images": len(test[1]),
        "fit_seconds": round(fit_seconds, 3),
        "feature_seconds": round(feature_seconds, 3),
        "epochs": epochs,
        # No worker processes here: the only child is an `ldconfig -p` that a CUDA library
        # forks at import, whose high-water mark is a copy of ours at that moment.
        **peak_memory(device),
        "peak_rss_worker_mb": None,
    }


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-dir", type=Path, required=True)
    parser.add_argument("--test-dir", type=Path, required=True)
    parser.add_argument("--test-images", type=int, default=None, help="first N test images (default: all)")
    parser.add_argument("--config", default="{}", help="TrainConfig fields as a JSON object")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    cfg = TrainConfig(**json.loads(args.config))
    emit(run_ours(args.train_dir, args.test_dir, args.test_images, cfg, args.num_classes), args.json_out)


if __name__ == "__main__":
    main()
