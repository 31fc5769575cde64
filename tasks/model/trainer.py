"""The training loop: batches from memory-mapped uint8 arrays (or cached features), tensor-op
preprocessing and augmentation on the device, class-imbalance handling (weighted loss or balanced
sampling), a checkpoint per epoch, resume after a crash."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from tasks.common.config import AugmentConfig, PipelineConfig, TrainConfig
from tasks.common.errors import PipelineError
from tasks.model.distributed import SINGLE, Ranks, all_sum, barrier, broadcast_buffers, data_parallel
from tasks.model.features import FeatureStore, FeatureView, cache_key, compute_features, ensure_features
from tasks.model.network import (
    ImageClassifier,
    ModelError,
    Preprocessing,
    freeze_batchnorm_stats,
    head_parameter_names,
    predict_logits,
    set_trainable,
    split_backbone,
)

log = logging.getLogger(__name__)


HISTORY_COLUMNS = ("epoch", "phase", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "images_per_s")

#: Seconds between progress lines inside an epoch.
PROGRESS_EVERY_S = 10.0


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


def scaled_lr(cfg: TrainConfig) -> float:
    """``lr`` for ``batch_size``, given that it was tuned at ``base_batch_size``.

    linear: the usual rule for SGD (Goyal et al. 2017); sqrt: gentler, often better for Adam-type optimizers.
    """
    ratio = cfg.batch_size / cfg.base_batch_size
    return cfg.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.lr_scaling]


def effective_config(cfg: TrainConfig, warm: bool) -> TrainConfig:
    """The schedule a run follows: a warm start runs ``warm_start_epochs`` at ``lr * warm_start_lr_mult``
    and no head warm-up (its head is already trained)."""
    if not warm:
        return cfg
    update = {"epochs": cfg.warm_start_epochs, "head_warmup_epochs": 0, "lr": cfg.lr * cfg.warm_start_lr_mult}
    return cfg.model_copy(update=update)


def uses_feature_cache(cfg: TrainConfig) -> bool:
    """The cache needs a frozen front: not for ``fine_tune`` nor ``partial`` with nothing frozen."""
    if not cfg.feature_cache:
        return False
    return cfg.strategy == "feature_extraction" or (cfg.strategy == "partial" and cfg.frozen_stages > 0)


@dataclass(frozen=True)
class AffineDraw:
    """One random geometric transform per sample: tensors of length n on the CPU, in pixels and degrees."""

    #: -1 mirrors (left-right, top-bottom), 1 keeps.
    hflip: torch.Tensor
    vflip: torch.Tensor
    #: (n, 2): how far the content moves right and down.
    shift: torch.Tensor
    #: Counter-clockwise on screen.
    rotation: torch.Tensor
    #: Horizontal: a row's content moves right in proportion to its distance below the centre.
    shear: torch.Tensor
    #: Above 1 magnifies.
    scale: torch.Tensor


def draw_affine(n: int, aug: AugmentConfig, generator: torch.Generator) -> AffineDraw:
    """Random transforms for ``n`` samples; only enabled augmentations draw from ``generator``."""

    def sign(enabled: bool) -> torch.Tensor:
        return torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if enabled else torch.ones(n)

    def uniform(limit: float, size: tuple[int, ...] = (n,)) -> torch.Tensor:
        return (torch.rand(size, generator=generator) * 2 - 1) * limit if limit else torch.zeros(size)

    return AffineDraw(
        hflip=sign(aug.hflip),
        vflip=sign(aug.vflip),
        shift=uniform(aug.translate, (n, 2)),
        rotation=uniform(aug.rotation),
        shear=uniform(aug.shear),
        scale=1 + uniform(aug.zoom),
    )


def affine_theta(draw: AffineDraw, height: int, width: int) -> torch.Tensor:
    """The (n, 2, 3) ``F.affine_grid`` matrices that map each output pixel to where it samples the input.

    The content is flipped, scaled, sheared, rotated about the centre and then shifted; the inverse
    of that, in pixels, is converted to grid_sample's [-1, 1] coordinates of each axis.
    """
    rad = torch.deg2rad(draw.rotation)
    cos, sin, tan = torch.cos(rad), torch.sin(rad), torch.tan(torch.deg2rad(draw.shear))
    zero, one = torch.zeros_like(cos), torch.ones_like(cos)
    # Inverses, with y pointing down: rotation, shear, scale, flip (a flip is its own inverse).
    unrotate = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    unshear = torch.stack([torch.stack([one, -tan], -1), torch.stack([zero, one], -1)], -2)
    unscale_flip = torch.diag_embed(torch.stack([draw.hflip, draw.vflip], -1) / draw.scale[:, None])
    inverse = unscale_flip @ unshear @ unrotate
    half = torch.tensor([width / 2, height / 2])
    theta = torch.empty(len(cos), 2, 3)
    theta[:, :, :2] = inverse * half[None, None, :] / half[None, :, None]
    theta[:, :, 2] = -(inverse @ draw.shift[:, :, None])[:, :, 0] / half
    return theta


def resample(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Bilinear resampling of each image by its affine matrix, on the images' device; edges extend outward."""
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment(images: torch.Tensor, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Random flips, shift, rotation, shear and zoom, per sample, in one affine resampling."""
    a = cfg.augment
    if not (a.hflip or a.vflip or a.translate or a.rotation or a.shear or a.zoom):
        return images
    n, _, h, w = images.shape
    return resample(images, affine_theta(draw_affine(n, a, generator), h, w))


def skipped_by_feature_cache(aug: AugmentConfig) -> list[str]:
    """The enabled augmentations that cached features cannot take (all but hflip): ``vflip``, ``key=value``."""
    values = aug.model_dump(exclude={"hflip"})
    return [key if value is True else f"{key}={value:g}" for key, value in values.items() if value]


def input_fingerprint(cfg: PipelineConfig, data_digest: str) -> str:
    """What a checkpoint is valid for: the train params, the label set and the data."""
    payload = json.dumps({"train": cfg.train.model_dump(), "classes": cfg.classes, "data": data_digest}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ClassBalance:
    """How training compensates for unequal class counts in the train split (``auto`` resolved)."""

    mode: Literal["none", "weighted_loss", "balanced_sampling"]
    #: Largest / smallest class count in the train split.
    ratio: float
    counts: tuple[int, ...]
    #: Cross-entropy weight per class (``weighted_loss`` only).
    weights: tuple[float, ...] | None = None

    def loss_weight(self, device: torch.device) -> torch.Tensor | None:
        return None if self.weights is None else torch.tensor(self.weights, dtype=torch.float32, device=device)

    def epoch_order(self, labels: np.ndarray, generator: torch.Generator) -> np.ndarray:
        """The indices one epoch visits, drawn from ``generator`` (seeded per epoch, so a resume repeats them).

        ``balanced_sampling``: as many draws as images, with replacement, with probability 1 / class
        count, so each class is equally likely. (torch.multinomial takes at most 2**24 images.)
        """
        if self.mode != "balanced_sampling":
            return torch.randperm(len(labels), generator=generator).numpy()
        per_image = torch.from_numpy(1.0 / np.asarray(self.counts, dtype=np.float64)[labels])
        return torch.multinomial(per_image, len(labels), replacement=True, generator=generator).numpy()

    def report(self, classes: list[str] | tuple[str, ...]) -> dict[str, object]:
        """For train.json: per-class values keyed by class name (nested, so not logged as metrics)."""
        out: dict[str, object] = {"mode": self.mode, "ratio": self.ratio}
        out["counts"] = dict(zip(classes, self.counts, strict=True))
        if self.weights is not None:
            out["weights"] = dict(zip(classes, self.weights, strict=True))
        return out


def decide_class_balance(labels: np.ndarray, classes: list[str] | tuple[str, ...], cfg: TrainConfig) -> ClassBalance:
    """The ``class_balance`` setting applied to the train split's labels.

    A class without training images cannot be balanced (its weight would be infinite) and a model
    never shown it can never predict it: a PipelineError, unless ``class_balance`` is ``none``.
    """
    counts = np.bincount(labels, minlength=len(classes))
    missing = [classes[i] for i in np.flatnonzero(counts == 0)]
    if missing and cfg.class_balance != "none":
        raise PipelineError(
            f"the train split has no images of class(es) {missing}; train.class_balance={cfg.class_balance!r} "
            "needs every class: add images of them, or set train.class_balance: none to train without them"
        )
    if missing:
        log.warning("the train split has no images of class(es) %s: the model cannot learn them", missing)
    present = counts[counts > 0]
    ratio = float(present.max() / present.min()) if len(present) else 1.0
    mode = cfg.class_balance
    if mode == "auto":
        mode = "weighted_loss" if ratio > cfg.class_balance_ratio else "none"
    weights = None
    if mode == "weighted_loss":
        # "balanced": n_samples / (n_classes * count), so a perfectly balanced split gets all ones.
        weights = tuple(float(w) for w in compute_class_weight("balanced", classes=np.arange(len(classes)), y=labels))
    return ClassBalance(mode, ratio, tuple(int(c) for c in counts), weights)


@dataclass
class EpochStats:
    epoch: int
    phase: str
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    images_per_s: float


def make_optimizer(model: ImageClassifier, cfg: TrainConfig) -> torch.optim.Optimizer:
    head = {f"backbone.{n}" for n in head_parameter_names(model.backbone)}
    head_params, body_params = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head_params if name in head else body_params).append(param)
    lr = scaled_lr(cfg)
    groups = [{"params": head_params, "lr": lr, "base_lr": lr}]
    if body_params:
        body_lr = lr * cfg.backbone_lr_mult
        groups.append({"params": body_params, "lr": body_lr, "base_lr": body_lr})
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


class LiveInputs:
    """uint8 images through preprocessing, augmentation and the whole backbone at every step."""

    def __init__(self, model: ImageClassifier, images: np.ndarray) -> None:
        self.model, self.images = model, images
        #: What the training step calls; the Trainer may swap in a torch.compile wrapper.
        #: The trainable module; ``forward`` calls it (under DDP in a multi-process run).
        self.module: nn.Module = model.backbone
        self.forward: Callable[[torch.Tensor], torch.Tensor] = model.backbone

    def __len__(self) -> int:
        return len(self.images)

    def train_logits(
        self, idx: np.ndarray, cfg: TrainConfig, generator: torch.Generator, device: torch.device
    ) -> torch.Tensor:
        x = torch.from_numpy(self.images[idx]).to(device, non_blocking=True)
        inputs = augment(self.model.preprocess(x), cfg, generator)
        return self.forward(inputs.contiguous(memory_format=torch.channels_last))

    def predict(self, batch_size: int, device: torch.device) -> np.ndarray:
        return predict_logits(self.model, self.images, batch_size, device)


class CachedInputs:
    """Cached output of the frozen front through the trainable rest only.

    hflip picks, per sample, the cached features of the mirrored image, which is what the live
    path computes for a flipped sample. The other augmentations have no equivalent here.
    """

    def __init__(self, rest: nn.Module, features: FeatureView, mirrored: FeatureView | None = None) -> None:
        self.rest, self.features, self.mirrored = rest, features, mirrored
        self.module: nn.Module = rest
        self.forward: Callable[[torch.Tensor], torch.Tensor] = rest

    def __len__(self) -> int:
        return len(self.features)

    def _to_device(self, features: np.ndarray, device: torch.device) -> torch.Tensor:
        x = torch.from_numpy(features).to(device, non_blocking=True).float()
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x

    def train_logits(
        self, idx: np.ndarray, cfg: TrainConfig, generator: torch.Generator, device: torch.device
    ) -> torch.Tensor:
        features = self.features[idx]
        if cfg.augment.hflip and self.mirrored is not None:
            flip = (torch.rand(len(idx), generator=generator) < 0.5).numpy()
            features[flip] = self.mirrored[idx[flip]]
        return self.forward(self._to_device(features, device))

    @torch.inference_mode()
    def predict(self, batch_size: int, device: torch.device) -> np.ndarray:
        self.rest.eval()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
        out = []
        for start in range(0, len(self), batch_size):
            batch = self.features[np.arange(start, min(start + batch_size, len(self)))]
            with autocast:
                out.append(self.rest(self._to_device(batch, device)).float().cpu())
        return torch.cat(out).numpy()


Inputs = LiveInputs | CachedInputs


def shard_inputs(inputs: Inputs, ranks: Ranks) -> Inputs:
    """This process's every ``world``-th sample of ``inputs``, for scoring a split in parts."""
    if isinstance(inputs, LiveInputs):
        return LiveInputs(inputs.model, ranks.shard(inputs.images))
    f = inputs.features
    return CachedInputs(inputs.rest, FeatureView(f.shards, ranks.shard(f.shard_of), ranks.shard(f.row_of)))


def evaluate_split(inputs: Inputs, labels: np.ndarray, batch_size: int, device: torch.device) -> tuple[float, float]:
    if len(labels) == 0:
        return float("nan"), float("nan")
    logits = torch.from_numpy(inputs.predict(batch_size, device))
    target = torch.from_numpy(labels)
    return float(F.cross_entropy(logits, target)), float((logits.argmax(1) == target).float().mean())


#: Offsets the dropout and augmentation seed of each rank after the first (rank 0 keeps the one-process seed).
RANK_SEED_STRIDE = 100_003


class Trainer:
    """Runs epochs over uint8 arrays; owns the model, optimizer and checkpointing.

    With ``ranks`` of several processes, each one runs this with the same seed: every rank draws the
    same epoch order and takes its share of each batch, DDP averages the gradients, the epoch's
    statistics are summed over the ranks, and only rank 0 writes the checkpoint (all ranks resume from it).
    """

    def __init__(
        self,
        model: ImageClassifier,
        cfg: TrainConfig,
        device: torch.device,
        checkpoint: Path | None,
        ranks: Ranks = SINGLE,
    ):
        self.model, self.cfg, self.device, self.checkpoint, self.ranks = model, cfg, device, checkpoint, ranks
        #: The training inputs whose trainable module DDP wraps, per phase (multi-process runs only).
        self.train_inputs: Inputs | None = None
        self.history: list[EpochStats] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.phase: str | None = None
        self.trainable = 0
        #: Decided from the train labels at the start of ``fit``.
        self.balance: ClassBalance | None = None
        self.loss_weight: torch.Tensor | None = None
        #: Epochs trained by this process (a resumed run skips the checkpointed ones).
        self.epochs_run = 0
        self.model.to(device)
        if device.type == "cuda" or ranks.distributed:  # DDP's gradient buckets take the layout of the inputs
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
        if self.ranks.distributed and self.train_inputs is not None:
            # Per phase: DDP hooks the parameters that require grad when it is built.
            forward = data_parallel(self.train_inputs.module, self.device)
            self.train_inputs.forward = torch.compile(forward) if self.cfg.compile else forward

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
        if self.checkpoint is None or not self.ranks.main:
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

    def _inputs(self, data: np.ndarray | Inputs) -> Inputs:
        return LiveInputs(self.model, data) if isinstance(data, np.ndarray) else data

    def fit(
        self, train: tuple[np.ndarray | Inputs, np.ndarray], val: tuple[np.ndarray | Inputs, np.ndarray]
    ) -> list[EpochStats]:
        """Train on uint8 image arrays (or prepared inputs, e.g. cached features) with their labels."""
        images, labels = self._inputs(train[0]), train[1]
        val_inputs = self._inputs(val[0])
        self._decide_balance(labels)
        if self.cfg.compile and not self.ranks.distributed:  # (several ranks: compiled with DDP, per phase)
            # Compile the callable the step uses, not self.model: state_dict keys stay unprefixed.
            images.forward = torch.compile(images.forward)
        self.train_inputs = images
        val_part = shard_inputs(val_inputs, self.ranks) if self.ranks.distributed else val_inputs
        cfg = self.cfg
        steps_per_epoch = math.ceil(len(labels) / cfg.batch_size)
        total_steps = steps_per_epoch * cfg.epochs
        warmup = min(total_steps // 10, 200)
        for epoch in range(self._resume(), cfg.epochs):
            self._enter_phase(phase_for_epoch(epoch, cfg))
            stats = self._run_epoch(epoch, images, labels, steps_per_epoch, total_steps, warmup)
            if self.ranks.distributed:
                stats.val_loss, stats.val_accuracy = self._evaluate_parts(val_part, self.ranks.shard(val[1]))
            else:
                stats.val_loss, stats.val_accuracy = evaluate_split(val_inputs, val[1], cfg.batch_size * 2, self.device)
            self.history.append(stats)
            log.info(
                "epoch %d/%d done: train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.0f img/s",
                epoch + 1, cfg.epochs, stats.train_loss, stats.train_accuracy,
                stats.val_loss, stats.val_accuracy, stats.images_per_s,
            )  # fmt: skip
            self._save_checkpoint(epoch)
            self.epochs_run += 1
        return self.history

    def _evaluate_parts(self, inputs: Inputs, labels: np.ndarray) -> tuple[float, float]:
        """Loss and accuracy over the whole split, each rank scoring its part with rank 0's BatchNorm statistics."""
        broadcast_buffers(self.model, self.ranks)
        n = len(labels)
        loss, accuracy = evaluate_split(inputs, labels, self.cfg.batch_size * 2, self.device)
        parts = [loss * n, round(accuracy * n), n] if n else [0.0, 0.0, 0.0]
        loss_sum, correct, total = all_sum(parts, self.ranks, self.device)
        return (loss_sum / total, correct / total) if total else (float("nan"), float("nan"))

    def _shard_loss(self, logits: torch.Tensor, y: torch.Tensor, batch_labels: np.ndarray) -> torch.Tensor:
        """This rank's part of the whole batch's mean loss, times the number of ranks: DDP averages the
        gradients over the ranks, so they add up to the one-process gradient of the whole batch."""
        cfg = self.cfg
        weights = self.balance.weights
        total = len(batch_labels) if weights is None else float(np.asarray(weights)[batch_labels].sum())
        loss = F.cross_entropy(
            logits.float(), y, weight=self.loss_weight, label_smoothing=cfg.label_smoothing, reduction="sum"
        )
        return loss * (self.ranks.world / total)

    def _decide_balance(self, labels: np.ndarray) -> None:
        self.balance = decide_class_balance(labels, self.model.classes, self.cfg)
        self.loss_weight = self.balance.loss_weight(self.device)
        weights = self.balance.report(self.model.classes).get("weights")
        log.info(
            "class balance: %s (train split largest/smallest class count %.2f, class_balance=%s, ratio %.2f)%s",
            self.balance.mode, self.balance.ratio, self.cfg.class_balance, self.cfg.class_balance_ratio,
            f"; loss weights {', '.join(f'{c} {w:.3f}' for c, w in weights.items())}" if weights else "",
        )  # fmt: skip

    def _run_epoch(
        self, epoch: int, images: Inputs, labels: np.ndarray, steps: int, total: int, warmup: int
    ) -> EpochStats:
        cfg, model, device = self.cfg, self.model, self.device
        ranks = self.ranks
        rank_seed = cfg.seed + epoch + RANK_SEED_STRIDE * ranks.rank
        torch.manual_seed(rank_seed)  # dropout and augmentation repeat exactly on resume
        generator = torch.Generator().manual_seed(cfg.seed + epoch)
        order = self.balance.epoch_order(labels, generator)  # the same on every rank
        if not ranks.main:
            generator.manual_seed(rank_seed)
        model.train()
        freeze_batchnorm_stats(model.backbone)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
        loss_sum, correct, seen = 0.0, 0, 0
        started = last_report = time.monotonic()
        for step in range(steps):
            # Sorted indices read the memmap sequentially; the batch is still a random sample
            # (with balanced sampling an index may repeat, which fancy indexing handles).
            idx = batch = np.sort(order[step * cfg.batch_size : (step + 1) * cfg.batch_size])
            if ranks.distributed:  # this rank's share; it may be empty (a last batch smaller than the ranks)
                idx = ranks.shard(batch)
            y = torch.from_numpy(labels[idx]).to(device, non_blocking=True)
            for group in self.optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(epoch * steps + step, total, warmup)
            with autocast:
                logits = images.train_logits(idx, cfg, generator, device)
                # With weights, train_loss in the history is the weighted loss; val_loss stays unweighted.
                if ranks.distributed:
                    loss = self._shard_loss(logits, y, labels[batch])
                else:
                    loss = F.cross_entropy(
                        logits.float(), y, weight=self.loss_weight, label_smoothing=cfg.label_smoothing
                    )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            # Several ranks: loss / world is this rank's part of the batch mean, summed over the ranks below.
            loss_sum += float(loss.detach()) * (len(batch) / ranks.world if ranks.distributed else len(y))
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            now = time.monotonic()
            if now - last_report >= PROGRESS_EVERY_S and step + 1 < steps:
                last_report = now
                rate = seen * ranks.world / (now - started)  # several ranks: this one's share, times their number
                log.info(
                    "epoch %d/%d [%d/%d] loss %.4f acc %.4f %.0f img/s eta %.0fs",
                    epoch + 1, cfg.epochs, step + 1, steps, loss_sum / seen, correct / seen,
                    rate, (len(labels) - seen * ranks.world) / rate,
                )  # fmt: skip
        elapsed = time.monotonic() - started
        if ranks.distributed:
            loss_sum, correct, seen = all_sum([loss_sum, correct, seen], ranks, device)
            correct, seen = round(correct), round(seen)
        return EpochStats(epoch + 1, self.phase, loss_sum / seen, correct / seen, 0.0, 0.0, seen / elapsed)


@dataclass(frozen=True)
class SplitData:
    images: np.ndarray
    labels: np.ndarray
    hashes: list[str]


def cached_inputs(
    model: ImageClassifier,
    cfg: TrainConfig,
    cache_root: Path,
    splits: dict[str, SplitData],
    device: torch.device,
    ranks: Ranks = SINGLE,
) -> tuple[dict[str, CachedInputs], int]:
    """Cached-feature inputs per split and how many feature rows had to be computed now.

    The train split also gets the mirrored images' features when hflip is on. Several ranks share
    the computing (each writes shards of its own) and then all read every shard.
    """
    try:
        front, rest, cut = split_backbone(model.backbone, cfg.strategy, cfg.frozen_stages)
    except ModelError as exc:
        raise PipelineError(f"train.feature_cache: {exc}") from None
    if skipped := skipped_by_feature_cache(cfg.augment):
        log.warning("feature_cache: augment %s skipped (cached features cannot be transformed; only hflip applies)",
                    ", ".join(skipped))  # fmt: skip
    views: dict[tuple[str, bool], FeatureView] = {}
    computed = 0
    stored_shape = next(iter(splits.values())).images.shape[1:]
    for mirrored in (False, True) if cfg.augment.hflip else (False,):
        directory = cache_root / cache_key(front, model_preprocessing(model), cut, stored_shape, mirrored)
        store = FeatureStore(directory)
        barrier(ranks)  # all ranks have read the same shards before one adds any: they agree on what is missing
        compute = partial(
            compute_features, front, model.preprocess, mirrored=mirrored, batch_size=cfg.batch_size * 2, device=device
        )
        names = [name for name in splits if not mirrored or name == "train"]
        for name in names:
            split = splits[name]
            computed += ensure_features(store, split.hashes, split.images, compute, (ranks.rank, ranks.world))
        if ranks.distributed:
            barrier(ranks)  # every rank's shards are written
            store = FeatureStore(directory)
        for name in names:
            views[name, mirrored] = store.view(splits[name].hashes)
    inputs = {name: CachedInputs(rest, views[name, False], views.get((name, True))) for name in splits}
    return inputs, computed


def model_preprocessing(model: ImageClassifier) -> Preprocessing:
    """The preprocessing ``model`` applies, read back from its buffers."""
    return Preprocessing(
        mean=tuple(float(v) / 255.0 for v in model.mean.flatten().tolist()),
        std=tuple(float(v) / 255.0 for v in model.std.flatten().tolist()),
        input_size=model.input_size,
        interpolation=model.interpolation,
    )
