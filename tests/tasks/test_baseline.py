from __future__ import annotations

import numpy as np
import pytest

from tasks.model.baseline import SIDE, _area_weights, fit_baseline, image_features, predict_baseline


def shapes(n: int, seed: int, size: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Three classes told apart by where the bright bar is (left, right, top), on noise:
    separable for a linear model on pixels, 1/3 for chance."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    images = rng.integers(0, 100, size=(n, size, size, 3))
    half = size // 2
    images[labels == 0, :, :half] += 120
    images[labels == 1, :, half:] += 120
    images[labels == 2, :half, :] += 120
    return images.clip(0, 255).astype(np.uint8), labels


def test_area_weights_average_every_input_pixel_once() -> None:
    for size, side in ((28, 16), (32, 16), (8, 16), (17, 5)):
        weights = _area_weights(size, side)
        assert weights.shape == (side, size)
        np.testing.assert_allclose(weights.sum(axis=1), 1.0)  # each output pixel is an average
        np.testing.assert_allclose(weights.sum(axis=0), side / size)  # each input pixel counts equally


def test_features_are_the_grey_thumbnail_and_the_channel_means() -> None:
    images = np.zeros((2, 28, 28, 3), dtype=np.uint8)
    images[0, :, :14] = 255  # left half white
    images[1, ..., 0] = 255  # pure red

    features = image_features(images)

    assert features.shape == (2, SIDE * SIDE + 3) and features.dtype == np.float32
    thumb = features[0, : SIDE * SIDE].reshape(SIDE, SIDE)
    np.testing.assert_allclose(thumb[:, : SIDE // 2], 1.0, atol=1e-6)
    np.testing.assert_allclose(thumb[:, SIDE // 2 :], 0.0, atol=1e-6)
    np.testing.assert_allclose(features[1, SIDE * SIDE :], [1.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(features[1, : SIDE * SIDE], 1 / 3, atol=1e-6)
    np.testing.assert_array_equal(image_features(images, np.array([1])), features[1:])


def test_baseline_beats_chance_on_a_separable_problem() -> None:
    train_images, train_labels = shapes(150, seed=0)
    test_images, test_labels = shapes(60, seed=1)

    baseline = fit_baseline(train_images, train_labels)
    accuracy = np.mean(predict_baseline(baseline, test_images) == test_labels)

    assert accuracy >= 0.9  # chance is 1/3
    assert baseline.train_rows == 150


def test_baseline_samples_at_most_max_rows_and_is_deterministic() -> None:
    images, labels = shapes(90, seed=2)

    one = fit_baseline(images, labels, max_rows=30)
    two = fit_baseline(images, labels, max_rows=30)

    assert one.train_rows == 30
    np.testing.assert_array_equal(predict_baseline(one, images), predict_baseline(two, images))


def test_a_single_class_train_split_gives_the_constant_predictor() -> None:
    images, _ = shapes(6, seed=3)

    baseline = fit_baseline(images, np.full(6, 2))

    assert baseline.model is None
    np.testing.assert_array_equal(predict_baseline(baseline, images[:4]), [2, 2, 2, 2])


def test_an_empty_train_split_is_refused() -> None:
    with pytest.raises(ValueError, match="empty train split"):
        fit_baseline(np.zeros((0, 8, 8, 3), np.uint8), np.zeros(0, int))
