from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tasks.common.config import PipelineConfig, parse_params
from tasks.registry.lineage import flatten, params_hash
from tests.helpers import REPO


def test_flatten_joins_nested_keys_with_dots() -> None:
    nested = {"train": {"lr": 0.1, "augment": {"hflip": True, "translate": 4}}, "seed": 3}

    assert flatten("", nested) == {
        "train.lr": 0.1,
        "train.augment.hflip": True,
        "train.augment.translate": 4,
        "seed": 3,
    }


def test_flatten_joins_lists_and_tuples() -> None:
    assert flatten("", {"classes": ["a", "b"], "ext": (".png", ".jpg"), "none": []}) == {
        "classes": "a,b",
        "ext": ".png,.jpg",
        "none": "",
    }


def test_flatten_keeps_a_prefix_and_none_values() -> None:
    assert flatten("cfg", {"image_size": None, "x": {"y": 1}}) == {"cfg.image_size": None, "cfg.x.y": 1}


def test_flatten_of_a_whole_config_uses_the_params_yaml_names(make_cfg: Callable[..., PipelineConfig]) -> None:
    flat = flatten("", make_cfg().model_dump(mode="json", by_alias=True))

    assert flat["classes"] == "a,b"
    assert flat["validate.max_image_side"] == 4096
    assert flat["gate.max_accuracy_drop"] == 0.005
    assert flat["gate.min_accuracy"] is None  # derived from the data unless set
    assert flat["train.augment.hflip"] is True
    assert not any(key.endswith("_") or "validate_" in key for key in flat)


def test_params_hash_is_stable_and_order_independent() -> None:
    one = parse_params({"classes": ["a", "b"], "train": {"lr": 0.01, "epochs": 2}, "prepare": {"split_salt": "s"}})
    two = parse_params({"prepare": {"split_salt": "s"}, "train": {"epochs": 2, "lr": 0.01}, "classes": ["a", "b"]})

    assert params_hash(one) == params_hash(two)
    assert len(params_hash(one)) == 64 and int(params_hash(one), 16) >= 0


def test_params_hash_counts_defaults_like_explicit_values() -> None:
    assert params_hash(parse_params({"classes": ["a", "b"]})) == params_hash(
        parse_params({"classes": ["a", "b"], "train": {"epochs": 3}})
    )


@pytest.mark.parametrize(
    "change",
    [
        {"train": {"lr": 0.01}},
        {"train": {"augment": {"hflip": False}}},
        {"validate": {"max_image_side": 10}},
        {"gate": {"min_accuracy": 0.5}},
        {"classes": ["b", "a"]},
    ],
)
def test_params_hash_changes_with_any_param(change: dict) -> None:
    base = params_hash(parse_params({"classes": ["a", "b"]}))

    assert params_hash(parse_params({"classes": ["a", "b"], **change})) != base


def test_the_logged_pipeline_state_covers_every_uncached_output(tmp_path: Path) -> None:
    """What reproduce puts back from MLflow: every output DVC does not cache, nothing it does."""
    from tasks.common.workspace import Workspace
    from tasks.registry.lineage import state_files, uncached_outputs

    shutil.copy(REPO / "dvc.yaml", tmp_path)
    ws = Workspace(tmp_path)
    found = {p.as_posix() for p in uncached_outputs(ws)}
    assert found == {"reports/manifest.csv", "reports/validate.md", "reports/validate.json",
                     "reports/train_history.csv", "reports/train.json", "reports/metrics.json",
                     "reports/evaluation"}  # fmt: skip
    (tmp_path / "params.yaml").write_text("classes: [a]\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "raw.dvc").write_text("outs: []\n")
    assert [p.name for p in state_files(ws)] == ["params.yaml", "raw.dvc"]
