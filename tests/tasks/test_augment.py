from __future__ import annotations

import pytest
import torch

from tasks.common.config import AugmentConfig, TrainConfig
from tasks.model.trainer import AffineDraw, affine_theta, augment, draw_affine, resample, skipped_by_feature_cache

EVERYTHING = AugmentConfig(hflip=True, vflip=True, translate=3, rotation=30, shear=10, zoom=0.2)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def fixed(n: int = 1, **values: list) -> AffineDraw:
    """A draw with no randomness: the identity except for ``values`` (one entry per sample)."""
    draw = {"hflip": [1.0] * n, "vflip": [1.0] * n, "shift": [[0.0, 0.0]] * n, "rotation": [0.0] * n}
    draw |= {"shear": [0.0] * n, "scale": [1.0] * n} | values
    return AffineDraw(**{key: torch.tensor(value, dtype=torch.float32) for key, value in draw.items()})


def transform(images: torch.Tensor, draw: AffineDraw) -> torch.Tensor:
    return resample(images, affine_theta(draw, *images.shape[-2:]))


def dot(h: int, w: int, y: int, x: int) -> torch.Tensor:
    image = torch.zeros(1, 1, h, w)
    image[0, 0, y, x] = 1.0
    return image


def where(image: torch.Tensor) -> tuple[int, int]:
    """(row, column) of the brightest pixel."""
    flat = int(image[0, 0].argmax())
    return divmod(flat, image.shape[-1])


def test_all_zero_params_return_the_input_unchanged() -> None:
    images = torch.rand(4, 3, 8, 8)
    off = AugmentConfig(hflip=False, vflip=False, translate=0, rotation=0, shear=0, zoom=0)

    assert augment(images, TrainConfig(augment=off), torch.Generator().manual_seed(0)) is images
    torch.testing.assert_close(transform(images, fixed(4)), images)


@pytest.mark.parametrize(("degrees", "quarter_turns"), [(90.0, 1), (-90.0, -1), (180.0, 2)])
def test_a_rotation_by_quarter_turns_is_rot90_counter_clockwise(degrees: float, quarter_turns: int) -> None:
    images = torch.rand(2, 3, 7, 7)

    out = transform(images, fixed(2, rotation=[degrees] * 2))

    torch.testing.assert_close(out, torch.rot90(images, quarter_turns, dims=(-2, -1)), atol=1e-5, rtol=0)


def test_shift_moves_content_right_and_down_by_pixels_on_either_aspect() -> None:
    out = transform(dot(4, 8, 1, 2), fixed(shift=[[3.0, 2.0]]))

    assert where(out) == (3, 5)
    assert float(out.max()) == pytest.approx(1.0)


def test_shear_moves_rows_in_proportion_to_their_distance_from_the_centre() -> None:
    # Centre of a 7x7 image is (3, 3); at 45 degrees a row 2 below the centre moves 2 right, 2 above moves 2 left.
    assert where(transform(dot(7, 7, 5, 1), fixed(shear=[45.0]))) == (5, 3)
    assert where(transform(dot(7, 7, 1, 4), fixed(shear=[45.0]))) == (1, 2)


def test_zoom_above_one_magnifies_about_the_centre() -> None:
    image = torch.zeros(1, 1, 9, 9)
    image[..., 0, :] = image[..., -1, :] = image[..., :, 0] = image[..., :, -1] = 1.0  # a frame
    image[..., 4, 4] = 0.5  # the centre
    image[..., 4, 6] = 0.75  # two right of the centre

    out = transform(image, fixed(scale=[2.0]))

    assert float(out[0, 0, 4, 4]) == pytest.approx(0.5)
    assert float(out[0, 0, 4, 8]) == pytest.approx(0.75)  # twice as far from the centre
    assert float(out[0, 0, 1:-1, 1:-1].max()) <= 0.75  # the frame was pushed out of the interior
    assert float(transform(image, fixed(scale=[0.5]))[0, 0, 4, 4]) == pytest.approx(0.5)


def test_one_matrix_composes_flip_rotation_and_shift_in_that_order() -> None:
    # (1, 1) of a 5x5 image: mirrored left-right to (1, 3), turned a quarter counter-clockwise to (1, 1),
    # then moved one right to (1, 2).
    out = transform(dot(5, 5, 1, 1), fixed(hflip=[-1.0], rotation=[90.0], shift=[[1.0, 0.0]]))

    assert where(out) == (1, 2)


def test_draws_stay_within_the_configured_ranges_and_use_both_directions() -> None:
    draw = draw_affine(2000, EVERYTHING, torch.Generator().manual_seed(0))

    assert set(draw.hflip.tolist()) == set(draw.vflip.tolist()) == {-1.0, 1.0}
    for values, limit in ((draw.shift, 3), (draw.rotation, 30), (draw.shear, 10), (draw.scale - 1, 0.2)):
        assert float(values.abs().max()) <= limit
        assert float(values.min()) < -0.9 * limit and float(values.max()) > 0.9 * limit


def test_disabled_augmentations_draw_nothing_from_the_generator() -> None:
    # So a configuration that leaves the new keys at 0 sees the same random stream as before they existed.
    generator = torch.Generator().manual_seed(5)
    draw = draw_affine(8, AugmentConfig(hflip=True, translate=2), generator)

    replay = torch.Generator().manual_seed(5)
    torch.rand(8, generator=replay)  # hflip
    torch.rand(8, 2, generator=replay)  # translate
    assert torch.equal(torch.rand(3, generator=generator), torch.rand(3, generator=replay))
    assert torch.equal(draw.rotation, torch.zeros(8)) and torch.equal(draw.scale, torch.ones(8))


def test_same_seed_repeats_exactly_and_another_seed_differs() -> None:
    images, cfg = torch.rand(6, 3, 16, 16), TrainConfig(augment=EVERYTHING)

    first = augment(images, cfg, torch.Generator().manual_seed(7))

    assert torch.equal(first, augment(images, cfg, torch.Generator().manual_seed(7)))
    assert not torch.allclose(first, augment(images, cfg, torch.Generator().manual_seed(8)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_augment_runs_on_the_images_device_and_dtype(device: str, dtype: torch.dtype) -> None:
    images = torch.rand(3, 3, 12, 10, dtype=dtype, device=device)

    out = augment(images, TrainConfig(augment=EVERYTHING), torch.Generator().manual_seed(0))

    assert out.device == images.device and out.dtype == dtype and out.shape == images.shape
    assert not torch.equal(out, images)


def test_the_feature_cache_skips_everything_but_hflip_and_names_it() -> None:
    assert skipped_by_feature_cache(EVERYTHING) == ["vflip", "translate=3", "rotation=30", "shear=10", "zoom=0.2"]
    assert skipped_by_feature_cache(AugmentConfig()) == ["translate=4"]
    assert skipped_by_feature_cache(AugmentConfig(translate=0)) == []
