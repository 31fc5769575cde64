"""params.yaml parsed into typed models. Unknown keys fail at load with the key's name.

The defaults below are the one source of the pipeline's defaults: a workspace's params.yaml
spells them out (DVC tracks params by key) and may differ from them only where it describes
its own dataset (``DATASET_KEYS``) or where its owner chose otherwise; the repository's
params.yaml is exactly these defaults plus the Fashion-MNIST demo's dataset keys (a test
checks it). Checks that involve two keys run here, at load, so a bad combination fails
before any stage starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.common.errors import PipelineError

#: The keys that describe a dataset rather than a choice of method: set per workspace.
DATASET_KEYS = ("classes", "prepare.image_size", "register.model_name")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LabelNoiseConfig(_Strict):
    """The label-noise screen at ingest (tasks/data/noise.py): the champion scores each new
    batch; rows it confidently assigns to another class are suspects."""

    #: What a batch whose suspect rate is significantly above the champion's own gets: ``hold``
    #: (the whole batch waits for ``ctl release``), ``quarantine_rows`` (only its suspect rows are
    #: quarantined), ``off`` (no screen).
    action: Literal["hold", "quarantine_rows", "off"] = "hold"
    #: How sure the champion must be to call a row mislabelled. null: per-class thresholds, as in
    #: confident learning (each class's mean predicted probability over the champion's held-out
    #: images of that class); a number: one threshold for every class.
    confidence: Annotated[float, Field(gt=0, le=1)] | None = None
    #: Significance level of the one-sided binomial test of the batch's suspect count.
    alpha: Annotated[float, Field(gt=0, lt=1)] = 0.01
    #: Added to the champion's own suspect rate (absolute: 0.01 = 1 point) before testing, so a
    #: batch only slightly harder than the held-out images is not held (bench/label_noise.py
    #: measures what it costs in detection).
    tolerance: Annotated[float, Field(ge=0, lt=1)] = 0.01


class IngestConfig(_Strict):
    landing_dir: str = "landing"
    #: Matched case-insensitively: stored lower-case.
    image_extensions: tuple[str, ...] = (".png", ".jpg", ".jpeg")
    #: Bad rows are quarantined and the rest of the batch is ingested, unless more than this
    #: fraction of the batch is bad: then the whole batch is rejected (a sign of a broken export).
    max_bad_fraction: Annotated[float, Field(ge=0, le=1)] = 0.2
    label_noise: LabelNoiseConfig = LabelNoiseConfig()

    @field_validator("image_extensions")
    @classmethod
    def _lower_case(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(e.lower() for e in value)


class Thresholds(_Strict):
    """A warning level (reported, does not block) and a blocking level; null turns one off."""

    warn: Annotated[float, Field(ge=0)] | None = None
    block: Annotated[float, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _warn_below_block(self) -> Thresholds:
        if self.warn is not None and self.block is not None and self.warn > self.block:
            raise ValueError(f"warn ({self.warn:g}) must not exceed block ({self.block:g})")
        return self


class DriftConfig(_Strict):
    """Significance levels of the label-drift test (tasks/data/validation.py): the p-value of a
    chi-square test of homogeneity of a batch's label counts against all earlier batches'. Unlike
    a fixed distance it accounts for the batch's size (40 labels differ from the reference by
    chance far more than 3,000 do), so a clean batch warns with probability ``warn_alpha``
    whatever its size. The Jensen-Shannon distance is reported beside it, as the size of the shift."""

    #: Warn when a batch's p-value is below this; null: no warning.
    warn_alpha: Annotated[float, Field(gt=0, lt=1)] | None = 0.01
    #: Block (fail validation) below this; null: never blocks. At most ``warn_alpha``. A small
    #: batch's p-value is simulated and never below 1e-4, so a lower level never blocks one.
    block_alpha: Annotated[float, Field(gt=0, lt=1)] | None = None

    @model_validator(mode="after")
    def _block_below_warn(self) -> DriftConfig:
        if self.warn_alpha is not None and self.block_alpha is not None and self.block_alpha > self.warn_alpha:
            raise ValueError(f"block_alpha ({self.block_alpha:g}) must not exceed warn_alpha ({self.warn_alpha:g})")
        return self


class ValidateConfig(_Strict):
    #: PIL format names; only these decoders are ever run on landed files.
    formats: tuple[str, ...] = ("PNG", "JPEG")
    #: PIL image modes accepted (CMYK, 16-bit "I;16", float "F" are not).
    modes: tuple[str, ...] = ("L", "LA", "P", "RGB", "RGBA")
    min_image_side: Annotated[int, Field(gt=0)] = 8
    max_image_side: Annotated[int, Field(gt=0)] = 4096
    #: Checked from the header before decoding: anything larger is treated as a decompression bomb.
    max_pixels: Annotated[int, Field(gt=0)] = 4096 * 4096
    min_images_per_class: Annotated[int, Field(ge=0)] = 20
    #: Largest class count / smallest class count over the whole dataset. Above
    #: ``train.class_balance_ratio`` (1.5) the trainer compensates by default; the warning
    #: (at 2.0, less chatty than 1.5 on real data) says the data itself is skewed.
    class_imbalance: Thresholds = Thresholds(warn=2.0)
    #: Whether a batch's labels are distributed as those of every batch ingested before it. A
    #: fixed Jensen-Shannon threshold (0.15) warned on 88 % of clean 40-image batches (bench/drift.py).
    label_drift: DriftConfig = DriftConfig()

    @field_validator("formats", "modes")
    @classmethod
    def _not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("must list at least one entry")
        return value

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from PIL import Image

        Image.init()
        value = tuple(f.upper() for f in value)
        unknown = [f for f in value if f not in Image.OPEN]
        if unknown:
            raise ValueError(f"unknown image format(s) {unknown}; supported: {', '.join(sorted(Image.OPEN))}")
        return value

    @model_validator(mode="after")
    def _sizes_consistent(self) -> ValidateConfig:
        if self.min_image_side > self.max_image_side:
            raise ValueError(
                f"min_image_side ({self.min_image_side}) must not exceed max_image_side ({self.max_image_side})"
            )
        if self.max_pixels < self.min_image_side**2:
            raise ValueError(
                f"max_pixels ({self.max_pixels}) is below min_image_side squared ({self.min_image_side**2}): "
                "no image could pass"
            )
        return self


class PrepareConfig(_Strict):
    #: Side of the square uint8 images stored for training. Native size is kept when equal.
    image_size: Annotated[int, Field(gt=0)] = 28
    val_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    #: Changing the salt reshuffles every split; leave it alone unless you mean that.
    split_salt: str = ""

    @model_validator(mode="after")
    def _fractions_leave_a_train_split(self) -> PrepareConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction + test_fraction must be < 1 (a train split must remain), "
                f"got {self.val_fraction} + {self.test_fraction}"
            )
        return self


class AugmentConfig(_Strict):
    """Random geometric augmentation of each training sample, composed into one affine resampling
    of the model's input on the device. With the feature cache only ``hflip`` applies."""

    hflip: bool = True
    vflip: bool = False
    #: Random shift by up to this many pixels of the model's input, each axis (border pixels fill in).
    translate: Annotated[int, Field(ge=0)] = 4
    #: Random rotation by up to this many degrees either way.
    rotation: Annotated[float, Field(ge=0, le=180)] = 0.0
    #: Random horizontal shear by up to this many degrees either way.
    shear: Annotated[float, Field(ge=0, lt=90)] = 0.0
    #: Random scale change by up to this fraction: 0.1 draws a scale in [0.9, 1.1] (above 1 magnifies).
    zoom: Annotated[float, Field(ge=0, lt=1)] = 0.0


Strategy = Literal["feature_extraction", "partial", "fine_tune"]


class TrainConfig(_Strict):
    backbone: str = "tf_efficientnet_lite0"
    #: packaged | hub | none | a path to a .pth / .safetensors state_dict
    weights: str = "packaged"
    strategy: Strategy = "partial"
    #: For ``partial``: how many of the backbone's stages (stem first) stay frozen.
    frozen_stages: Annotated[int, Field(ge=0)] = 3
    #: Epochs that train only the new head before the strategy's layers are unfrozen.
    head_warmup_epochs: Annotated[int, Field(ge=0)] = 0
    epochs: Annotated[int, Field(ge=1)] = 3
    batch_size: Annotated[int, Field(ge=1)] = 128
    lr: Annotated[float, Field(gt=0)] = 3e-3
    #: Learning rate multiplier for pretrained layers (``fine_tune`` and ``partial``).
    backbone_lr_mult: Annotated[float, Field(gt=0, le=1)] = 0.5
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.1
    drop_rate: Annotated[float, Field(ge=0, lt=1)] = 0.2
    #: Model input side; null takes the backbone's pretrained input size.
    image_size: Annotated[int, Field(gt=0)] | None = 64
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: CPU threads; null lets torch decide.
    num_threads: Annotated[int, Field(ge=1)] | None = None
    #: Training processes on each node; above 1 the stage launches them with torchrun's launcher and
    #: trains with DistributedDataParallel (NCCL, one GPU each; gloo on CPU). ``batch_size`` stays
    #: the whole batch of a step, split among them.
    processes: Annotated[int, Field(ge=1)] = 1
    #: Nodes, each running ``processes``; above 1 every node runs the stage with PET_RDZV_ENDPOINT
    #: (host:port of the rendezvous) and PET_RDZV_ID set.
    nnodes: Annotated[int, Field(ge=1)] = 1
    seed: int = 42
    augment: AugmentConfig = AugmentConfig()
    #: ``feature_extraction`` / ``partial``: compute the frozen layers' output once per image,
    #: keep it under .cache/features/ keyed by image hash, and train only the rest on it.
    #: hflip uses cached features of the mirrored image; the other augmentations cannot be applied
    #: to cached features and are skipped (one warning names them).
    feature_cache: bool = True
    #: Wrap the training forward pass in torch.compile (worth it on GPU; slower on CPU).
    compile: bool = False
    #: ``auto``: start from the champion when the ``parent`` step found a compatible one
    #: (tasks/model/warm_start.py) and train on the new batches plus a replay sample; null: always
    #: start from ``weights``; a model directory written by save_model (same backbone and classes):
    #: start from it, on every image. A warm start runs ``warm_start_epochs``, not ``epochs``.
    warm_start: str | None = "auto"
    warm_start_epochs: Annotated[int, Field(ge=1)] = 1
    #: Earlier train images replayed per new one in an automatic warm start (a seeded sample).
    warm_start_replay: Annotated[float, Field(ge=0)] = 1.0
    #: At most this many automatic warm starts in a row; the next retrain starts from ``weights``.
    warm_start_full_every: Annotated[int, Field(ge=1)] = 5
    #: lr multiplier when warm-starting. The champion ended its schedule at lr 0: restarting near full
    #: lr undoes part of it (bench/incremental.py, 40,000 -> 44,000 images: 0.3 lost 0.6 points).
    warm_start_lr_mult: Annotated[float, Field(gt=0, le=1)] = 0.03
    #: Scale ``lr`` with batch_size / base_batch_size: none | linear | sqrt.
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    base_batch_size: Annotated[int, Field(ge=1)] = 128
    #: How training compensates for unequal class counts in the train split. ``weighted_loss``:
    #: cross-entropy weighted by n / (classes * class count); ``balanced_sampling``: each epoch
    #: draws as many images as the split holds, with replacement, each class equally likely.
    #: ``auto`` is ``weighted_loss`` when largest / smallest class count exceeds
    #: ``class_balance_ratio``, else ``none``: a weighted loss works unchanged with the feature
    #: cache and still shows every image once per epoch, where sampling repeats minority images
    #: (and skips majority ones), which overfits the few minority images sooner.
    class_balance: Literal["auto", "none", "weighted_loss", "balanced_sampling"] = "auto"
    #: Below this ratio the imbalance is too small to be worth a change of objective.
    class_balance_ratio: Annotated[float, Field(ge=1)] = 1.5

    @model_validator(mode="after")
    def _warmup_leaves_epochs(self) -> TrainConfig:
        if self.strategy != "feature_extraction" and self.head_warmup_epochs >= self.epochs:
            raise ValueError(
                f"head_warmup_epochs ({self.head_warmup_epochs}) must be < epochs ({self.epochs}), "
                f"or strategy {self.strategy!r} never trains more than the head"
            )
        return self


class EvaluateConfig(_Strict):
    batch_size: Annotated[int, Field(ge=1)] = 512
    #: Also score the fixed benchmark set in data/benchmark when it holds one.
    benchmark: bool = True
    #: How many of each split's most confident mistakes go to reports/evaluation/mistakes_<split>.csv
    #: and, as captioned thumbnails, mistakes_<split>.png (the grid draws at most 48).
    mistakes: Annotated[int, Field(ge=0)] = 24


class RegisterConfig(_Strict):
    model_name: str = "image-classifier"
    experiment: str = "continuous-transfer-learning"


class GateConfig(_Strict):
    """The promotion gate: challenger vs champion on the same images (tasks/registry/rules.py)."""

    #: The images judged. ``auto``: the fixed benchmark set when the evaluate stage scored one
    #: (its images never change and it is usually larger than the test split, so versions are
    #: compared on the same, bigger evidence), else the test split. ``both``: every rule on each.
    judge_on: Literal["auto", "test", "benchmark", "both"] = "auto"
    #: Absolute floors (the only rules for the first model, when there is no champion). null
    #: derives each from the judged images: the better of the majority-class predictor and the
    #: evaluate stage's cheap baseline (logistic regression on 16x16 grey pixels and channel
    #: means, tasks/model/baseline.py), plus ``floor_margin``. A number is used as it is.
    min_accuracy: Annotated[float, Field(ge=0, le=1)] | None = None
    min_macro_f1: Annotated[float, Field(ge=0, le=1)] | None = None
    #: How far above its reference a derived floor lies (absolute: 0.02 = 2 points; capped at 1).
    floor_margin: Annotated[float, Field(ge=0, le=1)] = 0.02
    #: How far below the champion the challenger may fall (fractions: 0.005 = half a point).
    max_accuracy_drop: Annotated[float, Field(ge=0, le=1)] = 0.005
    max_macro_f1_drop: Annotated[float, Field(ge=0, le=1)] = 0.005
    #: Exact McNemar test on paired per-image outcomes. ``not_worse``: reject only when the
    #: challenger is significantly worse; ``significantly_better``: promote only when it is
    #: significantly better.
    significance: Literal["not_worse", "significantly_better"] = "not_worse"
    #: Significance level of the McNemar test and of the per-class test below.
    alpha: Annotated[float, Field(gt=0, lt=1)] = 0.05
    #: A class fails when its recall drops by more than this versus the champion (0.05 = 5
    #: points) AND an exact one-sided binomial test on its discordant images (champion-only vs
    #: challenger-only) is significant at ``alpha``: a drop of one image in two is not evidence.
    max_class_recall_drop: Annotated[float, Field(ge=0, le=1)] = 0.05
    #: Optional budgets; null disables them.
    max_model_mb: Annotated[float, Field(gt=0)] | None = None
    max_latency_ms: Annotated[float, Field(gt=0)] | None = None
    #: ``auto``: the verdict moves the aliases. ``manual``: the retrain pauses in Prefect after the
    #: gate with its report and waits for an operator's approve/reject (Prefect UI "Resume", or
    #: ``ctl approve|reject``); no decision within ``approval_timeout_s`` rejects the version.
    approval: Literal["auto", "manual"] = "auto"
    approval_timeout_s: Annotated[int, Field(ge=1)] = 86400


class WatchConfig(_Strict):
    """The watch-landing deployment (flows/watch.py)."""

    interval_s: Annotated[int, Field(ge=5)] = 60


class RetrainConfig(_Strict):
    """The retrain deployment (flows/retrain.py): besides the data trigger, a schedule."""

    #: Cron schedule (UTC) for retrains without new data; null disables it.
    cron: str | None = "0 3 * * 1"
    #: True: every DVC stage in a process of its own (``dvc repro --single-item``), so a stage
    #: that crashes (the OOM killer, a segfault) cannot take the flow run with it, at about 8 s
    #: of start-up per stage. False: the flow's process runs the stage's command itself through
    #: DVC's API when it is running the workspace's own code (else it still starts a process).
    isolate_stages: bool = False


class PredictConfig(_Strict):
    """The predict deployment (flows/predict.py): a folder scored on demand or on a schedule."""

    #: Folder of images to score (relative to the workspace); null: the run names one.
    folder: str | None = None
    #: An alias or a version number.
    model: str = "champion"
    #: Cron schedule (UTC) for scoring ``folder``; null: on demand only.
    cron: str | None = None


class PipelineConfig(_Strict):
    """The whole params.yaml. ``validate`` and ``register`` clash with pydantic's own
    attributes, so they are read through aliases and reached as ``cfg.validate_`` and
    ``cfg.register_``."""

    #: The label set. A label outside it is rejected; a new class needs a change here.
    classes: tuple[str, ...]
    ingest: IngestConfig = IngestConfig()
    validate_: ValidateConfig = Field(default=ValidateConfig(), alias="validate")
    prepare: PrepareConfig = PrepareConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    register_: RegisterConfig = Field(default=RegisterConfig(), alias="register")
    gate: GateConfig = GateConfig()
    watch: WatchConfig = WatchConfig()
    retrain: RetrainConfig = RetrainConfig()
    predict: PredictConfig = PredictConfig()

    @field_validator("classes")
    @classmethod
    def _classes_unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(value) < 2:
            raise ValueError(f"need at least 2 classes, got {list(value)}")
        dupes = sorted({c for c in value if value.count(c) > 1})
        if dupes:
            raise ValueError(f"duplicate class names {dupes}")
        blank = [c for c in value if not c.strip() or c != c.strip()]
        if blank:
            raise ValueError(f"blank or padded class names {blank}")
        return value


def _format_error(err: dict, model: type[BaseModel]) -> str:
    where = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, err["loc"][:-1])
        return f"unknown key '{where}'; allowed: {', '.join(allowed)}"
    message = err["msg"].removeprefix("Value error, ")
    if isinstance(err.get("input"), dict):  # a check across keys: the message names them
        return f"'{where}': {message}"
    return f"'{where}': {message} (got {err.get('input')!r})"


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        fields = {(f.alias or name): f for name, f in model.model_fields.items()}
        field = fields.get(str(part))
        if field is None or not isinstance(field.annotation, type):
            return []
        model = field.annotation
    return sorted((f.alias or name) for name, f in model.model_fields.items())


def parse_params(data: object, source: str = "params.yaml") -> PipelineConfig:
    if not isinstance(data, dict):
        raise PipelineError(f"{source}: expected a mapping at top level, got {type(data).__name__}")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_format_error(e, PipelineConfig) for e in exc.errors())
        raise PipelineError(f"{source}: {problems}") from None


def load_params(path: Path | str = "params.yaml") -> PipelineConfig:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"params file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML: {exc}") from None
    return parse_params(data, str(path))
