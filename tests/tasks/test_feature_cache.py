from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.model.features import FeatureStore, cache_key, compute_features, ensure_features
from tasks.model.network import Preprocessing, build_model, split_backbone

PRE = Preprocessing((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 32, "bicubic")


def hashes(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:063d}" for i in range(n)]


def test_store_roundtrip_in_any_order_across_shards(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path)
    first, second = np.arange(12, dtype=np.float32).reshape(3, 2, 2), -np.ones((2, 2, 2), dtype=np.float32)
    store.add(hashes("a", 3), first)
    store.add(hashes("b", 2), second)

    view = FeatureStore(tmp_path).view(["b" + "0" * 62 + "1", *hashes("a", 3)])

    assert len(view) == 4 and view.item_shape == (2, 2)
    got = view[np.array([0, 1, 3])]
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, np.stack([second[1], first[0], first[2]]))


def test_store_ignores_a_shard_whose_keys_were_never_written(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path)
    store.add(hashes("a", 2), np.zeros((2, 3)))
    np.save(tmp_path / "interrupted.npy", np.zeros((5, 3), dtype=np.float16))

    reopened = FeatureStore(tmp_path)

    assert len(reopened.shards) == 1
    assert reopened.missing([*hashes("a", 2), "c" * 64]) == [2]
    with pytest.raises(KeyError, match="1 images have no cached features"):
        reopened.view(["c" * 64])


def test_store_files_load_without_pickle(tmp_path: Path) -> None:
    FeatureStore(tmp_path).add(hashes("a", 2), np.ones((2, 4)))

    (shard,) = tmp_path.glob("*.npy")
    assert np.load(shard, allow_pickle=False).dtype == np.float16
    assert (tmp_path / f"{shard.stem}.keys").read_text().split() == hashes("a", 2)


def test_ensure_features_computes_only_what_is_missing(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path)
    images = np.arange(5)[:, None] * np.ones((5, 3))
    seen: list[int] = []

    def compute(batch: np.ndarray) -> np.ndarray:
        seen.append(len(batch))
        return batch * 2

    assert ensure_features(store, hashes("a", 3), images[:3], compute) == 3
    assert ensure_features(store, hashes("a", 5), images, compute) == 2
    assert ensure_features(store, hashes("a", 5), images, compute) == 0

    assert seen == [3, 2]
    np.testing.assert_array_equal(store.view(hashes("a", 5))[np.arange(5)], images * 2)


def test_cache_key_covers_weights_preprocessing_cut_stored_shape_and_mirroring() -> None:
    torch.manual_seed(0)
    model = build_model("tf_efficientnet_lite0", 2, "none")
    front, _, cut = split_backbone(model, "partial", 2)
    base = cache_key(front, PRE, cut, (28, 28, 3), mirrored=False)

    assert cache_key(front, PRE, cut, (28, 28, 3), mirrored=False) == base
    assert cache_key(front, PRE, cut, (28, 28, 3), mirrored=True) != base
    assert cache_key(front, PRE, cut, (32, 32, 3), mirrored=False) != base
    assert cache_key(front, PRE, "stages3", (28, 28, 3), mirrored=False) != base
    for changed in ({"input_size": 64}, {"interpolation": "bilinear"}, {"mean": (0.4, 0.5, 0.5)}):
        other = Preprocessing(**{**PRE.__dict__, **changed})
        assert cache_key(front, other, cut, (28, 28, 3), mirrored=False) != base
    with torch.no_grad():
        model.conv_stem.weight.add_(1e-3)
    assert cache_key(front, PRE, cut, (28, 28, 3), mirrored=False) != base


def test_compute_features_mirrors_the_model_input() -> None:
    front = torch.nn.Identity()
    images = np.random.default_rng(0).integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)

    def preprocess(x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2).float()

    plain = compute_features(front, preprocess, images, mirrored=False, batch_size=2, device=torch.device("cpu"))
    mirrored = compute_features(front, preprocess, images, mirrored=True, batch_size=2, device=torch.device("cpu"))

    assert plain.dtype == np.float16 and plain.shape == (3, 3, 4, 5)
    np.testing.assert_array_equal(mirrored, plain[..., ::-1])
