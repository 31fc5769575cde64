"""The reference: the transfer-learning loop the tutorials teach, kept faithful on purpose.

torchvision ``resnet18`` with a new fc head; a ``Dataset`` that opens each PNG with PIL and
converts it to RGB; per-sample ``Resize(224)``, ``RandomHorizontalFlip`` (train only),
``ToTensor`` and ``Normalize`` with the ImageNet mean/std; a shuffling ``DataLoader`` with
worker processes; fp32; SGD with momentum; cross-entropy; every layer trained.

No model hub is reachable here, so torchvision's ImageNet weights cannot be downloaded:
``--weights`` takes a resnet18 state_dict and the default is random init. Throughput does
not depend on the weights; accuracy and time-to-accuracy do.

Imports only torch, torchvision, numpy, PIL and the standard library, so it runs anywhere
torch does. ``bench/run.py`` starts it in its own process; by hand:

    python -m bench.reference --train-dir .cache/bench/png-4000/train --test-dir .cache/bench/png-4000/test
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

log = logging.getLogger("bench.reference")

# Hard-coded, as the tutorials do (the pipeline itself reads them from the backbone's config).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NO_WEIGHTS = "none (no hub access)"
WEIGHTS_NOTE = "throughput does not depend on the weights; accuracy and time-to-target do"
PROGRESS_EVERY_S = 30.0


# ---------------------------------------------------------------- measurement (shared with bench/ours.py)


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so a timer read afterwards covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pick_device(choice: str) -> torch.device:
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"invalid device {choice!r}; supported: auto, cpu, cuda")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available; use 'auto' or 'cpu'")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _maxrss_mb(who: int) -> float:
    kib = resource.getrusage(who).ru_maxrss
    return round(kib / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)  # bytes on macOS, KiB on Linux


def peak_memory(device: torch.device) -> dict[str, float | None]:
    """High-water marks: this process's RSS, its largest finished child's (DataLoader workers), GPU."""
    gpu = device.type == "cuda"
    return {
        "peak_rss_mb": _maxrss_mb(resource.RUSAGE_SELF),
        "peak_rss_worker_mb": _maxrss_mb(resource.RUSAGE_CHILDREN) or None,
        "peak_gpu_allocated_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if gpu else None,
        "peak_gpu_reserved_mb": round(torch.cuda.max_memory_reserved(device) / 2**20, 1) if gpu else None,
    }


def epoch_record(epoch: int, images: int, seconds: float, train_loss: float, accuracy: float, eval_s: float) -> dict:
    """One epoch as both sides report it; ``seconds`` is training time only."""
    return {
        "epoch": epoch,
        "images": images,
        "train_seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 2),
        "train_loss": round(train_loss, 4),
        "test_accuracy": round(accuracy, 4),
        "eval_seconds": round(eval_s, 3),
    }


def emit(result: dict, json_out: Path | None) -> None:
    """The result in ``json_out``, or as one stdout line when there is none."""
    text = json.dumps(result)
    if json_out is None:
        print(text, flush=True)
        return
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------- the tutorial loop


@dataclass(frozen=True)
class ReferenceConfig:
    train_dir: Path
    test_dir: Path
    test_images: int | None = None
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.001
    momentum: float = 0.9
    image_size: int = 224
    num_workers: int = 2
    num_classes: int = 10
    weights: Path | None = None
    device: str = "auto"
    threads: int | None = None
    seed: int = 42


class PngDataset(Dataset):
    """``labels.csv`` (path,label) beside the images; each item decoded by PIL when asked for."""

    def __init__(self, root: Path, transform: Callable, limit: int | None = None) -> None:
        with (root / "labels.csv").open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))[:limit]
        self.samples = [(root / row["path"], int(row["label"])) for row in rows]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        return self.transform(rgb), label


def build_transform(image_size: int, train: bool) -> transforms.Compose:
    flip = [transforms.RandomHorizontalFlip()] if train else []
    return transforms.Compose([
        transforms.Resize(image_size), *flip, transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])  # fmt: skip


def build_model(num_classes: int, weights: Path | None) -> tuple[nn.Module, str]:
    """resnet18, ImageNet weights from ``weights`` when given, and a new fc head."""
    model = torchvision.models.resnet18(weights=None)
    note = NO_WEIGHTS
    if weights is not None:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        note = str(weights)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model, note


def build_loader(dataset: Dataset, cfg: ReferenceConfig, device: torch.device, shuffle: bool) -> DataLoader:
    return DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=shuffle, num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
    )  # fmt: skip


def train_one_epoch(
    model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, device: torch.device, epoch: int
) -> tuple[int, float, float]:
    """Images seen, training seconds (data loading included: it is part of the loop), mean loss."""
    criterion = nn.CrossEntropyLoss()
    model.train()
    running_loss, seen = 0.0, 0
    synchronize(device)
    started = last_report = time.perf_counter()
    for step, (inputs, labels) in enumerate(loader, 1):
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        optimizer.zero_grad()
        loss = criterion(model(inputs), labels)
        loss.backward()
        optimizer.step()
        running_loss += loss.item() * inputs.size(0)
        seen += inputs.size(0)
        if time.perf_counter() - last_report >= PROGRESS_EVERY_S:
            last_report = time.perf_counter()
            rate = seen / (last_report - started)
            log.info("reference epoch %d [%d/%d] %.1f img/s", epoch, step, len(loader), rate)
    synchronize(device)
    return seen, time.perf_counter() - started, running_loss / max(seen, 1)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """Test accuracy and the seconds it took."""
    model.eval()
    correct, seen = 0, 0
    synchronize(device)
    started = time.perf_counter()
    for inputs, labels in loader:
        outputs = model(inputs.to(device, non_blocking=True))
        correct += int((outputs.argmax(1).cpu() == labels).sum())
        seen += labels.size(0)
    synchronize(device)
    return correct / max(seen, 1), time.perf_counter() - started


def describe(cfg: ReferenceConfig) -> str:
    return (
        f"torchvision resnet18, PIL decode per sample, Resize({cfg.image_size}) + flip, fp32, "
        f"batch {cfg.batch_size}, SGD lr {cfg.lr} momentum {cfg.momentum}, full fine-tuning, "
        f"{cfg.num_workers} DataLoader workers"
    )


def run_reference(cfg: ReferenceConfig) -> dict:
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    reset_peak_memory(device)
    model, weights_note = build_model(cfg.num_classes, cfg.weights)
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    train_set = PngDataset(cfg.train_dir, build_transform(cfg.image_size, train=True))
    test_set = PngDataset(cfg.test_dir, build_transform(cfg.image_size, train=False), cfg.test_images)
    train_loader = build_loader(train_set, cfg, device, shuffle=True)
    test_loader = build_loader(test_set, cfg, device, shuffle=False)
    epochs = []
    for epoch in range(1, cfg.epochs + 1):
        seen, seconds, loss = train_one_epoch(model, train_loader, optimizer, device, epoch)
        accuracy, eval_s = evaluate(model, test_loader, device)
        epochs.append(epoch_record(epoch, seen, seconds, loss, accuracy, eval_s))
        log.info("reference epoch %d: %.1f img/s, test accuracy %.4f", epoch, seen / seconds, accuracy)
    return {
        "side": "reference",
        "description": describe(cfg),
        "device": device_name(device),
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
        "config": {**asdict(cfg), "train_dir": str(cfg.train_dir), "test_dir": str(cfg.test_dir)},
        "weights": weights_note,
        "weights_note": WEIGHTS_NOTE,
        "train_images": len(train_set),
        "test_images": len(test_set),
        "epochs": epochs,
        **peak_memory(device),
    }


def parse_args(argv: list[str] | None = None) -> tuple[ReferenceConfig, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-dir", type=Path, required=True)
    parser.add_argument("--test-dir", type=Path, required=True)
    parser.add_argument("--test-images", type=int, default=None, help="first N test images (default: all)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-workers", type=int, default=default_workers())
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--weights", type=Path, default=None, help="a resnet18 state_dict (default: random init)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json-out", type=Path, default=None)
    args = vars(parser.parse_args(argv))
    json_out = args.pop("json_out")
    return ReferenceConfig(**args), json_out


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfg, json_out = parse_args(argv)
    emit(run_reference(cfg), json_out)


if __name__ == "__main__":
    main()
