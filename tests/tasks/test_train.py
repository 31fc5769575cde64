from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.common import PipelineError, Workspace, read_json
from tasks.config import PipelineConfig, TrainConfig
from tasks.model import ImageClassifier, ModelSpec, Preprocessing, build_model, load_model, set_trainable
from tasks.train import (
    HISTORY_COLUMNS,
    Trainer,
    augment,
    input_fingerprint,
    load_split,
    lr_factor,
    make_optimizer,
    phase_for_epoch,
    resolve_device,
    run_train,
)

LITE0 = "tf_efficientnet_lite0"
CPU = torch.device("cpu")


# ---------------------------------------------------------------- pure cores


def test_lr_factor_warms_up_linearly() -> None:
    assert lr_factor(0, total=100, warmup=10) == pytest.approx(0.1)
    assert lr_factor(4, total=100, warmup=10) == pytest.approx(0.5)
    assert lr_factor(9, total=100, warmup=10) == pytest.approx(1.0)


def test_lr_factor_decays_by_cosine_to_zero() -> None:
    assert lr_factor(10, total=100, warmup=10) == pytest.approx(1.0)
    assert lr_factor(55, total=100, warmup=10) == pytest.approx(0.5)
    assert lr_factor(100, total=100, warmup=10) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(150, total=100, warmup=10) == pytest.approx(0.0, abs=1e-12)
    decay = [lr_factor(s, total=100, warmup=10) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(decay))


def test_lr_factor_without_warmup_starts_at_full_rate() -> None:
    assert lr_factor(0, total=8, warmup=0) == 1.0
    assert lr_factor(2, total=8, warmup=0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_factor(0, total=0, warmup=0) == 1.0


def test_phase_for_epoch_trains_the_head_first() -> None:
    cfg = TrainConfig(strategy="partial", head_warmup_epochs=2, epochs=4)

    assert [phase_for_epoch(e, cfg) for e in range(4)] == ["head", "head", "partial", "partial"]


def test_phase_for_epoch_without_warmup_or_for_feature_extraction() -> None:
    assert phase_for_epoch(0, TrainConfig(strategy="fine_tune")) == "fine_tune"
    fe = TrainConfig(strategy="feature_extraction", head_warmup_epochs=3)
    assert {phase_for_epoch(e, fe) for e in range(5)} == {"feature_extraction"}


def test_augment_keeps_shape_and_dtype() -> None:
    images = torch.rand(6, 3, 12, 10)

    out = augment(images, TrainConfig(), torch.Generator().manual_seed(0))

    assert out.shape == images.shape and out.dtype == images.dtype
    assert not torch.equal(out, images)


def test_augment_is_identity_when_disabled() -> None:
    images = torch.rand(4, 3, 8, 8)
    cfg = TrainConfig(augment={"hflip": False, "translate": 0})

    assert augment(images, cfg, torch.Generator().manual_seed(0)) is images


def test_augment_flip_only_mirrors_some_samples_exactly() -> None:
    images = torch.rand(32, 3, 8, 8)
    cfg = TrainConfig(augment={"hflip": True, "translate": 0})

    out = augment(images, cfg, torch.Generator().manual_seed(0))

    flipped = [torch.allclose(o, i.flip(-1), atol=1e-5) for o, i in zip(out, images, strict=True)]
    kept = [torch.allclose(o, i, atol=1e-5) for o, i in zip(out, images, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert any(flipped) and any(kept)


def test_augment_is_reproducible_from_the_generator_seed() -> None:
    images = torch.rand(4, 3, 8, 8)

    first = augment(images, TrainConfig(), torch.Generator().manual_seed(7))
    again = augment(images, TrainConfig(), torch.Generator().manual_seed(7))
    other = augment(images, TrainConfig(), torch.Generator().manual_seed(8))

    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_input_fingerprint_covers_data_train_params_and_classes(make_cfg: Callable[..., PipelineConfig]) -> None:
    base = input_fingerprint(make_cfg(), "digest-1")

    assert input_fingerprint(make_cfg(), "digest-1") == base
    assert input_fingerprint(make_cfg(), "digest-2") != base
    assert input_fingerprint(make_cfg(train={"lr": 0.01}), "digest-1") != base
    assert input_fingerprint(make_cfg(train={"augment": {"translate": 2}}), "digest-1") != base
    assert input_fingerprint(make_cfg(classes=("a", "c")), "digest-1") != base
    # Params of other stages do not invalidate a training checkpoint.
    assert input_fingerprint(make_cfg(evaluate={"batch_size": 7}), "digest-1") == base


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_resolve_device_cuda_without_cuda_is_a_pipeline_error() -> None:
    with pytest.raises(PipelineError, match=r"train\.device is 'cuda' but no CUDA device is available"):
        resolve_device("cuda")


def test_resolve_device_auto_and_cpu() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_load_split_needs_prepare(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="run the prepare stage first"):
        load_split(tmp_path, "train")


# ---------------------------------------------------------------- optimizer and trainer


def tiny_classifier(classes: tuple[str, ...] = ("a", "b"), size: int = 32) -> ImageClassifier:
    torch.manual_seed(0)
    backbone = build_model(LITE0, len(classes), "none")
    return ImageClassifier(backbone, ModelSpec(LITE0, classes, Preprocessing.for_model(backbone, size)))


def test_optimizer_gives_pretrained_layers_a_smaller_rate() -> None:
    model = tiny_classifier()
    cfg = TrainConfig(lr=0.01, backbone_lr_mult=0.25)

    set_trainable(model.backbone, "partial", 2)
    groups = make_optimizer(model, cfg).param_groups
    assert [g["lr"] for g in groups] == [0.01, 0.0025]
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)
    assert {id(p) for p in groups[0]["params"]} == {
        id(model.backbone.classifier.weight),
        id(model.backbone.classifier.bias),
    }

    set_trainable(model.backbone, "feature_extraction", 2)
    assert len(make_optimizer(model, cfg).param_groups) == 1


def tiny_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8), rng.integers(0, 2, n).astype(np.int64)


TINY = TrainConfig(epochs=2, batch_size=32, image_size=32, weights="none", drop_rate=0.0)


def test_trainer_fits_writes_a_checkpoint_and_resumes_without_rerunning(tmp_path: Path) -> None:
    train, val = tiny_data(64, 0), tiny_data(16, 1)
    checkpoint = tmp_path / "ckpt" / "checkpoint.pt"
    first = tiny_classifier()
    initial = {k: v.clone() for k, v in first.state_dict().items()}

    history = Trainer(first, TINY, CPU, checkpoint).fit(train, val)

    assert [h.epoch for h in history] == [1, 2]
    assert all(h.phase == "partial" for h in history)
    assert all(np.isfinite([h.train_loss, h.val_loss, h.val_accuracy]).all() for h in history)
    assert checkpoint.is_file() and not checkpoint.with_suffix(".tmp").exists()
    state = torch.load(checkpoint, weights_only=True)
    assert state["epoch"] == 1 and len(state["history"]) == 2
    trained = first.state_dict()
    assert not torch.equal(trained["backbone.classifier.weight"], initial["backbone.classifier.weight"])
    assert torch.equal(trained["backbone.conv_stem.weight"], initial["backbone.conv_stem.weight"])  # frozen

    second = tiny_classifier()
    resumed = Trainer(second, TINY, CPU, checkpoint)
    ran = []
    resumed._run_epoch = lambda *args: ran.append(args) or pytest.fail("a finished run trained again")

    again = resumed.fit(train, val)

    assert ran == []
    assert again == history
    assert all(torch.equal(v, trained[k]) for k, v in second.state_dict().items())


def test_trainer_resumes_after_a_crash_exactly_where_it_stopped(tmp_path: Path) -> None:
    train, val = tiny_data(64, 0), tiny_data(16, 1)
    cfg = TINY.model_copy(update={"drop_rate": 0.2})  # dropout must repeat on resume too
    checkpoint = tmp_path / "checkpoint.pt"
    uninterrupted = tiny_classifier()
    expected = Trainer(uninterrupted, cfg, CPU, None).fit(train, val)

    crashed = Trainer(tiny_classifier(), cfg, CPU, checkpoint)
    run_epoch = crashed._run_epoch

    def crash_in_second_epoch(epoch: int, *args: object) -> object:
        if epoch == 1:
            raise KeyboardInterrupt
        return run_epoch(epoch, *args)

    crashed._run_epoch = crash_in_second_epoch
    with pytest.raises(KeyboardInterrupt):
        crashed.fit(train, val)
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 0

    model = tiny_classifier()
    resumed = Trainer(model, cfg, CPU, checkpoint)
    epochs_run = []
    run_resumed = resumed._run_epoch
    resumed._run_epoch = lambda epoch, *args: epochs_run.append(epoch) or run_resumed(epoch, *args)
    history = resumed.fit(train, val)

    assert epochs_run == [1]
    assert [h.epoch for h in history] == [1, 2]
    assert history[0] == crashed.history[0]

    def losses(h: list) -> list:
        return [(e.train_loss, e.train_accuracy, e.val_loss, e.val_accuracy) for e in h]

    assert losses(history) == losses(expected)
    final = uninterrupted.state_dict()
    assert all(torch.equal(v, final[k]) for k, v in model.state_dict().items())


def test_trainer_head_warmup_switches_phase(tmp_path: Path) -> None:
    cfg = TINY.model_copy(update={"head_warmup_epochs": 1, "strategy": "fine_tune"})
    model = tiny_classifier()
    trainer = Trainer(model, cfg, CPU, None)

    history = trainer.fit(tiny_data(32, 0), tiny_data(8, 1))

    assert [h.phase for h in history] == ["head", "fine_tune"]
    assert trainer.trainable == sum(p.numel() for p in model.parameters())


def test_run_train_saves_model_reports_and_cleans_its_checkpoint(
    tmp_path: Path, make_cfg: Callable[..., PipelineConfig]
) -> None:
    ws = Workspace(tmp_path)
    ws.prepared.mkdir(parents=True)
    for split, n in (("train", 40), ("val", 8)):
        images, labels = tiny_data(n, seed=n)
        np.save(ws.prepared / f"{split}_images.npy", images)
        np.save(ws.prepared / f"{split}_labels.npy", labels)
    (ws.prepared / "index.csv").write_text("sha256,split,label,batch_id,path\n")
    cfg = make_cfg(train={**TINY.model_dump(), "epochs": 1, "device": "cpu", "weights": "none"})

    result = run_train(cfg, ws)

    assert result.epochs == 1 and result.device == "cpu" and result.trainable_params > 0
    model, spec = load_model(ws.models)
    assert spec.classes == ("a", "b") and spec.preprocessing.input_size == 32
    assert model(torch.from_numpy(tiny_data(2, 0)[0])).shape == (2, 2)
    assert read_json(ws.models / "train_config.json")["classes"] == ["a", "b"]
    with (ws.reports / "train_history.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and tuple(rows[0]) == HISTORY_COLUMNS
    assert read_json(ws.reports / "train.json")["epochs"] == 1
    assert not any((ws.cache / "train").iterdir())


def test_run_train_with_an_empty_train_split(tmp_path: Path, make_cfg: Callable[..., PipelineConfig]) -> None:
    ws = Workspace(tmp_path)
    ws.prepared.mkdir(parents=True)
    for split in ("train", "val"):
        np.save(ws.prepared / f"{split}_images.npy", np.zeros((0, 16, 16, 3), dtype=np.uint8))
        np.save(ws.prepared / f"{split}_labels.npy", np.zeros(0, dtype=np.int64))

    with pytest.raises(PipelineError, match="the train split is empty"):
        run_train(make_cfg(train={"device": "cpu", "weights": "none"}), ws)


def test_run_train_turns_a_bad_backbone_into_a_pipeline_error(
    tmp_path: Path, make_cfg: Callable[..., PipelineConfig]
) -> None:
    ws = Workspace(tmp_path)
    ws.prepared.mkdir(parents=True)
    images, labels = tiny_data(4, 0)
    for split in ("train", "val"):
        np.save(ws.prepared / f"{split}_images.npy", images)
        np.save(ws.prepared / f"{split}_labels.npy", labels)

    with pytest.raises(PipelineError, match=r"did you mean: .*tf_efficientnet_lite0"):
        run_train(make_cfg(train={"device": "cpu", "backbone": "tf_efficientnet_lite", "weights": "none"}), ws)
