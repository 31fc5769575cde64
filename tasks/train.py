"""train stage: fine-tune a pretrained timm backbone with a new head on the prepared arrays.

Batches are sliced straight from the memory-mapped uint8 arrays that prepare wrote, and
resizing, normalisation and augmentation run as tensor ops on the training device (no
per-sample PIL work, no DataLoader workers). A checkpoint is written after every epoch and
a crashed run resumes from it when its inputs are unchanged.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tasks.common import PipelineError, Workspace, run_cli, write_json
from tasks.config import PipelineConfig, TrainConfig, load_params
from tasks.model import (
    ImageClassifier,
    ModelError,
    ModelSpec,
    Preprocessing,
    build_model,
    freeze_batchnorm_stats,
    head_parameter_names,
    predict_logits,
    save_model,
    set_trainable,
)

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "phase", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "images_per_s")
#: Seconds between progress lines inside an epoch.
PROGRESS_EVERY_S = 10.0


# ---------------------------------------------------------------- pure cores


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise PipelineError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def phase_for_epoch(epoch: int, cfg: TrainConfig) -> str:
    """``head`` during warm-up epochs, then the configured strategy."""
    return "head" if epoch < cfg.head_warmup_epochs and cfg.strategy != "feature_extraction" else cfg.strategy


def augment(images: torch.Tensor, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and translation, per sample, in one affine resampling."""
    n, _, h, w = images.shape
    if not cfg.augment.hflip and cfg.augment.translate == 0:
        return images
    flip = torch.ones(n)
    if cfg.augment.hflip:
        flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 * cfg.augment.translate / torch.tensor([w, h]))
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = flip, 1.0
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def input_fingerprint(cfg: PipelineConfig, data_digest: str) -> str:
    """What a checkpoint is valid for: the train params, the label set and the data."""
    payload = json.dumps({"train": cfg.train.model_dump(), "classes": cfg.classes, "data": data_digest}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- the loop


@dataclass
class EpochStats:
    epoch: int
    phase: str
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    images_per_s: float


@dataclass(frozen=True)
class TrainResult:
    epochs: int
    val_accuracy: float
    train_seconds: float
    images_per_s: float
    trainable_params: int
    device: str


def make_optimizer(model: ImageClassifier, cfg: TrainConfig) -> torch.optim.Optimizer:
    head = {f"backbone.{n}" for n in head_parameter_names(model.backbone)}
    head_params, body_params = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head_params if name in head else body_params).append(param)
    groups = [{"params": head_params, "lr": cfg.lr, "base_lr": cfg.lr}]
    if body_params:
        body_lr = cfg.lr * cfg.backbone_lr_mult
        groups.append({"params": body_params, "lr": body_lr, "base_lr": body_lr})
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def evaluate_split(
    model: ImageClassifier, images: np.ndarray, labels: np.ndarray, batch_size: int, device: torch.device
) -> tuple[float, float]:
    if len(labels) == 0:
        return float("nan"), float("nan")
    logits = torch.from_numpy(predict_logits(model, images, batch_size, device))
    target = torch.from_numpy(labels)
    return float(F.cross_entropy(logits, target)), float((logits.argmax(1) == target).float().mean())


class Trainer:
    """Runs epochs over uint8 arrays; owns the model, optimizer and checkpointing."""

    def __init__(self, model: ImageClassifier, cfg: TrainConfig, device: torch.device, checkpoint: Path | None):
        self.model, self.cfg, self.device, self.checkpoint = model, cfg, device, checkpoint
        self.history: list[EpochStats] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.phase: str | None = None
        self.trainable = 0
        self.model.to(device)
        if device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)

    def _enter_phase(self, phase: str) -> None:
        if phase == self.phase:
            return
        self.trainable = set_trainable(
            self.model.backbone, self.cfg.strategy, self.cfg.frozen_stages, head_only=phase == "head"
        )
        self.optimizer = make_optimizer(self.model, self.cfg)
        self.phase = phase
        log.info("phase %s: %s trainable parameters", phase, f"{self.trainable:,}")

    def _resume(self) -> int:
        if self.checkpoint is None or not self.checkpoint.is_file():
            return 0
        state = torch.load(self.checkpoint, map_location=self.device, weights_only=True)
        self._enter_phase(state["phase"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.history = [EpochStats(**row) for row in state["history"]]
        log.info("resumed from %s after epoch %d", self.checkpoint, state["epoch"] + 1)
        return state["epoch"] + 1

    def _save_checkpoint(self, epoch: int) -> None:
        if self.checkpoint is None:
            return
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint.with_suffix(".tmp")
        state = {
            "epoch": epoch,
            "phase": self.phase,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "history": [asdict(h) for h in self.history],
        }
        torch.save(state, tmp)
        tmp.replace(self.checkpoint)

    def fit(self, train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray]) -> list[EpochStats]:
        images, labels = train
        cfg = self.cfg
        steps_per_epoch = math.ceil(len(labels) / cfg.batch_size)
        total_steps = steps_per_epoch * cfg.epochs
        warmup = min(total_steps // 10, 200)
        for epoch in range(self._resume(), cfg.epochs):
            self._enter_phase(phase_for_epoch(epoch, cfg))
            stats = self._run_epoch(epoch, images, labels, steps_per_epoch, total_steps, warmup)
            stats.val_loss, stats.val_accuracy = evaluate_split(self.model, *val, cfg.batch_size * 2, self.device)
            self.history.append(stats)
            log.info(
                "epoch %d/%d done: train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.0f img/s",
                epoch + 1, cfg.epochs, stats.train_loss, stats.train_accuracy,
                stats.val_loss, stats.val_accuracy, stats.images_per_s,
            )  # fmt: skip
            self._save_checkpoint(epoch)
        return self.history

    def _run_epoch(
        self, epoch: int, images: np.ndarray, labels: np.ndarray, steps: int, total: int, warmup: int
    ) -> EpochStats:
        cfg, model, device = self.cfg, self.model, self.device
        torch.manual_seed(cfg.seed + epoch)  # dropout and augmentation repeat exactly on resume
        generator = torch.Generator().manual_seed(cfg.seed + epoch)
        order = torch.randperm(len(labels), generator=generator).numpy()
        model.train()
        freeze_batchnorm_stats(model.backbone)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
        loss_sum, correct, seen = 0.0, 0, 0
        started = last_report = time.monotonic()
        for step in range(steps):
            # Sorted indices read the memmap sequentially; the batch is still a random sample.
            idx = np.sort(order[step * cfg.batch_size : (step + 1) * cfg.batch_size])
            x = torch.from_numpy(images[idx]).to(device, non_blocking=True)
            y = torch.from_numpy(labels[idx]).to(device, non_blocking=True)
            for group in self.optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(epoch * steps + step, total, warmup)
            with autocast:
                inputs = augment(model.preprocess(x), cfg, generator)
                logits = model.backbone(inputs.contiguous(memory_format=torch.channels_last))
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            now = time.monotonic()
            if now - last_report >= PROGRESS_EVERY_S and step + 1 < steps:
                last_report = now
                rate = seen / (now - started)
                log.info(
                    "epoch %d/%d [%d/%d] loss %.4f acc %.4f %.0f img/s eta %.0fs",
                    epoch + 1, cfg.epochs, step + 1, steps, loss_sum / seen, correct / seen,
                    rate, (len(labels) - seen) / rate,
                )  # fmt: skip
        elapsed = time.monotonic() - started
        return EpochStats(epoch + 1, self.phase, loss_sum / seen, correct / seen, 0.0, 0.0, seen / elapsed)


# ---------------------------------------------------------------- IO


def load_split(prepared: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_path = prepared / f"{split}_images.npy"
    if not images_path.is_file():
        raise PipelineError(f"missing {images_path}; run the prepare stage first")
    return np.load(images_path, mmap_mode="r"), np.load(prepared / f"{split}_labels.npy")


def write_history(path: Path, history: list[EpochStats]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=HISTORY_COLUMNS)
        writer.writeheader()
        writer.writerows(asdict(h) for h in history)


def build_classifier(cfg: PipelineConfig) -> tuple[ImageClassifier, ModelSpec]:
    try:
        backbone = build_model(cfg.train.backbone, len(cfg.classes), cfg.train.weights, cfg.train.drop_rate)
    except ModelError as exc:
        raise PipelineError(str(exc)) from None
    spec = ModelSpec(
        backbone=cfg.train.backbone,
        classes=cfg.classes,
        preprocessing=Preprocessing.for_model(backbone, cfg.train.image_size),
        drop_rate=cfg.train.drop_rate,
    )
    return ImageClassifier(backbone, spec), spec


def run_train(cfg: PipelineConfig, ws: Workspace) -> TrainResult:
    tcfg = cfg.train
    if tcfg.num_threads:
        torch.set_num_threads(tcfg.num_threads)
    torch.manual_seed(tcfg.seed)
    device = resolve_device(tcfg.device)
    train, val = load_split(ws.prepared, "train"), load_split(ws.prepared, "val")
    if len(train[1]) == 0:
        raise PipelineError("the train split is empty")
    model, spec = build_classifier(cfg)
    log.info(
        "training %s (%s weights, %s) on %s: %d train / %d val images at %dpx",
        tcfg.backbone, tcfg.weights, tcfg.strategy, device, len(train[1]), len(val[1]), spec.preprocessing.input_size,
    )  # fmt: skip
    index_digest = hashlib.sha256((ws.prepared / "index.csv").read_bytes()).hexdigest()
    checkpoint = ws.cache / "train" / input_fingerprint(cfg, index_digest) / "checkpoint.pt"
    trainer = Trainer(model, tcfg, device, checkpoint)
    started = time.monotonic()
    history = trainer.fit(train, val)
    seconds = time.monotonic() - started
    model.cpu()
    save_model(model, spec, ws.models)
    write_json(ws.models / "train_config.json", {"train": tcfg.model_dump(), "classes": list(cfg.classes)})
    write_history(ws.reports / "train_history.csv", history)
    last = history[-1]
    result = TrainResult(
        len(history), last.val_accuracy, seconds, float(np.mean([h.images_per_s for h in history])),
        trainer.trainable, str(device),
    )  # fmt: skip
    write_json(ws.reports / "train.json", asdict(result))
    shutil.rmtree(checkpoint.parent, ignore_errors=True)
    return result


def main() -> None:
    ws = Workspace(Path.cwd())
    run_cli("train", lambda: run_train(load_params(ws.params), ws))


if __name__ == "__main__":
    main()
