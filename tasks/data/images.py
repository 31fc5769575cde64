"""Opening landed images safely (allow-listed decoders, header checks before decoding) and
decoding them for training."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tasks.common.config import ValidateConfig
from tasks.data.rows import (
    ANIMATED,
    DECOMPRESSION_BOMB,
    EMPTY_FILE,
    FORMAT_NOT_ALLOWED,
    MISSING_FILE,
    MODE_NOT_ALLOWED,
    TOO_LARGE,
    TOO_SMALL,
    UNREADABLE,
    RowProblem,
)


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str
    mode: str
    channels: int
    bytes: int
    #: Hash of the decoded pixels (mode, size, data): the same picture re-encoded has the same one.
    pixel_sha256: str


#: Bump whenever check_image returns something else for the same file (what ``pixel_sha256``
#: hashes, how the size is measured): results cached under another version are then ignored
#: (tasks/data/image_cache.py). 2: size and pixel hash of the ``upright`` image.
CHECK_VERSION = 2


def check_image(path: Path, cfg: ValidateConfig) -> ImageInfo:
    """Open with allow-listed decoders only, check the header, then decode.

    Sizes are checked from the header before any pixel is decoded, so a decompression bomb
    never gets to allocate its memory; the full decode then catches truncated files. Size and
    pixel hash are those of the upright image (``upright``), as training sees it.
    """
    if not path.is_file():
        raise RowProblem(MISSING_FILE, "file not found")
    size = path.stat().st_size
    if size == 0:
        raise RowProblem(EMPTY_FILE, "zero-byte file")
    try:
        with Image.open(path, formats=list(cfg.formats)) as img:
            info = _check_header(img, size, cfg)
            img.load()
            pixels = upright(img)
            info.update(width=pixels.width, height=pixels.height)
            digest = hashlib.sha256(f"{pixels.mode}:{pixels.width}x{pixels.height}:".encode() + pixels.tobytes())
    except RowProblem:
        raise
    except Image.DecompressionBombError as exc:
        raise RowProblem(DECOMPRESSION_BOMB, str(exc)) from None
    except UnidentifiedImageError:
        found = sniff_format(path)
        if found:
            raise RowProblem(FORMAT_NOT_ALLOWED, f"format {found}; allowed: {', '.join(cfg.formats)}") from None
        raise RowProblem(UNREADABLE, f"not an image (allowed formats: {', '.join(cfg.formats)})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise RowProblem(UNREADABLE, f"cannot decode ({exc.__class__.__name__}: {exc})") from None
    return ImageInfo(**{**info, "pixel_sha256": digest.hexdigest()})


def sniff_format(path: Path) -> str | None:
    """The image format a file's first bytes announce, without running any decoder."""
    Image.init()
    with path.open("rb") as fh:
        prefix = fh.read(16)
    for name, (_, accept) in Image.OPEN.items():
        if accept is not None and accept(prefix):
            return name
    return None


def _check_header(img: Image.Image, size: int, cfg: ValidateConfig) -> dict[str, Any]:
    width, height = img.size
    if width * height > cfg.max_pixels:
        raise RowProblem(
            DECOMPRESSION_BOMB, f"{width}x{height} = {width * height:,} pixels > max_pixels {cfg.max_pixels:,}"
        )
    if max(width, height) > cfg.max_image_side:
        raise RowProblem(TOO_LARGE, f"{width}x{height} exceeds max_image_side {cfg.max_image_side}")
    if min(width, height) < cfg.min_image_side:
        raise RowProblem(TOO_SMALL, f"{width}x{height} is below min_image_side {cfg.min_image_side}")
    if img.format not in cfg.formats:
        raise RowProblem(FORMAT_NOT_ALLOWED, f"format {img.format}; allowed: {', '.join(cfg.formats)}")
    if img.mode not in cfg.modes:
        raise RowProblem(MODE_NOT_ALLOWED, f"mode {img.mode}; allowed: {', '.join(cfg.modes)}")
    if getattr(img, "n_frames", 1) > 1:
        raise RowProblem(ANIMATED, f"{img.n_frames} frames; only still images are accepted")
    bands = len(img.getbands())
    return {"width": width, "height": height, "format": img.format, "mode": img.mode, "channels": bands, "bytes": size}


def upright(img: Image.Image) -> Image.Image:
    """The image turned as its EXIF (or XMP) Orientation tag says: cameras store pixels sideways and
    say so there. Without a tag, the same pixels; with EXIF too corrupt to read, the pixels as stored."""
    img.load()  # a decode error is the caller's to report, not a corrupt EXIF block
    try:
        return ImageOps.exif_transpose(img)
    except (SyntaxError, TypeError, ValueError, struct.error):  # what Pillow raises on a corrupt EXIF block
        return img


def decode_image(source: Path | IO[bytes], size: int) -> np.ndarray:
    """A file (or an open stream of one) as the uint8 RGB array, ``size`` x ``size``, that the
    model is trained on. Prediction calls this too, so serving preprocesses exactly as training."""
    with Image.open(source) as img:
        return to_stored_pixels(img, size)


def to_stored_pixels(img: Image.Image, size: int) -> np.ndarray:
    img = upright(img).convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)
