"""Typed parameters for the whole pipeline, loaded from ``params.yaml``.

This module is the only reader of ``params.yaml``. Every group of the file maps to one frozen pydantic
model with ``extra="forbid"``, so a typo, a wrong type or an out-of-range value is rejected with its key
path, the expected value and the given value before any stage starts work.

Overrides use the same validation: ``--set train.lr=1e-4`` parses the value as YAML and re-validates the
whole document. The file must be UTF-8, and a key given twice in one mapping is an error (plain YAML loaders
silently keep the last value).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from birefnet.models.config import LIMIT_KEYS as MODEL_LIMIT_KEYS
from birefnet.models.config import ModelConfig, check_consistency, check_encoder_name
from birefnet.models.config import field_types as model_field_types

DIS5K_SETS = ("DIS-TR", "DIS-VD", "DIS-TE1", "DIS-TE2", "DIS-TE3", "DIS-TE4")


class ParamsError(ValueError):
    """Raised when ``params.yaml`` (or an override) is invalid; the message lists every problem."""


class Frozen(BaseModel):
    """Base for every params group: immutable, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]


def _multiple_of_32(size: tuple[int, int]) -> tuple[int, int]:
    if size[0] % 32 or size[1] % 32:
        raise ValueError(f"both sides must be multiples of 32 (the decoder's patch grid), got {list(size)}")
    return size


#: A (width, height) training resolution: both sides multiples of 32.
TrainingSize = Annotated[tuple[PositiveInt, PositiveInt], AfterValidator(_multiple_of_32)]


# --------------------------------------------------------------------------------------------- data


class SyntheticParams(Frozen):
    """The embedded DIS-like dataset written by the ``synthesize`` stage."""

    seed: int = 0
    out: Path = Path("data/synthetic")
    counts: dict[str, PositiveInt] = Field(
        default_factory=lambda: {
            "DIS-TR": 120,
            "DIS-VD": 16,
            "DIS-TE1": 12,
            "DIS-TE2": 12,
            "DIS-TE3": 12,
            "DIS-TE4": 12,
        }
    )
    min_side: Annotated[int, Field(ge=64, le=4096)] = 256
    max_side: Annotated[int, Field(ge=64, le=4096)] = 448
    jpeg_quality: Annotated[int, Field(ge=50, le=100)] = 92

    @model_validator(mode="after")
    def _sides_ordered(self) -> SyntheticParams:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side ({self.min_side}) must be <= max_side ({self.max_side})")
        return self


class DataParams(Frozen):
    """Where the dataset lives, how it is split and validated, and the training resolution."""

    root: Path = Path("data/synthetic")
    prepared: Path = Path("data/prepared")
    train_sets: list[str] = Field(default_factory=lambda: ["DIS-TR"], min_length=1)
    val_sets: list[str] = Field(default_factory=lambda: ["DIS-VD"])
    test_sets: list[str] = Field(default_factory=lambda: ["DIS-TE1", "DIS-TE2", "DIS-TE3", "DIS-TE4"])
    size: TrainingSize = (256, 256)
    on_bad_sample: Literal["fail", "quarantine"] = "quarantine"
    max_image_pixels: Annotated[int, Field(gt=0)] = 200_000_000
    workers: NonNegativeInt = 2
    synthetic: SyntheticParams = Field(default_factory=SyntheticParams)

    @model_validator(mode="after")
    def _sets_disjoint(self) -> DataParams:
        seen: dict[str, str] = {}
        for split in ("train_sets", "val_sets", "test_sets"):
            for name in getattr(self, split):
                if name in seen:
                    raise ValueError(f"set {name!r} is listed in both {seen[name]} and {split}")
                seen[name] = split
        return self

    def split_of(self, set_name: str) -> str | None:
        """Return ``"train"``, ``"val"``, ``"test"`` or None for a set name."""
        for split in ("train", "val", "test"):
            if set_name in getattr(self, f"{split}_sets"):
                return split
        return None


class GradientsParams(Frozen):
    """Outward-reference gradient labels (a Laplacian of the normalised grayscale image)."""

    mode: Literal["precomputed", "on_the_fly"] = "precomputed"
    out: Path = Path("data/gradients")


# -------------------------------------------------------------------------------------------- model


def _model_params_fields() -> dict[str, Any]:
    """The ``model`` group's pydantic fields, read from :class:`ModelConfig`: type, default, description, limits."""
    fields: dict[str, Any] = {}
    for spec in dataclasses.fields(ModelConfig):
        limits = {key: spec.metadata[key] for key in MODEL_LIMIT_KEYS if key in spec.metadata}
        fields[spec.name] = (model_field_types()[spec.name],
                             Field(spec.default, description=spec.metadata["description"], **limits))
    return fields


def _encoder_name(cls: type[BaseModel], value: str) -> str:
    return check_encoder_name(value)


def _consistent(self: BaseModel) -> BaseModel:
    check_consistency(self)
    return self


class _ModelParamsBase(Frozen):
    """Conversions between the ``model`` params group and the model package's own :class:`ModelConfig`."""

    def to_config(self) -> ModelConfig:
        """The group as the model package's :class:`ModelConfig` (what ``build_model`` builds)."""
        return ModelConfig(**dict(self))

    @classmethod
    def from_config(cls, config: ModelConfig) -> Any:
        """The group holding the values of ``config`` (every key counts as set)."""
        return cls(**config.to_dict())


#: The ``model`` group: BiRefNet's architecture switches (:class:`birefnet.models.config.ModelConfig`).
#: Defaults equal the published general checkpoint (swin_v1_l). Fields, defaults, descriptions, limits and
#: checks all come from ``ModelConfig``, which the model package validates on its own (without pydantic);
#: this pydantic model adds the key-path error messages and ``model_fields_set`` (which keys the file set).
ModelParams = create_model(
    "ModelParams",
    __base__=_ModelParamsBase,
    __module__=__name__,
    __doc__="""BiRefNet architecture switches (the ``model`` group). Defaults equal the published general checkpoint
    (swin_v1_l).

    Generated from the model package's own ``ModelConfig``; ``birefnet.models.build_model(params.model)`` is the
    only consumer. Every paper component is a switch so the ablations of the paper are one ``--set`` away.
    Switches that change the state-dict layout are embedded in every saved checkpoint, so ``load_model``
    rebuilds from the file.
    """,
    __validators__={
        "_encoder_name": field_validator("encoder")(classmethod(_encoder_name)),
        "_consistent": model_validator(mode="after")(_consistent),
    },
    **_model_params_fields(),
)


# ------------------------------------------------------------------------------------ shard, loader


def _path_or_url(value: str | Path) -> str | Path:
    text = str(value)
    return text.rstrip("/") if "://" in text else Path(text)


#: A local folder (a Path) or an object-store URL kept as text (``s3://bucket/prefix``; Path would fold ``//``).
PathOrUrl = Annotated[str | Path, AfterValidator(_path_or_url)]


class ShardParams(Frozen):
    """The ``shard`` stage: WebDataset tars per split/set. Owned by ``birefnet/data`` (WebDataset writer).

    A shard is closed when the next sample would exceed ``max_samples`` or ``max_bytes`` (tar bytes). ``out``
    may be an ``s3://bucket/prefix`` URL for the cluster path (outside DVC, whose ``outs`` are local).
    """

    out: PathOrUrl = Path("data/shards")
    max_samples: PositiveInt = 64
    max_bytes: Annotated[int, Field(ge=1 << 20)] = 256 << 20
    resize: bool = True
    image_format: Literal["jpg", "png", "webp"] = "jpg"
    quality: Annotated[int, Field(ge=1, le=100)] = 95
    png_compression: Annotated[int, Field(ge=0, le=9)] = 3
    original_masks: list[Literal["train", "val", "test"]] = Field(default_factory=lambda: ["test"])


class LoaderParams(Frozen):
    """The streaming WebDataset loader and its augmentations. Owned by ``birefnet/data`` (loader).

    Augmentation names and ranges follow upstream's ``image_proc.py`` (order flip, crop, rotate, enhance,
    pepper). Factor ranges are inclusive and drawn in steps of 0.1, as upstream's ``randint(a, b) / 10``.
    """

    batch_size: PositiveInt = 4
    workers: NonNegativeInt = 2
    shuffle_buffer: NonNegativeInt = 128
    seed: int = 0
    epoch_batches: PositiveInt | None = None
    augment: list[Literal["flip", "crop", "rotate", "enhance", "pepper"]] = Field(
        default_factory=lambda: ["flip", "rotate"])
    flip_prob: Annotated[float, Field(ge=0, le=1)] = 0.5
    crop_border: Annotated[float, Field(ge=0, lt=0.5)] = 0.1
    rotate_prob: Annotated[float, Field(ge=0, le=1)] = 0.2
    rotate_degrees: Annotated[int, Field(ge=0, le=180)] = 15
    brightness: tuple[float, float] = (0.5, 1.4)
    contrast: tuple[float, float] = (0.5, 1.4)
    color: tuple[float, float] = (0.0, 1.9)
    sharpness: tuple[float, float] = (0.0, 2.9)
    pepper_fraction: Annotated[float, Field(ge=0, le=1)] = 0.0015
    on_decode_error: Literal["fail", "skip"] = "fail"
    pin_memory: bool = True
    prefetch_factor: PositiveInt = 2

    @field_validator("brightness", "contrast", "color", "sharpness")
    @classmethod
    def _factor_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] <= v[1]:
            raise ValueError(f"expected 0 <= low <= high, got {list(v)}")
        return v


# --------------------------------------------------------------------------------------------- train


class LossWeights(Frozen):
    """Weights of the loss terms (BiRefNet Sec. 3.4; upstream-spec §6). 0 switches a term off."""

    bce: Annotated[float, Field(ge=0)] = 30.0
    iou: Annotated[float, Field(ge=0)] = 0.5
    ssim: Annotated[float, Field(ge=0)] = 10.0
    mae: Annotated[float, Field(ge=0)] = 0.0
    mse: Annotated[float, Field(ge=0)] = 0.0
    ce: Annotated[float, Field(ge=0)] = 5.0
    gradient: Annotated[float, Field(ge=0)] = 1.0


LossTerm = Literal["bce", "iou", "ssim", "mae", "mse", "ce", "gradient"]


class TrainStageParams(Frozen):
    """One stage of the training schedule.

    ``decay`` makes upstream's per-epoch in-place weight changes explicit: in the k-th epoch of the stage
    (k = 1, 2, ...) a term's weight is ``loss.<term> * decay[<term>] ** k``. It is a function of the epoch,
    so a resume inside the stage gives the same weights.
    """

    name: str = Field(min_length=1)
    epochs: PositiveInt
    lr: Annotated[float, Field(gt=0)] | None = None
    loss: LossWeights = Field(default_factory=LossWeights)
    decay: dict[LossTerm, Annotated[float, Field(ge=0, le=1)]] = Field(default_factory=dict)
    supervise: Literal["all", "final"] = "all"
    size: TrainingSize | None = Field(
        None, description="train this stage's batches at (width, height), resized in the loop; null = data.size")
    dynamic_size: tuple[tuple[PositiveInt, PositiveInt], tuple[PositiveInt, PositiveInt]] | None = Field(
        None, description="[[min_width, max_width], [min_height, max_height]] (bounds multiples of 32): each batch "
                          "is resized in the loop to a random multiple of 32 in these ranges (upstream's "
                          "dynamic_size), a function of (train.seed, epoch, step), so every DDP rank draws the "
                          "same; exclusive with size; null = off")

    @model_validator(mode="after")
    def _dynamic_size_ranges(self) -> TrainStageParams:
        if self.dynamic_size is None:
            return self
        if self.size is not None:
            raise ValueError(f"stage {self.name!r}: size {list(self.size)} and dynamic_size "
                             f"{[list(r) for r in self.dynamic_size]} are mutually exclusive; set one")
        for axis, (low, high) in zip(("width", "height"), self.dynamic_size, strict=True):
            if low % 32 or high % 32:
                raise ValueError(f"stage {self.name!r}: dynamic_size {axis} bounds must be multiples of 32 (the "
                                 f"decoder's patch grid), got [{low}, {high}]")
            if low > high:
                raise ValueError(f"stage {self.name!r}: dynamic_size {axis} range [{low}, {high}] has min > max")
        return self


def _paper_stages() -> list[TrainStageParams]:
    return [
        TrainStageParams(name="main", epochs=780),
        TrainStageParams(name="finetune_region", epochs=20,
                         loss=LossWeights(bce=0.0, iou=0.5, ssim=10.0, mae=0.0, ce=5.0, gradient=1.0),
                         decay={"iou": 0.5, "mae": 0.9}),
    ]


class TrainParams(Frozen):
    """The ``train`` stage: Ray Train scaling, optimiser, staged schedule, checkpoints."""

    out: Path = Path("models")
    storage_path: str = "checkpoints"
    run_name: str | None = None
    ray_address: str | None = None
    num_workers: PositiveInt = 1
    use_gpu: bool = False
    cpus_per_worker: Annotated[float, Field(gt=0)] = 1.0
    threads_per_worker: PositiveInt | None = None
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    optimizer: Literal["adamw", "adam"] = "adamw"
    lr: Annotated[float, Field(gt=0)] = 1e-4
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.99)
    weight_decay: Annotated[float, Field(ge=0)] = 1e-2
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_epochs: NonNegativeInt = 0
    grad_clip: Annotated[float, Field(gt=0)] | None = None
    stages: list[TrainStageParams] = Field(default_factory=_paper_stages, min_length=1)
    seed: int = 7
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 on CUDA, fp32 on CPU; fp16 = fp16 autocast with a GradScaler (CUDA GPUs "
                            "without bf16; needs use_gpu)")
    compile: bool = False
    channels_last: bool = False
    memory_preset: Literal["none", "24gb", "40gb", "80gb"] = "none"
    checkpoint_every: PositiveInt = 1
    keep_checkpoints: PositiveInt = 2
    max_failures: NonNegativeInt = 1
    val_every: PositiveInt = 1
    log_val_images: NonNegativeInt = Field(
        4, description="every epoch, one MLflow image (key val_masks, step = epoch) of the first this-many "
                       "samples of the first validation set: image | ground truth | prediction (0 = off)")
    bn_recalibration: NonNegativeInt = Field(
        0, description="before each validation, recompute BatchNorm statistics over this many of the epoch's "
                       "last training images at data.size with the final weights (0 = off: running averages)")
    init_from: str | None = None
    freeze_encoder_epochs: NonNegativeInt | Literal["all"] = Field(
        0, description="encoder parameters take no gradient and no optimiser state, and the encoder runs in eval "
                       "mode (BatchNorm statistics fixed), during the first K epochs (global, 0-based: epochs < K) "
                       "or the whole run ('all'); 0 = off")

    @field_validator("stages")
    @classmethod
    def _unique_stage_names(cls, v: list[TrainStageParams]) -> list[TrainStageParams]:
        names = [s.name for s in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage names must be unique, repeated: {dupes}")
        return v

    @field_validator("freeze_encoder_epochs", mode="before")
    @classmethod
    def _freeze_encoding(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool) and v < 0:
            raise ValueError(f"freeze_encoder_epochs is a number of epochs >= 0 (0 = off) or 'all' (the whole run), "
                             f"got {v}")
        return v

    @model_validator(mode="after")
    def _fp16_needs_cuda(self) -> TrainParams:
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision fp16 (autocast fp16 + GradScaler) is for CUDA GPUs without bf16 and needs "
                             "use_gpu: true; a CPU has no fast fp16 kernels (emulated, many times slower than "
                             "fp32): use fp32, or bf16 on a CPU with native bf16")
        return self

    @property
    def total_epochs(self) -> int:
        return sum(s.epochs for s in self.stages)


class TrackingParams(Frozen):
    """MLflow tracking. ``MLFLOW_TRACKING_URI`` in the environment overrides ``uri``."""

    uri: str = "sqlite:///mlflow.db"
    artifact_location: str = "mlartifacts"
    experiment: str = "birefnet"


#: Metrics of ``eval.json`` the promotion gate can rank by, and whether higher is better.
GATE_METRICS: dict[str, bool] = {
    "Sm": True, "maxF": True, "meanF": True, "adpF": True, "wF": True,
    "maxE": True, "meanE": True, "adpE": True, "MAE": False, "HCE": False,
}


class RegisterParams(Frozen):
    """The ``register`` stage: MLflow model version, aliases and the promotion gate (:mod:`birefnet.registry`)."""

    model_name: str = Field("birefnet", min_length=1, description="registered model name in the MLflow registry")
    model: Path = Field(Path("models/model.safetensors"), description="model file to register (train stage output)")
    metrics: Path = Field(Path("metrics/eval.json"), description="the evaluate stage's metrics (gate input)")
    out: Path = Field(Path("registry/registered.json"), description="decision record (DVC out)")
    primary_metric: Literal["Sm", "maxF", "meanF", "adpF", "wF", "maxE", "meanE", "adpE", "MAE", "HCE"] = Field(
        "Sm", description="gate metric: its mean over selection_sets; higher is better except MAE and HCE")
    min_delta: Annotated[float, Field(ge=0)] = Field(
        0.001, description="champion moves only when the challenger improves the primary metric by at least this")
    lock_timeout_s: Annotated[float, Field(gt=0)] = Field(
        120.0, description="wait for the gate lock at most this long while another registration or promotion holds it")
    lock_uri: str = Field(
        "", description="gate lock: postgresql://... (advisory lock), a lock file path, or 'mlflow' (a lease on the "
                        "registered model <model_name>.gate-lock); empty = derived from the tracking URI")
    lease_s: Annotated[float, Field(gt=0)] = Field(
        30.0, description="an MLflow gate lease not renewed for this long is stale (its holder renews it every "
                          "lease_s/4); PostgreSQL ends a lock holder's session idle this long")
    await_registration_s: Annotated[int, Field(ge=0)] = Field(
        30, description="wait at most this long for a new model version to become READY")
    selection_sets: list[str] = Field(
        default_factory=lambda: ["DIS-VD"],
        description="sets the gate compares challenger and champion on (mean of primary_metric): validation sets of "
                    "data.val_sets, scored by the evaluate stage beside the reported test sets; empty = gate on "
                    "data.test_sets (then the reported figure is also the selection criterion)")


# --------------------------------------------------------------------------------------------- evaluate


class EvaluateParams(Frozen):
    """The ``evaluate`` stage: the model on every test set, metrics, curves and the visual report."""

    model: Path = Field(Path("models/model.safetensors"), description="model file (train stage output)")
    out: Path = Field(Path("metrics/eval.json"), description="metrics JSON (DVC metrics)")
    plots: Path = Field(Path("metrics/plots"), description="curve CSVs (DVC plots) and PNGs")
    reports: Path = Field(Path("reports/eval"), description="visual report of the hardest samples, index.md")
    batch_size: PositiveInt = 4
    workers: PositiveInt = Field(2, description="metric processes (1 = in process); results do not depend on it")
    hce: bool = Field(True, description="compute HCE (the slowest metric)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 on CUDA, fp32 on CPU")
    hard_samples: NonNegativeInt = Field(4, description="samples per set in the visual report")
    hard_by: Literal["Sm", "MAE", "wF", "HCE"] = Field("Sm", description="hardness: lowest Sm/wF, highest MAE/HCE")
    crops: NonNegativeInt = Field(2, description="zoomed detail crops per report sample")
    crop_fraction: Annotated[float, Field(gt=0, le=1)] = Field(0.25, description="crop side / shorter image side")
    extra_metrics: list[Literal["mse", "mba", "biou"]] = Field(
        default_factory=list, description="metrics beyond the DIS suite: mse (MSE on the soft mask), mba (mean "
        "boundary accuracy), biou (maxBIoU and meanBIoU); see birefnet/evaluation/metrics.py")


# --------------------------------------------------------------------------------------------- serving


class ServingParams(Frozen):
    """Serving the registered model (``birefnet/inference/serving.py``): limits on what one request may send."""

    max_image_pixels: PositiveInt = Field(
        40_000_000, description="largest image (width x height) a served model accepts; bigger requests are refused")


# ------------------------------------------------------------------------------------------- params


# The ``register`` key shadows ``ABCMeta.register`` on the class object only; instances read the field.
# The warning pydantic emits for that is silenced for this class definition alone.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "register" in "Params" shadows', category=UserWarning)

    class Params(Frozen):
        """The whole ``params.yaml``."""

        data: DataParams = Field(default_factory=DataParams)
        gradients: GradientsParams = Field(default_factory=GradientsParams)
        model: ModelParams = Field(default_factory=ModelParams)
        shard: ShardParams = Field(default_factory=ShardParams)
        loader: LoaderParams = Field(default_factory=LoaderParams)
        train: TrainParams = Field(default_factory=TrainParams)
        tracking: TrackingParams = Field(default_factory=TrackingParams)
        register: RegisterParams = Field(default_factory=RegisterParams)
        evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
        serving: ServingParams = Field(default_factory=ServingParams)

        @model_validator(mode="after")
        def _selection_sets_known(self) -> Params:
            data = self.data
            for name in self.register.selection_sets:
                split = data.split_of(name)
                if split == "train":
                    raise ValueError(f"register.selection_sets: {name!r} is a training set (data.train_sets): the "
                                     "gate must select on data the model did not train on")
                if split is None:
                    raise ValueError(f"register.selection_sets: {name!r} is in neither data.val_sets "
                                     f"{data.val_sets} nor data.test_sets {data.test_sets}; add it to data.val_sets, "
                                     "or set register.selection_sets: [] to gate on the test sets")
            return self

        def gate_sets(self) -> list[str]:
            """The sets the promotion gate compares on: ``register.selection_sets``, else ``data.test_sets``."""
            return list(self.register.selection_sets or self.data.test_sets)

        def selection_only_sets(self) -> list[str]:
            """Selection sets the evaluate stage scores besides the test sets (those not already test sets)."""
            return [name for name in self.register.selection_sets if name not in self.data.test_sets]


# ------------------------------------------------------------------------------------------ loading


class DuplicateKeyError(yaml.YAMLError):
    """A mapping of a YAML document gives the same key twice.

    Attributes:
        key: dotted path of the repeated key (``train.lr``).
        lines: 1-based line numbers of every occurrence, in file order.
    """

    def __init__(self, key: str, lines: list[int]) -> None:
        self.key = key
        self.lines = lines
        where = ", ".join(str(n) for n in lines)
        super().__init__(f"duplicate key {key!r} (lines {where}): YAML would silently keep only the last value; "
                         "keep one")


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key repeated within one mapping (:class:`DuplicateKeyError`).

    Keys brought in by a merge (``<<: *anchor``) may be overridden, as YAML intends; only keys written
    explicitly twice in the same mapping are errors.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        self._check_unique_keys(node, "", set())
        return super().construct_document(node)

    def _check_unique_keys(self, node: yaml.Node, path: str, seen: set[int]) -> None:
        if id(node) in seen:  # an alias of a node already checked (or a recursive one)
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for index, child in enumerate(node.value):
                self._check_unique_keys(child, f"{path}[{index}]", seen)
            return
        if not isinstance(node, yaml.MappingNode):
            return
        lines: dict[Any, list[int]] = {}
        names: dict[Any, str] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if isinstance(key_node, yaml.ScalarNode):
                key: Any = self.construct_object(key_node)
                name = str(key)
                try:
                    hash(key)
                except TypeError:
                    key = (key_node.tag, key_node.value)
            else:
                key, name = ("complex", id(key_node)), "<complex key>"
            lines.setdefault(key, []).append(key_node.start_mark.line + 1)
            names[key] = name
            self._check_unique_keys(value_node, f"{path}.{name}" if path else name, seen)
        for key, found in lines.items():
            if len(found) > 1:
                raise DuplicateKeyError(f"{path}.{names[key]}" if path else names[key], found)


def _format_loc(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int) and parts:
            parts[-1] += f"[{item}]"
        else:
            parts.append(str(item))
    return ".".join(parts)


def _split_expected(expected: str) -> list[str]:
    """Pydantic's ``"'a', 'b' or 'c'"`` as ``["'a'", "'b'", "'c'"]``."""
    head, sep, last = expected.rpartition(" or ")
    return [*head.split(", "), last] if sep else [expected]


def _expected_for(error: dict[str, Any]) -> str:
    kind = error.get("type", "")
    ctx = error.get("ctx") or {}
    if kind == "literal_error":
        return f"one of {', '.join(_split_expected(str(ctx.get('expected', '?'))))}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        limit = next(iter(ctx.values())) if ctx else "?"
        return f"a number {op} {limit}"
    if kind == "missing":
        return "a value (the key is required)"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return kind.replace("_parsing", "").replace("_type", "")
    return str(error.get("msg", kind))


def format_validation_error(err: ValidationError, source: str) -> str:
    """Render a pydantic error as one line per problem: key path, expected value, given value, e.g.
    ``data.on_bad_sample: expected one of 'fail', 'quarantine'; given 'drop'``."""
    lines = [f"{source}: {err.error_count()} invalid parameter(s):"]
    for e in err.errors():
        loc = _format_loc(tuple(e["loc"]))
        given = e.get("input")
        if e.get("type") == "extra_forbidden":
            lines.append(f"  {loc}: unknown key (check the spelling; params.yaml in the repository lists every "
                         f"key); given {given!r}")
        elif e.get("type") in ("value_error", "assertion_error"):
            msg = str(e.get("msg", "")).removeprefix("Value error, ")
            shown = f"; given {given!r}" if loc and not isinstance(given, dict) else ""
            lines.append(f"  {loc or '<root>'}: {msg}{shown}")
        else:
            lines.append(f"  {loc}: expected {_expected_for(e)}; given {given!r}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into the key path and the YAML-parsed value."""
    if "=" not in text:
        raise ParamsError(f"override {text!r}: expected KEY.PATH=VALUE")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ParamsError(f"override {text!r}: empty key path")
    try:
        value = yaml.load(raw, Loader=UniqueKeyLoader) if raw.strip() else ""  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        raise ParamsError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return key.split("."), value


def apply_overrides(doc: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of ``doc`` with ``key.path=value`` overrides applied (validated later)."""
    out = copy.deepcopy(doc)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
                node[part] = child
            if not isinstance(child, dict):
                raise ParamsError(f"override {text!r}: {part!r} is a value, not a group")
            node = child
        node[path[-1]] = value
    return out


def validate_params(doc: dict[str, Any], source: str = "params") -> Params:
    """Validate a parsed document; raise ParamsError with a readable message."""
    try:
        return Params.model_validate(doc)
    except ValidationError as err:
        raise ParamsError(format_validation_error(err, source)) from None


def load_params(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read, override and validate ``params.yaml``.

    Args:
        path: the YAML file.
        overrides: ``key.path=value`` strings (values parsed as YAML), applied before validation.

    Raises:
        ParamsError: the file is missing or unreadable, is not UTF-8, is not YAML, repeats a key, or any value is
            invalid.
    """
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read the params file ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ParamsError(f"{path}: expected UTF-8 text; byte 0x{data[exc.start]:02x} at line {line} (byte offset "
                          f"{exc.start}) is not valid UTF-8: save the file as UTF-8") from None
    try:
        doc = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - UniqueKeyLoader is a SafeLoader
    except DuplicateKeyError as exc:
        raise ParamsError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level, given {type(doc).__name__}")
    source = str(path) + (f" (with overrides {list(overrides)})" if overrides else "")
    return validate_params(apply_overrides(doc, overrides), source)


def params_to_dict(params: BaseModel) -> dict[str, Any]:
    """A JSON/YAML-ready dict of a params model (paths as strings, tuples as lists)."""
    return params.model_dump(mode="json")
