"""train stage: fine-tune a pretrained timm backbone with a new head on the prepared arrays.

The loop lives in tasks/model/trainer.py, model building in tasks/model/network.py and the
feature cache in tasks/model/features.py; this module reads the prepared splits, builds the
model, trains it and writes the model and its reports.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from tasks.common.config import PipelineConfig, TrainConfig, load_params
from tasks.common.errors import PipelineError
from tasks.common.files import read_json, write_json
from tasks.common.stage import run_cli, setup_cli_logging
from tasks.common.workspace import Workspace
from tasks.data.prepared import INDEX_FILE, images_path, load_split, read_index, read_split_hashes
from tasks.model.distributed import SINGLE, Ranks, join_process_group, launch, leave_process_group
from tasks.model.network import (
    MODEL_WEIGHTS,
    ImageClassifier,
    ModelError,
    ModelSpec,
    Preprocessing,
    build_model,
    check_same_task,
    read_saved_model,
    save_model,
)
from tasks.model.trainer import (
    HISTORY_COLUMNS,
    EpochStats,
    Inputs,
    LiveInputs,
    SplitData,
    Trainer,
    cached_inputs,
    effective_config,
    input_fingerprint,
    resolve_device,
    uses_feature_cache,
)
from tasks.model.warm_start import StartDecision, warm_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    epochs: int
    val_accuracy: float
    train_seconds: float
    images_per_s: float
    trainable_params: int
    device: str
    #: Feature rows computed for the cache in this run (0 without it, or when all were cached).
    features_computed: int = 0
    #: Seconds spent computing cached features, included in train_seconds.
    feature_seconds: float = 0.0
    #: The class-imbalance decision (mode, ratio, per-class counts and loss weights). A dict, so
    #: register's metric logging (ints and floats only) skips it.
    class_balance: dict[str, object] = field(default_factory=dict)
    #: ``full`` (from the pretrained weights), ``warm v<N>`` (the champion) or ``warm <dir>``.
    start: str = "full"
    #: Train images this run used: all of the split, or a warm start's new plus replayed ones.
    train_images: int = 0
    replayed_images: int = 0


def write_history(path: Path, history: list[EpochStats]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=HISTORY_COLUMNS)
        writer.writeheader()
        writer.writerows(asdict(h) for h in history)


def warm_start_weights(directory: Path, backbone: str, classes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The backbone weights of a previous model, refused unless it has the same backbone and classes."""
    try:
        saved, state = read_saved_model(directory)
        check_same_task(saved, backbone, classes)
    except ModelError as exc:
        raise PipelineError(f"train.warm_start: {exc}") from None
    return state


@dataclass(frozen=True)
class Start:
    """Where a run starts and which train rows it uses."""

    #: A saved model directory to start from; None: the pretrained ``weights``.
    model_dir: Path | None = None
    #: The train rows (ascending indices); None: all of them.
    rows: np.ndarray | None = None
    #: How many of ``rows`` come from batches the parent did not see (the rest are replayed).
    new_rows: int = 0
    #: The parent step's decision, when it made this one.
    decision: StartDecision | None = None

    @property
    def warm(self) -> bool:
        return self.model_dir is not None

    @property
    def label(self) -> str:
        """For train.json: ``full``, ``warm v<parent>`` or ``warm <model dir>``."""
        if self.decision is not None and self.decision.mode == "warm":
            return f"warm v{self.decision.parent_version}"
        return "full" if self.model_dir is None else f"warm {self.model_dir}"

    def describe(self, tcfg: TrainConfig) -> str:
        if self.decision is not None and self.decision.mode == "warm":
            return f"warm start from champion v{self.decision.parent_version}"
        if self.model_dir is not None:
            return f"warm start {self.model_dir}"
        return f"{tcfg.weights} weights" + (f" ({self.decision.reason})" if self.decision else "")


def plan_start(cfg: PipelineConfig, ws: Workspace) -> Start:
    """``train.warm_start``: null starts from ``weights``; a path starts from that model on every
    image; ``auto`` follows the parent step's decision in data/parent (tasks/parent.py)."""
    choice = cfg.train.warm_start
    if choice is None:
        return Start()
    if choice != "auto":
        return Start(ws.root / choice)
    if not ws.parent_record.is_file():  # run_train called without the parent step (not through DVC)
        log.info("no %s: training from the pretrained weights", ws.parent_record.relative_to(ws.root))
        return Start()
    decision = StartDecision.from_record(read_json(ws.parent_record))
    if decision.mode != "warm":
        return Start(decision=decision)
    batch_ids = [row["batch_id"] for row in read_index(ws.prepared).get("train", [])]
    rows, new = warm_rows(batch_ids, set(decision.parent_batches), cfg.train.warm_start_replay, cfg.train.seed)
    if new == 0:  # a small batch can land wholly in val/test
        log.warning("the new batches put no image in the train split: the warm start trains on all of it")
        return Start(ws.parent, None, 0, decision)
    return Start(ws.parent, rows, new, decision)


def build_classifier(cfg: PipelineConfig, start: Start = Start()) -> tuple[ImageClassifier, ModelSpec]:
    """The model to train: pretrained ``weights``, or the model ``start`` names."""
    tcfg = cfg.train
    try:
        weights = "none" if start.warm else tcfg.weights  # a warm start overwrites every tensor
        backbone = build_model(tcfg.backbone, len(cfg.classes), weights, tcfg.drop_rate)
    except ModelError as exc:
        raise PipelineError(str(exc)) from None
    if start.model_dir is not None:
        backbone.load_state_dict(warm_start_weights(start.model_dir, tcfg.backbone, cfg.classes))
        log.info("warm start from %s", start.model_dir)
    spec = ModelSpec(
        backbone=tcfg.backbone,
        classes=cfg.classes,
        preprocessing=Preprocessing.for_model(backbone, tcfg.image_size),
        drop_rate=tcfg.drop_rate,
    )
    return ImageClassifier(backbone, spec), spec


def load_splits(prepared: Path, with_hashes: bool, train_rows: np.ndarray | None = None) -> dict[str, SplitData]:
    """The train and val splits; ``train_rows``: only those rows of train (a warm start's)."""
    splits = {}
    hashes = read_split_hashes(prepared) if with_hashes else {}
    for name in ("train", "val"):
        images, labels = load_split(prepared, name)
        split_hashes = hashes.get(name, [])
        if with_hashes and len(split_hashes) != len(labels):
            raise PipelineError(
                f"{prepared / INDEX_FILE} lists {len(split_hashes)} {name} images, "
                f"{images_path(prepared, name).name} has {len(labels)}; run the prepare stage again"
            )
        if name == "train" and train_rows is not None:
            images, labels = images[train_rows], labels[train_rows]
            split_hashes = [split_hashes[i] for i in train_rows] if with_hashes else split_hashes
        splits[name] = SplitData(images, labels, split_hashes)
    return splits


def training_inputs(
    model: ImageClassifier,
    cfg: TrainConfig,
    ws: Workspace,
    splits: dict[str, SplitData],
    device: torch.device,
    ranks: Ranks = SINGLE,
) -> tuple[dict[str, Inputs], int]:
    if uses_feature_cache(cfg):
        return cached_inputs(model, cfg, ws.features, splits, device, ranks)
    if cfg.feature_cache:
        log.warning("feature_cache ignored: strategy %r with frozen_stages=%d freezes nothing",
                    cfg.strategy, cfg.frozen_stages)  # fmt: skip
    return {name: LiveInputs(model, split.images) for name, split in splits.items()}, 0


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_train(cfg: PipelineConfig, ws: Workspace, ranks: Ranks | None = None) -> TrainResult:
    """Train and write the model and reports. ``ranks``: this process's place in a multi-process run
    (``train_process``); without it, ``train.processes`` (times ``train.nnodes``) above 1 launches them."""
    if ranks is None and cfg.train.processes * cfg.train.nnodes > 1:
        return launch_processes(cfg, ws)
    ranks = ranks or SINGLE
    start = plan_start(cfg, ws)
    tcfg = effective_config(cfg.train, start.warm)
    if tcfg.num_threads:
        torch.set_num_threads(tcfg.num_threads)
    torch.manual_seed(tcfg.seed)
    device = resolve_device(tcfg.device)
    if ranks.distributed:
        ranks, device = join_process_group(device)
    splits = load_splits(ws.prepared, with_hashes=uses_feature_cache(tcfg), train_rows=start.rows)
    if len(splits["train"].labels) == 0:
        raise PipelineError("the train split is empty")
    model, spec = build_classifier(cfg, start)
    log.info(
        "training %s (%s, %s) on %s: %d train / %d val images at %dpx, %d epochs",
        tcfg.backbone, start.describe(tcfg), tcfg.strategy, device, len(splits["train"].labels),
        len(splits["val"].labels), spec.preprocessing.input_size, tcfg.epochs,
    )  # fmt: skip
    if start.rows is not None:
        log.info("warm start rows: %d new, %d replayed", start.new_rows, len(start.rows) - start.new_rows)
    digest = file_digest(ws.prepared / INDEX_FILE)
    if start.model_dir is not None:  # same path, new champion: a checkpoint of the old one must not resume
        digest += file_digest(start.model_dir / MODEL_WEIGHTS)
    if start.rows is not None:
        digest += hashlib.sha256(start.rows.tobytes()).hexdigest()
    checkpoint = ws.checkpoints / input_fingerprint(cfg, digest) / "checkpoint.pt"
    trainer = Trainer(model, tcfg, device, checkpoint, ranks)
    started = time.monotonic()
    inputs, computed = training_inputs(model, tcfg, ws, splits, device, ranks)
    feature_seconds = time.monotonic() - started
    history = trainer.fit((inputs["train"], splits["train"].labels), (inputs["val"], splits["val"].labels))
    seconds = time.monotonic() - started
    if ranks.main:  # one writer; every rank holds the same model and history
        model.cpu()
        save_model(model, spec, ws.models)
        write_json(ws.models / "train_config.json", {"train": cfg.train.model_dump(), "classes": list(cfg.classes)})
        write_history(ws.train_history, history)
    result = TrainResult(
        epochs=len(history),
        val_accuracy=history[-1].val_accuracy,
        train_seconds=seconds,
        # Every image seen over the time it took (feature computing included), not a mean of
        # per-epoch rates, which a fast cached epoch would inflate.
        images_per_s=trainer.epochs_run * len(splits["train"].labels) / seconds,
        trainable_params=trainer.trainable,
        device=str(device),
        features_computed=computed,
        feature_seconds=feature_seconds,
        class_balance=trainer.balance.report(cfg.classes),
        start=start.label,
        train_images=len(splits["train"].labels),
        replayed_images=0 if start.rows is None else len(start.rows) - start.new_rows,
    )
    if ranks.main:
        write_json(ws.train_report, asdict(result))
        shutil.rmtree(checkpoint.parent, ignore_errors=True)
    return result


def train_process(cfg: PipelineConfig, ws: Workspace, notes: Path) -> TrainResult:
    """One of the processes ``launch_processes`` starts. A user error is also noted in ``notes``
    (``<rank>.json``), so the launching process can repeat it as one line."""
    rank = int(os.environ["RANK"])
    setup_cli_logging(logging.INFO if rank == 0 else logging.ERROR)  # one process's log, not N copies
    try:
        return run_train(cfg, ws, Ranks(rank, int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])))
    except PipelineError as exc:
        write_json(notes / f"{rank}.json", {"error": str(exc)})
        raise SystemExit(2) from None  # not an exception with a traceback: the launcher repeats the note
    finally:
        leave_process_group()


def launch_processes(cfg: PipelineConfig, ws: Workspace) -> TrainResult:
    """Train in ``train.processes`` processes on this node (DistributedDataParallel) with torchrun's
    launcher; the result of the lowest rank on this node (rank 0's on the first)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    tcfg = cfg.train
    # torchrun would give each process 1 thread; share the cores instead (num_threads still wins).
    os.environ.setdefault("OMP_NUM_THREADS", str(tcfg.num_threads or max(1, (os.cpu_count() or 1) // tcfg.processes)))
    log.info("training in %d processes on each of %d node(s)", tcfg.processes, tcfg.nnodes)
    with tempfile.TemporaryDirectory(prefix="train-ranks-") as notes:
        try:
            results = launch(train_process, (cfg, ws, Path(notes)), tcfg.processes, tcfg.nnodes)
        except ChildFailedError as exc:
            if noted := sorted(Path(notes).glob("*.json"), key=lambda p: int(p.stem)):
                raise PipelineError(read_json(noted[0])["error"]) from None
            ranks = ", ".join(str(rank) for rank in sorted(exc.failures))
            raise RuntimeError(f"process(es) of rank {ranks} failed (torch's report is the cause below)") from exc
    return results[min(results)]


def main() -> None:
    ws = Workspace(Path.cwd())
    run_cli("train", lambda: run_train(load_params(ws.params), ws))


if __name__ == "__main__":
    main()
