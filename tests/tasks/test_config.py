from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from tasks.common.config import DATASET_KEYS, PipelineConfig, load_params, parse_params
from tasks.common.errors import PipelineError
from tasks.common.stage import DVC_STAGES
from tasks.data.fashion_mnist import CLASSES as FASHION_CLASSES

REPO = Path(__file__).resolve().parents[2]


def parse_error(data: object) -> str:
    with pytest.raises(PipelineError) as info:
        parse_params(data)
    return str(info.value)


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_the_shipped_params_are_the_code_defaults_plus_the_dataset_keys() -> None:
    # One source of defaults: the repository's params.yaml may differ from the code only where it
    # describes the demo's dataset, so unit tests built on the defaults run what ships.
    shipped = load_params(REPO / "params.yaml")
    defaults = parse_params({"classes": list(shipped.classes)})

    differ = {
        key
        for key, value in _flat(shipped.model_dump(by_alias=True)).items()
        if value != _flat(defaults.model_dump(by_alias=True))[key]
    }

    assert differ <= set(DATASET_KEYS) - {"classes"}, f"params.yaml and tasks/common/config.py disagree on {differ}"
    assert set(_flat(yaml.safe_load((REPO / "params.yaml").read_text()))) == set(
        _flat(shipped.model_dump(by_alias=True))
    ), "params.yaml must spell out every key (DVC tracks params by key)"


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"validate": {"min_image_side": 64, "max_image_side": 32}},
         "min_image_side (64) must not exceed max_image_side (32)"),
        ({"validate": {"max_pixels": 10}}, "max_pixels (10) is below min_image_side squared (64)"),
        ({"validate": {"class_imbalance": {"warn": 5, "block": 2}}},
         "'validate.class_imbalance': warn (5) must not exceed block (2)"),
        ({"validate": {"label_drift": {"warn_alpha": 0.01, "block_alpha": 0.05}}},
         "'validate.label_drift': block_alpha (0.05) must not exceed warn_alpha (0.01)"),
        ({"train": {"epochs": 2, "head_warmup_epochs": 2}}, "'train': head_warmup_epochs (2) must be < epochs (2)"),
    ],
)  # fmt: skip
def test_checks_across_keys_fail_at_load_in_one_line(sections: dict, message: str) -> None:
    with pytest.raises(PipelineError) as info:
        parse_params({"classes": ["a", "b"], **sections})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_validate_and_register_sections_are_read_through_their_aliases() -> None:
    cfg = parse_params(
        {
            "classes": ["a", "b"],
            "validate": {"max_image_side": 64},
            "register": {"model_name": "m", "experiment": "e"},
        }
    )

    assert cfg.validate_.max_image_side == 64
    assert cfg.register_.model_name == "m"
    assert cfg.register_.experiment == "e"


def test_config_is_frozen() -> None:
    cfg = parse_params({"classes": ["a", "b"]})

    with pytest.raises(ValidationError):
        cfg.train.epochs = 99  # type: ignore[misc]


def test_unknown_top_level_key_is_named_with_the_allowed_keys() -> None:
    message = parse_error({"classes": ["a", "b"], "trian": {"epochs": 1}})

    assert "unknown key 'trian'" in message
    sections = "classes, evaluate, gate, ingest, predict, prepare, register, retrain, train, validate, watch"
    assert f"allowed: {sections}" in message
    assert message.startswith("params.yaml: ")


def test_unknown_nested_key_is_named_with_the_sections_allowed_keys() -> None:
    message = parse_error({"classes": ["a", "b"], "train": {"learning_rate": 0.1}})

    assert "unknown key 'train.learning_rate'" in message
    allowed = message.split("allowed: ", 1)[1].split(", ")
    assert allowed == sorted(PipelineConfig.model_fields["train"].annotation.model_fields)
    assert "lr" in allowed and "backbone_lr_mult" in allowed


def test_unknown_key_two_levels_deep_lists_that_levels_keys() -> None:
    message = parse_error({"classes": ["a", "b"], "train": {"augment": {"mirror": True}}})

    assert "unknown key 'train.augment.mirror'; allowed: hflip, rotation, shear, translate, vflip, zoom" in message


def test_unknown_key_under_an_aliased_section_lists_its_keys() -> None:
    message = parse_error({"classes": ["a", "b"], "validate": {"max_side": 10}})

    assert (
        "unknown key 'validate.max_side'; allowed: class_imbalance, formats, label_drift, max_image_side, max_pixels, "
        "min_image_side, min_images_per_class, modes" in message
    )


def test_every_problem_is_reported_at_once() -> None:
    message = parse_error({"classes": ["a", "b"], "train": {"epochs": 0, "bogus": 1}, "bogus": 2})

    assert "'train.epochs'" in message
    assert "unknown key 'train.bogus'" in message
    assert "unknown key 'bogus'" in message


@pytest.mark.parametrize(
    ("section", "value", "where", "wanted"),
    [
        ("train", {"epochs": "many"}, "'train.epochs'", "'many'"),
        ("train", {"epochs": 0}, "'train.epochs'", "greater than or equal to 1"),
        ("train", {"lr": -1.0}, "'train.lr'", "greater than 0"),
        ("prepare", {"val_fraction": 1.0}, "'prepare.val_fraction'", "less than 1"),
        ("validate", {"max_image_side": "big"}, "'validate.max_image_side'", "'big'"),
        ("gate", {"min_accuracy": 1.5}, "'gate.min_accuracy'", "less than or equal to 1"),
        ("gate", {"significance": "maybe"}, "'gate.significance'", "'not_worse' or 'significantly_better'"),
        ("train", {"augment": {"translate": -1}}, "'train.augment.translate'", "greater than or equal to 0"),
        ("train", {"augment": {"rotation": -5}}, "'train.augment.rotation'", "greater than or equal to 0"),
        ("train", {"augment": {"rotation": 200}}, "'train.augment.rotation'", "less than or equal to 180"),
        ("train", {"augment": {"shear": 90}}, "'train.augment.shear'", "less than 90"),
        ("train", {"augment": {"zoom": 1.0}}, "'train.augment.zoom'", "less than 1"),
        ("train", {"augment": {"zoom": -0.1}}, "'train.augment.zoom'", "greater than or equal to 0"),
        ("validate", {"label_drift": {"warn_alpha": 1.5}}, "'validate.label_drift.warn_alpha'", "less than 1"),
        ("ingest", {"label_noise": {"action": "drop"}}, "'ingest.label_noise.action'", "'hold', 'quarantine_rows' or"),
        ("ingest", {"label_noise": {"alpha": 0}}, "'ingest.label_noise.alpha'", "greater than 0"),
    ],
)
def test_wrong_type_or_range_names_the_key_and_the_value(section: str, value: dict, where: str, wanted: str) -> None:
    message = parse_error({"classes": ["a", "b"], section: value})

    assert where in message
    assert wanted in message


def test_invalid_strategy_lists_the_supported_ones() -> None:
    message = parse_error({"classes": ["a", "b"], "train": {"strategy": "finetune"}})

    assert "'train.strategy'" in message
    assert "'finetune'" in message
    for strategy in ("feature_extraction", "partial", "fine_tune"):
        assert strategy in message


def test_invalid_device_is_rejected() -> None:
    message = parse_error({"classes": ["a", "b"], "train": {"device": "gpu"}})

    assert "'train.device'" in message and "'gpu'" in message


def test_duplicate_classes_are_named() -> None:
    message = parse_error({"classes": ["a", "b", "a", "c", "c"]})

    assert "duplicate class names ['a', 'c']" in message


@pytest.mark.parametrize("bad", ["", "  ", "b ", " b"])
def test_blank_or_padded_class_names_are_rejected(bad: str) -> None:
    message = parse_error({"classes": ["a", bad]})

    assert "blank or padded class names" in message
    assert repr(bad) in message


def test_a_single_class_is_rejected() -> None:
    assert "need at least 2 classes" in parse_error({"classes": ["a"]})


def test_missing_classes_is_reported() -> None:
    message = parse_error({"train": {"epochs": 1}})

    assert "'classes'" in message and "required" in message.lower()


@pytest.mark.parametrize(("data", "kind"), [(None, "NoneType"), (["a", "b"], "list"), ("classes", "str")])
def test_top_level_must_be_a_mapping(data: object, kind: str) -> None:
    message = parse_error(data)

    assert f"expected a mapping at top level, got {kind}" in message


def test_load_params_reads_a_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"classes": ["x", "y"], "train": {"epochs": 7}}), encoding="utf-8")

    cfg = load_params(path)

    assert cfg.classes == ("x", "y")
    assert cfg.train.epochs == 7


def test_load_params_names_the_file_in_validation_errors(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("classes: [x, y]\ntrain:\n  epochz: 1\n", encoding="utf-8")

    with pytest.raises(PipelineError) as info:
        load_params(path)

    assert str(info.value).startswith(f"{path}: unknown key 'train.epochz'")


def test_missing_params_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "params.yaml"

    with pytest.raises(PipelineError, match="params file not found") as info:
        load_params(path)

    assert str(path) in str(info.value)


def test_invalid_yaml_is_a_pipeline_error(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("classes: [a, b\ntrain: {epochs: 1\n", encoding="utf-8")

    with pytest.raises(PipelineError, match="not valid YAML") as info:
        load_params(path)

    assert str(path) in str(info.value)


def test_empty_params_file_is_a_pipeline_error(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("# nothing here\n", encoding="utf-8")

    with pytest.raises(PipelineError, match="expected a mapping at top level"):
        load_params(path)


def test_repository_params_yaml_parses() -> None:
    cfg = load_params(REPO / "params.yaml")

    assert cfg.classes == FASHION_CLASSES
    assert cfg.train.backbone == "tf_efficientnet_lite0"
    assert cfg.train.weights == "packaged"
    assert cfg.register_.model_name == "fashion-mnist-classifier"
    assert cfg.prepare.val_fraction + cfg.prepare.test_fraction < 1


def test_repository_params_yaml_has_a_section_per_dvc_stage() -> None:
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))

    for stage in DVC_STAGES:
        assert isinstance(raw.get(stage), dict), f"params.yaml lacks a {stage!r} section"


def test_validate_formats_must_be_known_to_pil() -> None:
    message = parse_error({"classes": ["a", "b"], "validate": {"formats": ["png", "HEIC9"]}})

    assert "unknown image format(s) ['HEIC9']; supported: " in message and "PNG" in message


def test_validate_thresholds_reject_unknown_levels() -> None:
    message = parse_error({"classes": ["a", "b"], "validate": {"class_imbalance": {"warn": 2, "stop": 5}}})

    assert "unknown key 'validate.class_imbalance.stop'" in message


def test_the_old_label_drift_distance_threshold_is_named_with_its_replacement() -> None:
    # label_drift was a Jensen-Shannon threshold (warn: 0.15); it is now a test's significance level.
    message = parse_error({"classes": ["a", "b"], "validate": {"label_drift": {"warn": 0.15}}})

    assert "unknown key 'validate.label_drift.warn'; allowed: block_alpha, warn_alpha" in message
