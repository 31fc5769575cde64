from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.common.config import AugmentConfig, PipelineConfig, TrainConfig
from tasks.common.errors import PipelineError
from tasks.common.files import read_json, write_json
from tasks.common.workspace import Workspace
from tasks.data.prepared import load_split, write_index
from tasks.model.network import (
    ImageClassifier,
    ModelSpec,
    Preprocessing,
    build_model,
    load_model,
    predict_logits,
    save_model,
    set_trainable,
)
from tasks.model.trainer import (
    HISTORY_COLUMNS,
    LiveInputs,
    SplitData,
    Trainer,
    augment,
    cached_inputs,
    effective_config,
    input_fingerprint,
    lr_factor,
    make_optimizer,
    phase_for_epoch,
    resolve_device,
    scaled_lr,
    uses_feature_cache,
)
from tasks.model.warm_start import StartDecision
from tasks.train import run_train

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


def write_arrays(ws: Workspace, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Prepared arrays plus a matching index.csv (distinct made-up hashes), as prepare writes them."""
    ws.prepared.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, (images, labels) in splits.items():
        np.save(ws.prepared / f"{split}_images.npy", images)
        np.save(ws.prepared / f"{split}_labels.npy", labels)
        rows += [[f"{split}{i}".ljust(64, "0"), split, "ab"[int(y)], "b1", f"{i}.png"] for i, y in enumerate(labels)]
    write_index(ws.prepared, rows)


def test_run_train_saves_model_reports_and_cleans_its_checkpoint(
    tmp_path: Path, make_cfg: Callable[..., PipelineConfig]
) -> None:
    ws = Workspace(tmp_path)
    write_arrays(ws, {"train": tiny_data(40, seed=40), "val": tiny_data(8, seed=8)})
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


def test_run_train_reports_the_class_balance_decision(tmp_path: Path, make_cfg: Callable[..., PipelineConfig]) -> None:
    ws = Workspace(tmp_path)
    images = tiny_data(40, seed=40)[0]
    write_arrays(ws, {"train": (images, np.repeat([0, 1], [30, 10])), "val": tiny_data(8, seed=8)})
    cfg = make_cfg(train={**TINY.model_dump(), "epochs": 1, "device": "cpu", "weights": "none"})

    result = run_train(cfg, ws)

    report = read_json(ws.reports / "train.json")
    assert report["class_balance"] == result.class_balance
    assert report["class_balance"] == {
        "mode": "weighted_loss",
        "ratio": 3.0,
        "counts": {"a": 30, "b": 10},
        "weights": {"a": pytest.approx(40 / 60), "b": 2.0},
    }
    # register logs train.json's ints and floats as metrics (its filter, here): the nested decision is skipped
    assert "class_balance" not in {k for k, v in report.items() if isinstance(v, int | float)}


def test_run_train_with_an_empty_train_split(tmp_path: Path, make_cfg: Callable[..., PipelineConfig]) -> None:
    ws = Workspace(tmp_path)
    empty = (np.zeros((0, 16, 16, 3), dtype=np.uint8), np.zeros(0, dtype=np.int64))
    write_arrays(ws, {"train": empty, "val": empty})

    with pytest.raises(PipelineError, match="the train split is empty"):
        run_train(make_cfg(train={"device": "cpu", "weights": "none"}), ws)


def test_run_train_turns_a_bad_backbone_into_a_pipeline_error(
    tmp_path: Path, make_cfg: Callable[..., PipelineConfig]
) -> None:
    ws = Workspace(tmp_path)
    write_arrays(ws, {"train": tiny_data(4, 0), "val": tiny_data(4, 1)})

    with pytest.raises(PipelineError, match=r"did you mean: .*tf_efficientnet_lite0"):
        run_train(make_cfg(train={"device": "cpu", "backbone": "tf_efficientnet_lite", "weights": "none"}), ws)


# ---------------------------------------------------------------- lr scaling, warm start schedule, cache choice


@pytest.mark.parametrize(("scaling", "expected"), [("none", 0.01), ("linear", 0.04), ("sqrt", 0.02)])
def test_scaled_lr_follows_the_batch_size(scaling: str, expected: float) -> None:
    cfg = TrainConfig(lr=0.01, batch_size=512, base_batch_size=128, lr_scaling=scaling)

    assert scaled_lr(cfg) == pytest.approx(expected)
    assert scaled_lr(cfg.model_copy(update={"batch_size": 128})) == pytest.approx(0.01)


def test_optimizer_uses_the_scaled_rate() -> None:
    model = tiny_classifier()
    set_trainable(model.backbone, "partial", 2)
    cfg = TrainConfig(lr=0.01, backbone_lr_mult=0.5, batch_size=32, base_batch_size=128, lr_scaling="linear")

    assert [g["lr"] for g in make_optimizer(model, cfg).param_groups] == pytest.approx([0.0025, 0.00125])


def test_effective_config_for_a_warm_start_runs_its_own_epochs_and_rate_without_head_warmup() -> None:
    cold = TrainConfig(epochs=5, head_warmup_epochs=2, lr=0.01, warm_start_epochs=1, warm_start_lr_mult=0.5)
    warm = effective_config(cold, warm=True)

    assert effective_config(cold, warm=False) is cold
    assert (warm.epochs, warm.head_warmup_epochs, warm.lr) == (1, 0, 0.005)


@pytest.mark.parametrize(
    ("strategy", "frozen_stages", "expected"),
    [("feature_extraction", 0, True), ("partial", 3, True), ("partial", 0, False), ("fine_tune", 3, False)],
)
def test_uses_feature_cache_only_with_a_frozen_front(strategy: str, frozen_stages: int, expected: bool) -> None:
    cfg = TrainConfig(strategy=strategy, frozen_stages=frozen_stages, feature_cache=True)

    assert uses_feature_cache(cfg) is expected
    assert uses_feature_cache(cfg.model_copy(update={"feature_cache": False})) is False


# ---------------------------------------------------------------- cached features


def split_data(n: int, seed: int, prefix: str) -> SplitData:
    images, labels = tiny_data(n, seed)
    return SplitData(images, labels, [f"{prefix}{i:063d}" for i in range(n)])


def trained_statistics(model: ImageClassifier) -> ImageClassifier:
    """BatchNorm statistics off their defaults, so cached features must carry the frozen ones."""
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(tiny_data(16, 9)[0]))
    return model.eval()


@pytest.mark.parametrize(("strategy", "frozen_stages"), [("feature_extraction", 0), ("partial", 3)])
def test_cached_features_give_the_logits_of_the_full_model(tmp_path: Path, strategy: str, frozen_stages: int) -> None:
    model = trained_statistics(tiny_classifier())
    cfg = TINY.model_copy(update={"strategy": strategy, "frozen_stages": frozen_stages, "feature_cache": True})
    splits = {"train": split_data(12, 0, "t"), "val": split_data(10, 1, "v")}

    inputs, computed = cached_inputs(model, cfg, tmp_path, splits, CPU)

    assert computed == 2 * 12 + 10  # train images plain and mirrored, val plain
    for name, split in splits.items():
        live = predict_logits(model, split.images, 4, CPU)
        np.testing.assert_allclose(inputs[name].predict(4, CPU), live, rtol=1e-2, atol=2e-3)


def test_a_cached_training_step_matches_the_live_one_flips_included(tmp_path: Path) -> None:
    model = trained_statistics(tiny_classifier())
    cfg = TINY.model_copy(update={"frozen_stages": 3, "feature_cache": True, "augment": AugmentConfig(translate=0)})
    set_trainable(model.backbone, "partial", 3)
    splits = {"train": split_data(16, 0, "t"), "val": split_data(4, 1, "v")}
    cached = cached_inputs(model, cfg, tmp_path, splits, CPU)[0]["train"]
    live = LiveInputs(model, splits["train"].images)
    idx = np.arange(16)

    # Eval mode: batch statistics of a 16-image batch at 1x1 resolution would amplify the float16
    # rounding of the cache far beyond any tolerance; what is tested here is which samples are mirrored.
    model.eval()
    with torch.no_grad():
        got = cached.train_logits(idx, cfg, torch.Generator().manual_seed(3), CPU)
        expected = live.train_logits(idx, cfg, torch.Generator().manual_seed(3), CPU)
        no_flip = cfg.model_copy(update={"augment": AugmentConfig(hflip=False, translate=0)})
        unflipped = live.train_logits(idx, no_flip, torch.Generator(), CPU)

    torch.testing.assert_close(got, expected, rtol=1e-2, atol=2e-3)
    assert not torch.allclose(got, unflipped, rtol=1e-2, atol=2e-3)  # some samples really were mirrored


def test_the_feature_cache_warns_once_naming_the_augmentations_it_skips(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    geometric = AugmentConfig(vflip=True, translate=2, rotation=15, shear=5, zoom=0.1)
    cfg = TINY.model_copy(update={"frozen_stages": 3, "feature_cache": True, "augment": geometric})
    splits = {"train": split_data(4, 0, "t"), "val": split_data(2, 1, "v")}

    with caplog.at_level("WARNING", logger="tasks.model.trainer"):
        cached_inputs(tiny_classifier(), cfg, tmp_path, splits, CPU)

    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        "feature_cache: augment vflip, translate=2, rotation=15, shear=5, zoom=0.1 skipped "
        "(cached features cannot be transformed; only hflip applies)"
    ]


def write_prepared(
    ws: Workspace, splits: dict[str, SplitData], batch_of: Callable[[str], str] = lambda _: "b1"
) -> None:
    ws.prepared.mkdir(parents=True, exist_ok=True)
    rows = ["sha256,split,label,batch_id,path"]
    for name, split in splits.items():
        np.save(ws.prepared / f"{name}_images.npy", split.images)
        np.save(ws.prepared / f"{name}_labels.npy", split.labels)
        rows += [f"{sha},{name},a,{batch_of(sha)},{sha[-3:]}.png" for sha in split.hashes]
    (ws.prepared / "index.csv").write_text("\n".join(rows) + "\n")


def grow(split: SplitData, extra: SplitData) -> SplitData:
    """A split after a new batch: prepare sorts by hash, so new images land between the old ones."""
    order = np.argsort(split.hashes + extra.hashes)
    images, labels = np.concatenate([split.images, extra.images]), np.concatenate([split.labels, extra.labels])
    return SplitData(images[order], labels[order], [(split.hashes + extra.hashes)[i] for i in order])


@pytest.mark.parametrize(("hflip", "rows_per_new_image"), [(False, 1), (True, 2)])
def test_a_rerun_after_a_new_batch_computes_features_only_for_the_new_images(
    tmp_path: Path, make_cfg: Callable[..., PipelineConfig], hflip: bool, rows_per_new_image: int
) -> None:
    ws = Workspace(tmp_path)
    splits = {"train": split_data(40, 0, "a"), "val": split_data(8, 1, "v")}
    write_prepared(ws, splits)
    train = {**TINY.model_dump(), "epochs": 1, "device": "cpu", "feature_cache": True, "augment": {"hflip": hflip}}
    cfg = make_cfg(train=train)

    first = run_train(cfg, ws)
    write_prepared(ws, {**splits, "train": grow(splits["train"], split_data(6, 2, "b"))})
    second = run_train(cfg, ws)
    third = run_train(cfg, ws)

    assert first.features_computed == 40 * rows_per_new_image + 8
    assert second.features_computed == 6 * rows_per_new_image
    assert third.features_computed == 0
    assert read_json(ws.reports / "train.json")["features_computed"] == 0


def test_run_train_refuses_an_index_that_does_not_match_the_arrays(
    tmp_path: Path, make_cfg: Callable[..., PipelineConfig]
) -> None:
    ws = Workspace(tmp_path)
    write_prepared(ws, {"train": split_data(4, 0, "a"), "val": split_data(2, 1, "v")})
    np.save(ws.prepared / "train_images.npy", tiny_data(5, 0)[0])
    np.save(ws.prepared / "train_labels.npy", tiny_data(5, 0)[1])

    with pytest.raises(PipelineError, match=r"index\.csv lists 4 train images, train_images\.npy has 5"):
        run_train(make_cfg(train={**TINY.model_dump(), "device": "cpu", "feature_cache": True}), ws)


# ---------------------------------------------------------------- warm start


def saved_model(directory: Path, classes: tuple[str, ...] = ("a", "b"), backbone: str = LITE0) -> Path:
    """A previous model whose stem is recognisable (constant 0.25), saved like the train stage does."""
    model = tiny_classifier(classes)
    with torch.no_grad():
        model.backbone.conv_stem.weight.fill_(0.25)
    save_model(model, ModelSpec(backbone, classes, Preprocessing.for_model(model.backbone, 32)), directory)
    return directory


def test_warm_start_loads_the_previous_model_and_runs_warm_start_epochs(
    tmp_path: Path, make_cfg: Callable[..., PipelineConfig]
) -> None:
    ws = Workspace(tmp_path)
    write_prepared(ws, {"train": split_data(40, 0, "a"), "val": split_data(8, 1, "v")})
    saved_model(tmp_path / "champion")
    train = {**TINY.model_dump(), "epochs": 5, "device": "cpu", "warm_start": "champion", "warm_start_epochs": 1}

    result = run_train(make_cfg(train=train), ws)

    assert result.epochs == 1
    model, _ = load_model(ws.models)
    assert torch.all(model.backbone.conv_stem.weight == 0.25)  # frozen, so still the warm start's


def test_an_automatic_warm_start_trains_the_champion_on_the_new_rows_and_a_replay_sample(
    tmp_path: Path, make_cfg: Callable[..., PipelineConfig]
) -> None:
    """What the parent step decided (data/parent) is what train does: the champion's weights, the
    rows of batches it did not see, as many replayed rows, warm_start_epochs."""
    ws = Workspace(tmp_path)
    train = grow(split_data(30, 0, "o"), split_data(10, 2, "n"))
    write_prepared(ws, {"train": train, "val": split_data(8, 1, "v")}, lambda sha: "b2" if sha[0] == "n" else "b1")
    saved_model(ws.parent)
    write_json(ws.parent_record, StartDecision("warm", "new b2", "3", ("b1",), 1, ("b2",)).record())
    params = {**TINY.model_dump(), "epochs": 5, "device": "cpu", "warm_start": "auto", "warm_start_replay": 0.5}

    result = run_train(make_cfg(train=params), ws)

    assert (result.start, result.epochs, result.train_images, result.replayed_images) == ("warm v3", 1, 15, 5)
    model, _ = load_model(ws.models)
    assert torch.all(model.backbone.conv_stem.weight == 0.25)  # frozen, so still the champion's

    write_json(ws.parent_record, StartDecision("warm", "new b3", "3", ("b1", "b2"), 1, ("b3",)).record())
    unseen = run_train(make_cfg(train=params), ws)  # b3's images all went to val or test
    assert (unseen.start, unseen.train_images, unseen.replayed_images) == ("warm v3", 40, 0)

    write_json(ws.parent_record, StartDecision("full", "no champion yet").record())
    full = run_train(make_cfg(train={**params, "epochs": 2}), ws)

    assert (full.start, full.epochs, full.train_images, full.replayed_images) == ("full", 2, 40, 0)
    model, _ = load_model(ws.models)
    assert not torch.all(model.backbone.conv_stem.weight == 0.25)


@pytest.mark.parametrize(
    ("classes", "backbone", "message"),
    [
        (("b", "a"), LITE0, r"train\.warm_start: saved model has classes \['b', 'a'\], the config has \['a', 'b'\]"),
        (("a", "b"), "mobilenetv3_small_050", "train.warm_start: saved model has backbone 'mobilenetv3_small_050'"),
    ],
)
def test_warm_start_from_another_task_is_a_pipeline_error(
    tmp_path: Path, make_cfg: Callable[..., PipelineConfig], classes: tuple[str, ...], backbone: str, message: str
) -> None:
    ws = Workspace(tmp_path)
    write_prepared(ws, {"train": split_data(4, 0, "a"), "val": split_data(2, 1, "v")})
    saved_model(tmp_path / "old", classes, backbone)

    with pytest.raises(PipelineError, match=message):
        run_train(make_cfg(train={**TINY.model_dump(), "device": "cpu", "warm_start": str(tmp_path / "old")}), ws)


def test_warm_start_from_a_missing_model_is_a_pipeline_error(
    tmp_path: Path, make_cfg: Callable[..., PipelineConfig]
) -> None:
    ws = Workspace(tmp_path)
    write_prepared(ws, {"train": split_data(4, 0, "a"), "val": split_data(2, 1, "v")})

    with pytest.raises(PipelineError, match=r"train\.warm_start: .*nowhere is not a saved model: missing model\.json"):
        run_train(make_cfg(train={**TINY.model_dump(), "device": "cpu", "warm_start": "nowhere"}), ws)


# ---------------------------------------------------------------- torch.compile


def compile_works() -> bool:
    try:
        return bool(torch.compile(lambda x: x + 1)(torch.zeros(1)) == 1)
    except Exception:  # no C compiler, unsupported Python or platform: inductor raises many kinds
        return False


@pytest.mark.skipif(not compile_works(), reason="torch.compile is not supported here")
def test_compiled_training_keeps_checkpoints_and_saved_models_unprefixed(tmp_path: Path) -> None:
    cfg = TINY.model_copy(update={"compile": True, "epochs": 1, "strategy": "feature_extraction"})
    model = tiny_classifier()
    checkpoint = tmp_path / "checkpoint.pt"

    history = Trainer(model, cfg, CPU, checkpoint).fit(tiny_data(32, 0), tiny_data(8, 1))

    assert len(history) == 1 and np.isfinite(history[0].train_loss)
    state = torch.load(checkpoint, weights_only=True)
    assert not any("_orig_mod" in key for key in state["model"])
    resumed = tiny_classifier()
    assert Trainer(resumed, cfg, CPU, checkpoint).fit(tiny_data(32, 0), tiny_data(8, 1)) == history
    save_model(model, ModelSpec(LITE0, ("a", "b"), Preprocessing.for_model(model.backbone, 32)), tmp_path / "m")
    assert load_model(tmp_path / "m")[0].state_dict().keys() == model.state_dict().keys()
