"""The registered model: an MLflow pyfunc that takes encoded image files and returns class names.

What a caller sends is the file itself (PNG, JPEG, any size, any mode), so nobody has to know
the training preprocessing: the model decodes each file exactly as the prepare stage does
(``tasks.data.images.to_stored_pixels``: turned upright per EXIF, RGB, bicubic resize to
``prepare.image_size``), then the network applies its own resize and normalisation
(``ImageClassifier``). The weights travel as safetensors plus ``model.json`` (no pickle of
tensors), and this package's ``tasks`` code travels with the model (``code_paths``), so
``mlflow models serve`` needs only the Python packages in its requirements.

Input: a DataFrame with one ``image`` column of file bytes. Over HTTP (``mlflow models serve``)
the column is declared binary, so MLflow's scoring server decodes base64 strings into bytes::

    {"dataframe_split": {"columns": ["image"], "data": [["<base64 of the file>"]]}, "params": {"top_k": 3}}

Output: one row per image: ``class``, ``confidence`` (softmax probability of that class),
``top_classes`` and ``top_probabilities`` (the ``top_k`` best, best first) and ``error`` (empty
when the image was scored; otherwise why it was not, and the other fields are empty).
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

IMAGE_COLUMN = "image"
OUTPUT_COLUMNS = ("class", "confidence", "top_classes", "top_probabilities", "error")
DEFAULT_TOP_K = 3
#: Artifact key of the saved model directory (tasks.model.network.save_model) inside the pyfunc.
MODEL_ARTIFACT = "model"


@dataclass(frozen=True)
class Decoding:
    """How a received file becomes the stored pixels the network was trained on."""

    stored_size: int  # prepare.image_size
    formats: tuple[str, ...]  # validate.formats: only these decoders run on received bytes
    max_pixels: int  # validate.max_pixels: checked from the header, before decoding


class ImageRejected(ValueError):
    """A received file that cannot be scored; the message says why."""


def decode_for_model(data: bytes, decoding: Decoding) -> np.ndarray:
    """``data`` (an encoded image) as uint8 (stored_size, stored_size, 3), as prepare stores it."""
    from PIL import Image, UnidentifiedImageError

    from tasks.data.images import to_stored_pixels, upright

    if not data:
        raise ImageRejected("empty file")
    try:
        with Image.open(io.BytesIO(data), formats=list(decoding.formats)) as img:
            width, height = img.size
            if width * height > decoding.max_pixels:
                raise ImageRejected(f"{width}x{height} pixels exceeds max_pixels {decoding.max_pixels:,}")
            img.load()
            return to_stored_pixels(_eight_bit(upright(img)), decoding.stored_size)  # turned before 16-bit scaling
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected(f"not an image in an allowed format ({', '.join(decoding.formats)})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected(f"cannot decode ({exc.__class__.__name__}: {exc})") from None


def _eight_bit(img: Any) -> Any:
    """16-bit and float greyscale scaled to 0..255 (PIL's own conversion clips them to white)."""
    from PIL import Image

    if img.mode not in ("I", "I;16", "I;16B", "I;16L", "F"):
        return img
    pixels = np.asarray(img, dtype=np.float64)
    top = 65535.0 if img.mode.startswith("I;16") or pixels.max() > 255 else 255.0
    return Image.fromarray(np.clip(pixels / top * 255.0, 0, 255).astype(np.uint8), mode="L")


def as_bytes(value: Any) -> bytes:
    """A cell of the ``image`` column: bytes, or base64 text (what a JSON client sends)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error:
            raise ImageRejected("image is a string but not valid base64") from None
    raise ImageRejected(f"image must be bytes or base64 text, got {type(value).__name__}")


def top_k_rows(probabilities: np.ndarray, classes: Sequence[str], top_k: int) -> list[dict[str, Any]]:
    """Per row: the best class, its probability and the ``top_k`` best (best first)."""
    k = max(1, min(int(top_k), len(classes)))
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [
        {
            "class": classes[int(best[0])],
            "confidence": float(row[best[0]]),
            "top_classes": [classes[int(i)] for i in best],
            "top_probabilities": [float(row[i]) for i in best],
            "error": "",
        }
        for row, best in zip(probabilities, order, strict=True)
    ]


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    """The pyfunc wrapper registered for every version (see the module docstring)."""

    def __init__(self, decoding: Decoding | None = None, batch_size: int = 64) -> None:
        self.decoding = decoding
        self.batch_size = batch_size
        self.classifier: Any = None  # tasks.model.network.ImageClassifier, set by load

    def load_context(self, context: Any) -> None:
        config = dict(context.model_config or {})
        self.batch_size = int(config.pop("batch_size", self.batch_size))
        self.decoding = Decoding(
            stored_size=int(config["stored_size"]),
            formats=tuple(config["formats"]),
            max_pixels=int(config["max_pixels"]),
        )
        self.load(Path(context.artifacts[MODEL_ARTIFACT]))

    def load(self, model_dir: Path) -> ImageClassifierModel:
        import torch

        from tasks.model.network import load_model

        self.classifier, _ = load_model(model_dir)
        self.classifier.to(torch.device("cpu"))
        return self

    @property
    def classes(self) -> list[str]:
        return list(self.classifier.classes)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if IMAGE_COLUMN not in model_input:
            raise ImageRejected(f"input needs an {IMAGE_COLUMN!r} column; got {list(model_input.columns)}")
        top_k = int((params or {}).get("top_k", DEFAULT_TOP_K))
        return pd.DataFrame(self.score(list(model_input[IMAGE_COLUMN]), top_k), columns=list(OUTPUT_COLUMNS))

    def score(self, images: Sequence[Any], top_k: int = DEFAULT_TOP_K) -> list[dict[str, Any]]:
        """One output row per input: decode each, run the network on the decodable ones."""
        if self.decoding is None or self.classifier is None:
            raise RuntimeError("ImageClassifierModel is not loaded: call load() or let MLflow load it")
        rows: list[dict[str, Any] | None] = [None] * len(images)
        pixels, where = [], []
        for i, value in enumerate(images):
            try:
                pixels.append(decode_for_model(as_bytes(value), self.decoding))
                where.append(i)
            except ImageRejected as exc:
                rows[i] = {"class": None, "confidence": None, "top_classes": [], "top_probabilities": [],
                           "error": str(exc)}  # fmt: skip
        if pixels:
            for i, row in zip(
                where, top_k_rows(self.probabilities(np.stack(pixels)), self.classes, top_k), strict=True
            ):
                rows[i] = row
        return [row for row in rows if row is not None]

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """Softmax over the classes for stored-size uint8 images (N, H, W, 3)."""
        import torch

        from tasks.model.network import predict_logits

        logits = predict_logits(self.classifier, pixels, self.batch_size, torch.device("cpu"))
        return torch.softmax(torch.from_numpy(logits), dim=1).numpy()


def model_config(decoding: Decoding, batch_size: int) -> dict[str, Any]:
    """What ``load_context`` reads back (logged as the version's ``model_config``)."""
    return {**asdict(decoding), "formats": list(decoding.formats), "batch_size": batch_size}


def example_input(stored_size: int) -> pd.DataFrame:
    """A small PNG as the logged input example (and for the signature)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (stored_size, stored_size), (127, 127, 127)).save(buffer, format="PNG")
    return pd.DataFrame({IMAGE_COLUMN: [buffer.getvalue()]})


def load_registered(uri: str) -> ImageClassifierModel:
    """A registered version (``models:/<name>@<alias>`` or ``models:/<name>/<version>``), loaded."""
    return mlflow.pyfunc.load_model(uri).unwrap_python_model()


def load_network(uri: str) -> Any:
    """The network of a registered version, for scoring stored-size uint8 images (N, H, W, 3).

    Versions registered before the pyfunc model (torch.export graphs, MLflow's pytorch flavour)
    still load, so the gate can compare with an older champion.
    """
    if predates_image_model(uri):
        return mlflow.pytorch.load_model(uri, map_location="cpu")
    return load_registered(uri).classifier


def predates_image_model(uri: str) -> bool:
    """A version registered before the pyfunc image-file model (MLflow's bare ``pytorch``
    flavour): no saved weights to warm-start from, no image decoding to reuse."""
    from mlflow.models import get_model_info

    return "pytorch" in get_model_info(uri).flavors
