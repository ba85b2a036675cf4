"""The model's own configuration: :class:`ModelConfig`, BiRefNet's architecture switches.

BiRefNet (Zheng et al., "Bilateral Reference for High-Resolution Dichotomous Image Segmentation", CAAI AIR 2024)
makes every paper component a switch, so the paper's ablations are one setting away. ``ModelConfig`` is a frozen
dataclass that validates itself, so the model package needs neither pydantic nor YAML: ``build_model(config)``
builds it, the model carries it as ``model.config`` (as timm models carry ``pretrained_cfg``), and
``save_model`` embeds it in every file so ``load_model`` rebuilds the architecture from the file alone.

The pipeline's ``params.yaml`` schema (``birefnet.config.ModelParams``) is generated from these fields: their
types, defaults, descriptions and limits (the ``ge``/``gt``/``le``/``lt``/``min_length`` entries of each
field's metadata), and it calls :func:`check_encoder_name` and :func:`check_consistency`, so both reject the
same values with the same messages.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import operator
import os
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, Union, get_args, get_origin, get_type_hints

#: Field metadata keys that bound a value (the names pydantic's ``Field`` uses).
LIMIT_KEYS = ("ge", "gt", "le", "lt", "min_length")


class ModelConfigError(ValueError):
    """An invalid model configuration; the message names the key, what was expected and what was given."""


def _field(default: Any, description: str, **limits: Any) -> Any:
    unknown = set(limits) - set(LIMIT_KEYS)
    if unknown:
        raise TypeError(f"unknown field limit(s) {sorted(unknown)}; expected any of {list(LIMIT_KEYS)}")
    return dataclasses.field(default=default, metadata={"description": description, **limits})


@dataclass(frozen=True)
class ModelConfig:
    """BiRefNet architecture switches. Defaults equal the published general checkpoint (swin_v1_l).

    Argument names equal ``BiRefNet``'s. Switches that change the state-dict layout are embedded in every saved
    file, so ``load_model`` rebuilds from the file. Invalid values raise :class:`ModelConfigError`.
    """

    encoder: str = _field(
        "swin_v1_l",
        "swin_v1_t | swin_v1_s | swin_v1_b | swin_v1_l (upstream's Swin, built with timm) or any timm model name "
        "with stride-4/8/16/32 features (e.g. pvt_v2_b0, convnext_atto)",
        min_length=1,
    )
    encoder_weights: Path | None = _field(
        None, "local file with ImageNet weights for the encoder; None = random init (never downloads)"
    )
    drop_path_rate: float | None = _field(
        None, "encoder stochastic depth; None = upstream's value (0.2 Swin, 0.1 other)", ge=0.0, lt=1.0
    )
    multiscale_input: Literal["cat", "add", "none"] = _field(
        "cat", "image pyramid input: the encoder also reads the half-size image (cat doubles channels)"
    )
    context_levels: int = _field(3, "shallow encoder levels fused into the deepest one", ge=0, le=3)
    squeeze_block: Literal["basic", "residual", "none"] = _field(
        "basic", "block that maps the fused deepest features back to the encoder width"
    )
    squeeze_depth: int = _field(1, "number of squeeze blocks", ge=1, le=4)
    decoder_block: Literal["basic", "residual", "vanilla"] = _field(
        "basic",
        "basic | residual (both carry the attention) | vanilla: the ResNet basic block the paper's Table 1 "
        "baseline decodes with, before the reconstruction block replaces it (attention none)",
    )
    attention: Literal["none", "aspp", "aspp_deformable"] = _field(
        "aspp_deformable", "attention inside every decoder block (aspp_deformable = reconstruction block)"
    )
    attention_strides: tuple[Literal[4, 8, 16, 32], ...] = _field(
        (4, 8, 16, 32),
        "strides of the blocks that get the attention: decoder blocks at strides 32, 16, 8 and 4; the squeeze "
        "blocks work at 32. Upstream: every block. The ASPP at stride 4 is the costly one; at 32 and 16 it adds "
        "global context for a few percent of a step",
    )
    decoder_inter_channels: Literal["fixed", "adaptive"] = _field(
        "fixed", "decoder block inner width: fixed = 64, adaptive = in_channels // 4"
    )
    inward_reference: bool = _field(True, "stack image patches into every decoder stage")
    inward_reference_mode: Literal["split", "resize"] = _field(
        "split", "split: full-resolution patches stacked on channels; resize: the resized image"
    )
    outward_reference: bool = _field(True, "gradient heads and gradient attention (needs stage heads)")
    multistage_supervision: bool = _field(True, "1-channel side outputs at strides 32, 16 and 8")
    auxiliary_classification: bool = _field(False, "class head on the deepest features (CE term)")
    num_classes: int = _field(219, "classes of the auxiliary head (219 on DIS5K-TR)", ge=2)
    deform_impl: Literal["torchvision", "sampling", "auto"] = _field(
        "auto",
        "deformable convolution kernel: torchvision.ops.deform_conv2d, grid_sample + matmul, or the faster one "
        "for the input's device (same parameters either way)",
    )
    gradient_checkpointing: bool = _field(False, "recompute encoder stages and decoder blocks in backward")

    def __post_init__(self) -> None:
        types_by_name = field_types()
        for spec in dataclasses.fields(self):
            value = _checked(spec.name, types_by_name[spec.name], getattr(self, spec.name))
            _check_limits(spec.name, value, spec.metadata)
            object.__setattr__(self, spec.name, value)  # the normalised value (list -> tuple, str -> Path)
        try:
            check_encoder_name(self.encoder)
            check_consistency(self)
        except ValueError as exc:
            raise ModelConfigError(str(exc)) from None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """Build from a mapping of field names (e.g. the JSON a model file embeds).

        Raises:
            ModelConfigError: an unknown key (all named) or an invalid value.
        """
        known = {spec.name for spec in dataclasses.fields(cls)}
        unknown = sorted(str(key) for key in values if key not in known)
        if unknown:
            raise ModelConfigError(f"unknown model key(s) {unknown}; expected any of {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Every field by name, values as they are (``Path``, tuples): the keyword arguments of ``BiRefNet``."""
        return {spec.name: getattr(self, spec.name) for spec in dataclasses.fields(self)}

    def to_json(self) -> str:
        """Compact JSON of every field in declaration order (paths as strings, tuples as lists)."""
        values = {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
                  for k, v in self.to_dict().items()}
        return json.dumps(values, separators=(",", ":"), ensure_ascii=False)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes`` applied and validated.

        Raises:
            ModelConfigError: an unknown key or an invalid value.
        """
        return type(self).from_dict({**self.to_dict(), **changes})


class SupportsToConfig(Protocol):
    """Anything that turns into a :class:`ModelConfig`, e.g. the params' ``model`` group."""

    def to_config(self) -> ModelConfig: ...


def as_model_config(value: ModelConfig | SupportsToConfig | Mapping[str, Any]) -> ModelConfig:
    """A :class:`ModelConfig` from itself, an object with ``to_config()`` or a mapping of its fields.

    Raises:
        TypeError: none of these.
        ModelConfigError: invalid fields.
    """
    if isinstance(value, ModelConfig):
        return value
    to_config = getattr(value, "to_config", None)
    if callable(to_config):
        return to_config()
    if isinstance(value, Mapping):
        return ModelConfig.from_dict(value)
    raise TypeError(f"expected a ModelConfig, an object with to_config() (params.model) or a mapping of model "
                    f"fields; given {type(value).__name__}")


@functools.cache
def field_types() -> dict[str, Any]:
    """The resolved type of every :class:`ModelConfig` field (``Literal`` choices included)."""
    return get_type_hints(ModelConfig)


def check_encoder_name(name: str) -> str:
    """Return ``name``; raise ValueError when it has spaces (a timm or Swin model name never has)."""
    if name.strip() != name or " " in name:
        raise ValueError(f"encoder must be a model name without spaces, given {name!r}")
    return name


def check_consistency(config: Any) -> None:
    """Reject switch combinations that build no valid model.

    Args:
        config: a :class:`ModelConfig` or anything with its attributes (the params' ``model`` group).

    Raises:
        ValueError: the first inconsistency, naming the keys to change.
    """
    if config.outward_reference and not config.multistage_supervision:
        raise ValueError(
            "outward_reference needs multistage_supervision (its gradient labels are masked by the stage "
            "predictions); set both true or outward_reference false"
        )
    if config.decoder_block == "vanilla" and config.attention != "none" and config.attention_strides:
        raise ValueError(
            f"decoder_block 'vanilla' (the ablation baseline's plain residual block) has no attention, but "
            f"attention is {config.attention!r} at strides {list(config.attention_strides)}; set attention none"
        )
    if len(set(config.attention_strides)) != len(config.attention_strides):
        raise ValueError(f"attention_strides lists a stride twice: {list(config.attention_strides)}")
    if config.squeeze_block == "none" and config.context_levels > 0:
        raise ValueError(
            f"squeeze_block 'none' needs context_levels 0 (given {config.context_levels}): the squeeze block maps "
            "the fused context features back to the encoder width"
        )


def _invalid(name: str, expected: str, given: Any) -> ModelConfigError:
    return ModelConfigError(f"{name}: expected {expected}; given {given!r}")


def _checked(name: str, annotation: Any, value: Any) -> Any:
    """``value`` checked against a field type (the few forms ``ModelConfig`` uses) and normalised."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = get_args(annotation)
        if value is None and type(None) in options:
            return None
        (inner,) = [option for option in options if option is not type(None)]
        return _checked(name, inner, value)
    if origin is Literal:
        choices = get_args(annotation)
        if isinstance(value, bool) or value not in choices:
            raise _invalid(name, f"one of {', '.join(repr(c) for c in choices)}", value)
        return value
    if origin is tuple:
        item_type = get_args(annotation)[0]
        if isinstance(value, str | bytes) or not isinstance(value, tuple | list):
            raise _invalid(name, "a list", value)
        return tuple(_checked(f"{name}[{index}]", item_type, item) for index, item in enumerate(value))
    if annotation is bool:
        if not isinstance(value, bool):
            raise _invalid(name, "true or false", value)
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _invalid(name, "an integer", value)
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _invalid(name, "a number", value)
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise _invalid(name, "a string", value)
        return value
    if annotation is Path:
        if not isinstance(value, str | os.PathLike):
            raise _invalid(name, "a path", value)
        return Path(value)
    raise TypeError(f"ModelConfig.{name}: unsupported field type {annotation!r}")


def _check_limits(name: str, value: Any, limits: Mapping[str, Any]) -> None:
    if value is None:
        return
    if "min_length" in limits and len(value) < limits["min_length"]:
        raise _invalid(name, f"at least {limits['min_length']} character(s)", value)
    for key, holds, symbol in (("ge", operator.ge, ">="), ("gt", operator.gt, ">"),
                               ("le", operator.le, "<="), ("lt", operator.lt, "<")):
        if key in limits and not holds(value, limits[key]):
            raise _invalid(name, f"a number {symbol} {limits[key]}", value)
