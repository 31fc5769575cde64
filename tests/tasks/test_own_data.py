"""Unit tests of the pieces behind `ctl init`, `ctl benchmark` and `ctl predict` (no stack)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import yaml
from PIL import Image

from tasks.common.config import parse_params
from tasks.common.errors import PipelineError
from tasks.common.files import spreadsheet_safe
from tasks.init import PROJECT, choose_epochs, choose_sizes, set_param
from tasks.model.serving import Decoding, ImageRejected, as_bytes, decode_for_model, top_k_rows
from tasks.predict import model_uri


@pytest.mark.parametrize(
    ("median_side", "expected"),
    [(8, (8, 64)), (28, (28, 64)), (64, (64, 64)), (100, (100, 100)), (300, (128, 128)), (4000, (128, 128))],
)
def test_sizes_keep_small_images_native_and_give_the_backbone_enough_pixels(median_side: int, expected: tuple) -> None:
    assert choose_sizes(median_side) == expected


def test_small_datasets_get_enough_steps_and_large_ones_the_default() -> None:
    assert choose_epochs(60_000, 128, 0.8, 3) == 3
    assert choose_epochs(1500, 128, 0.8, 3) == 15  # 10 steps an epoch
    assert choose_epochs(50, 128, 0.8, 3) == 30  # capped


def test_set_param_changes_one_key_and_keeps_every_comment() -> None:
    text = (PROJECT / "params.yaml").read_text()
    out = set_param(text, "prepare.image_size", "96", "chosen")
    out = set_param(out, "classes", "[a, b]", "from labels")
    cfg = parse_params(yaml.safe_load(out))
    assert cfg.prepare.image_size == 96 and cfg.classes == ("a", "b")
    assert cfg.train.image_size == parse_params(yaml.safe_load(text)).train.image_size  # same key name, other section
    changed = [line for line in text.splitlines() if line not in out.splitlines()]
    assert len(changed) == 2 and changed[0].startswith("classes:") and "image_size: 28" in changed[1]
    with pytest.raises(PipelineError, match=r"no key 'prepare\.nope'"):
        set_param(text, "prepare.nope", "1", "x")


def png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


DECODING = Decoding(stored_size=16, formats=("PNG", "JPEG"), max_pixels=1_000_000)


@pytest.mark.parametrize(
    "img",
    [
        Image.new("RGBA", (300, 20)),
        Image.new("P", (9, 9)),
        Image.new("LA", (40, 40)),
        Image.new("1", (30, 30)),
        Image.fromarray(np.full((20, 20), 60000, dtype=np.uint16)),
    ],
    ids=["rgba-wide", "palette", "grey-alpha", "bilevel", "16-bit"],
)
def test_any_mode_and_size_decodes_to_the_stored_rgb_array(img: Image.Image) -> None:
    pixels = decode_for_model(png(img), DECODING)
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8


def test_sixteen_bit_is_scaled_not_clipped_to_white() -> None:
    pixels = decode_for_model(png(Image.fromarray(np.full((20, 20), 32768, dtype=np.uint16))), DECODING)
    assert 120 <= int(pixels.mean()) <= 135


def test_undecodable_and_oversized_inputs_are_rejected_with_a_reason() -> None:
    with pytest.raises(ImageRejected, match="empty file"):
        decode_for_model(b"", DECODING)
    with pytest.raises(ImageRejected, match="allowed format"):
        decode_for_model(b"GIF89a not really", DECODING)
    with pytest.raises(ImageRejected, match="exceeds max_pixels"):
        decode_for_model(png(Image.new("L", (2000, 1000))), DECODING)
    with pytest.raises(ImageRejected, match="allowed format"):
        decode_for_model(png(Image.new("RGB", (20, 20)), "GIF"), DECODING)  # GIF decoder is not allowed
    with pytest.raises(ImageRejected, match="base64"):
        as_bytes("not base64 !!")
    assert as_bytes(base64.b64encode(b"abc").decode()) == b"abc"


def test_top_k_rows_are_best_first() -> None:
    rows = top_k_rows(np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]]), ["a", "b", "c"], top_k=2)
    assert rows[0]["class"] == "b" and rows[0]["top_classes"] == ["b", "c"] and rows[0]["confidence"] == 0.7
    assert rows[1]["top_classes"] == ["a", "c"]
    assert len(top_k_rows(np.array([[0.5, 0.5]]), ["a", "b"], top_k=9)[0]["top_classes"]) == 2


def test_model_references_and_spreadsheet_cells() -> None:
    assert model_uri("m", "champion") == "models:/m@champion"
    assert model_uri("m", "12") == "models:/m/12"
    assert spreadsheet_safe("=HYPERLINK(1)") == "'=HYPERLINK(1)" and spreadsheet_safe("cat.png") == "cat.png"
