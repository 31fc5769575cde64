"""Train the pipeline's training core straight on Fashion-MNIST, without DVC/Prefect/MLflow.

Used to tune the demo's defaults and to check the CUDA path on a GPU machine, which has
torch, timm and numpy but none of the orchestration stack. Prints one JSON line.

    python bench/train_fmnist.py --train-images 20000 --epochs 3 --set strategy=partial image_size=64
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.common.config import TrainConfig
from tasks.data.fashion_mnist import CLASSES, find_source, load_split
from tasks.model.network import ImageClassifier, ModelSpec, Preprocessing, build_model, predict_logits
from tasks.model.trainer import Trainer, resolve_device


def as_rgb(images: np.ndarray) -> np.ndarray:
    return np.repeat(images[..., None], 3, axis=-1)


def parse_overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-images", type=int, default=20000)
    parser.add_argument("--val-images", type=int, default=2000)
    parser.add_argument("--cache", default=".cache")
    parser.add_argument("--set", nargs="*", default=[], help="TrainConfig overrides key=value")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfg = TrainConfig(**parse_overrides(args.set))
    torch.manual_seed(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    source = find_source(Path(args.cache))
    x, y = load_split(source, "train")
    xt, yt = load_split(source, "test")
    n, v = args.train_images, args.val_images
    train = (as_rgb(x[:n]), y[:n].astype(np.int64))
    val = (as_rgb(x[n : n + v]), y[n : n + v].astype(np.int64))
    device = resolve_device(cfg.device)
    backbone = build_model(cfg.backbone, len(CLASSES), cfg.weights, cfg.drop_rate)
    spec = ModelSpec(cfg.backbone, CLASSES, Preprocessing.for_model(backbone, cfg.image_size), cfg.drop_rate)
    model = ImageClassifier(backbone, spec)
    trainer = Trainer(model, cfg, device, checkpoint=None)
    started = time.monotonic()
    history = trainer.fit(train, val)
    train_s = time.monotonic() - started
    t0 = time.monotonic()
    logits = predict_logits(model, as_rgb(xt), 1024, device)
    eval_s = time.monotonic() - t0
    acc = float((logits.argmax(1) == yt).mean())
    print(json.dumps({
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "config": cfg.model_dump(), "train_images": n, "train_seconds": round(train_s, 1),
        "images_per_s": [round(h.images_per_s, 1) for h in history],
        "val_accuracy": [round(h.val_accuracy, 4) for h in history],
        "benchmark_accuracy": round(acc, 4), "eval_seconds": round(eval_s, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
