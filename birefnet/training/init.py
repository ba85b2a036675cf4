"""``train.init_from``: start training from existing weights, with the model settings taken from the weights file.

Sources, told apart by their content rather than their extension: this package's ``.safetensors`` (from
``save_model`` or ``convert-upstream``; the ``model`` params are in its metadata), an upstream BiRefNet checkpoint
(a release ``.pth`` or a Hugging Face ``model.safetensors``, converted on the fly; its params are inferred from
the tensor shapes), or a registered MLflow model ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``.

The file decides the architecture. :func:`resolve_init_model_params` takes every ``model.*`` setting that shapes
the weights from the file and keeps the runtime settings (:data:`RUNTIME_KEYS`) from params. A ``model.*`` value
that the params file sets explicitly (pydantic's ``model_fields_set``) and that differs from the file's is refused
(:class:`InitParamsConflict`, a ``ParamsError``: exit 2) with key, params value and file value. DVC lists the
``model.*`` keys as train params, so ``params.yaml`` keeps its model block: a block equal to the file's, or one that
leaves keys out, fine-tunes without copying settings by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from birefnet.config import ModelParams, ParamsError

if TYPE_CHECKING:
    from birefnet.config import Params, TrackingParams

log = logging.getLogger("birefnet.train")

#: ``model.*`` keys that do not change the weights' layout: they may differ from the file's and come from params.
#: ``encoder_weights`` is never read when ``train.init_from`` is set (the file sets every weight).
RUNTIME_KEYS = ("deform_impl", "gradient_checkpointing", "encoder_weights", "drop_path_rate")


class InitWeightsError(ValueError):
    """The weights source is missing, unreadable or does not fit the model; the message names it and what failed."""


class InitParamsConflict(ParamsError):
    """Params set ``model.*`` values that differ from the ``train.init_from`` file's; the message lists them."""


@dataclass(frozen=True)
class InitSource:
    """What a ``train.init_from`` source holds.

    Attributes:
        source: as given in params.
        path: the local file (downloaded for ``models:/``).
        layout: ``"birefnet"`` (ours) or ``"upstream"`` (converted on the fly).
        params: the model params the weights were built with (embedded, or inferred from upstream shapes).
        alternatives: keys whose value the file cannot tell apart, with every value the weights fit (upstream's
            ``multiscale_input`` ``none`` and ``add`` have the same tensors).
    """

    source: str
    path: Path
    layout: str
    params: ModelParams
    alternatives: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)


@dataclass
class InitReport:
    """What matched between a weights source and the model."""

    source: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 10) -> str:
        parts = [f"{self.loaded} tensors loaded"]
        for label, keys in (("missing in the weights", self.missing), ("not in the model", self.unexpected),
                            ("shape mismatch", self.mismatched)):
            if keys:
                shown = ", ".join(keys[:limit]) + (f" ... (+{len(keys) - limit})" if len(keys) > limit else "")
                parts.append(f"{len(keys)} {label}: {shown}")
        return "; ".join(parts)


def _resolve_registered(uri: str, tracking_uri: str | None = None) -> Path:
    """Download a registered model's files and return the safetensors inside (see
    :func:`birefnet.tracking.download_registered_model`: resolved against ``tracking_uri`` when given)."""
    from birefnet.tracking import RegistryRequestError, TrackingUnavailableError, download_registered_model

    try:
        return download_registered_model(uri, tracking_uri)
    except (FileNotFoundError, RegistryRequestError) as exc:  # the message starts with the URI
        raise InitWeightsError(f"train.init_from {exc}") from None
    except TrackingUnavailableError as exc:
        raise InitWeightsError(f"train.init_from {uri}: {exc}") from None


def _local_path(source: str, tracking_uri: str | None) -> Path:
    if source.startswith("models:/"):
        return _resolve_registered(source, tracking_uri)
    path = Path(source)
    if not path.is_file():
        raise InitWeightsError(f"train.init_from: {path} not found (expected this package's .safetensors, an upstream "
                               "BiRefNet .pth or Hugging Face model.safetensors, or models:/NAME@ALIAS)")
    return path


def _init_error(source: str, path: Path, exc: Exception) -> InitWeightsError:
    """``exc`` for ``train.init_from``, naming the source once (messages that start with the file keep it)."""
    text = str(exc)
    if source == str(path):
        where = "" if text.startswith(source) else f" {source}"
    else:  # models:/ ... downloaded to path
        where = f" {source}" + ("" if text.startswith(str(path)) else f" ({path})")
    return InitWeightsError(f"train.init_from{where}: {text}")


def tracking_uri_for(tracking: TrackingParams) -> str:
    """The tracking (and registry) URI ``models:/`` sources resolve against, as the train stage uses it."""
    from birefnet.tracking import resolve_tracking_uri

    return resolve_tracking_uri(tracking)


def inspect_init_source(source: str, tracking_uri: str | None = None) -> InitSource:
    """Open a ``train.init_from`` source (header only where the format allows) and read its model params.

    Raises:
        InitWeightsError: missing, unreadable, not a BiRefNet checkpoint, or ours without embedded params.
    """
    from birefnet.models.convert import infer_model_params, read_checkpoint, resolve_config
    from birefnet.models.io import read_model_config

    path = _local_path(source, tracking_uri)
    try:
        checkpoint = read_checkpoint(path, shapes_only=True)
        layout = checkpoint.layout
        if layout == "birefnet":
            if checkpoint.container != "safetensors":
                raise ValueError("this package's keys in a torch.save file (a training checkpoint?): use the "
                                 "model.safetensors that training or convert-upstream writes")
            return InitSource(source, path, layout, ModelParams.from_config(read_model_config(path)))
        params = ModelParams.from_config(resolve_config(infer_model_params(checkpoint.state)))
    except ValueError as exc:  # includes ModelFileError and ParamsError from an unusable file
        raise _init_error(source, path, exc) from None
    alternatives = {"multiscale_input": ("none", "add")} if params.multiscale_input == "none" else {}
    return InitSource(source, path, layout, params, alternatives)


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return repr(value) if isinstance(value, str) else str(value)


def resolve_init_model_params(params: Params, *, announce: bool = True) -> ModelParams:
    """The model params to build when ``train.init_from`` is set: the file's, with params' runtime keys.

    Args:
        params: the run's params; ``params.model.model_fields_set`` tells which keys the params file set.
        announce: log which settings were taken from the file (the train stage does; workers need not repeat it).

    Returns:
        ``params.model`` unchanged without ``init_from``; otherwise the file's params with :data:`RUNTIME_KEYS`
        from ``params.model`` (``encoder_weights`` cleared: the file sets every weight).

    Raises:
        InitParamsConflict: explicit ``model.*`` values that differ from the file's (all listed).
        InitWeightsError: the source is missing or unusable.
    """
    source = params.train.init_from
    if not source:
        return params.model
    found = inspect_init_source(source, tracking_uri_for(params.tracking))
    explicit = params.model.model_fields_set
    chosen: dict[str, Any] = {}
    conflicts: list[str] = []
    for key in ModelParams.model_fields:
        if key in RUNTIME_KEYS or key not in explicit:
            continue
        mine, theirs = getattr(params.model, key), getattr(found.params, key)
        if mine == theirs:
            continue
        if mine in found.alternatives.get(key, ()):
            chosen[key] = mine
            continue
        conflicts.append(f"  model.{key}: params {_shown(mine)}, file {_shown(theirs)}")
    if conflicts:
        raise InitParamsConflict(
            f"train.init_from {source}: the weights file fixes the architecture, and params set "
            f"{len(conflicts)} model value(s) that differ from it:\n" + "\n".join(conflicts) + "\n"
            "  set these keys to the file's values or remove them from the params file's model block (only "
            f"{', '.join(RUNTIME_KEYS)} may differ)")
    runtime = {key: getattr(params.model, key) for key in RUNTIME_KEYS} | {"encoder_weights": None}
    resolved = ModelParams.model_validate({**found.params.model_dump(), **chosen, **runtime})
    if announce:
        taken = ", ".join(f"{k}={_shown(getattr(resolved, k))}" for k in ModelParams.model_fields
                          if k not in RUNTIME_KEYS)
        kept = ", ".join(f"{k}={_shown(getattr(resolved, k))}" for k in RUNTIME_KEYS if k != "encoder_weights")
        where = source if source == str(found.path) else f"{source} ({found.path})"
        log.info("model settings taken from %s (%s layout): %s; from params: %s", where, found.layout, taken, kept)
        if params.model.encoder_weights is not None:
            log.info("model.encoder_weights %s is not read: train.init_from sets every weight",
                     params.model.encoder_weights)
    return resolved


def with_init_model_params(params: Params, *, announce: bool = True) -> Params:
    """``params`` with its ``model`` group resolved by :func:`resolve_init_model_params` (unchanged without
    ``train.init_from``)."""
    if not params.train.init_from:
        return params
    return params.model_copy(update={"model": resolve_init_model_params(params, announce=announce)})


def read_state_dict(source: str, tracking_uri: str | None = None) -> dict[str, torch.Tensor]:
    """Load a state dict in our key layout from any supported source (upstream files are converted, float32)."""
    from birefnet.models.convert import convert_state_dict, read_checkpoint, to_float32

    path = _local_path(source, tracking_uri)
    try:
        checkpoint = read_checkpoint(path)
        if checkpoint.layout == "birefnet":
            return checkpoint.state
        return to_float32(convert_state_dict(checkpoint.state))
    except ValueError as exc:
        raise _init_error(source, path, exc) from None


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> InitReport:
    """Compare keys and shapes of ``state`` with ``model``'s."""
    own = model.state_dict()
    report = InitReport(source=source)
    report.missing = sorted(k for k in own if k not in state)
    report.unexpected = sorted(k for k in state if k not in own)
    report.mismatched = sorted(f"{k} (weights {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
                               for k in own if k in state and state[k].shape != own[k].shape)
    report.loaded = sum(1 for k in own if k in state and state[k].shape == own[k].shape)
    return report


def initialize_weights(model: torch.nn.Module, source: str, tracking_uri: str | None = None) -> InitReport:
    """Load ``source`` into ``model`` strictly.

    Raises:
        InitWeightsError: any key missing, unexpected or of another shape (all listed).
    """
    state = read_state_dict(source, tracking_uri)
    report = check_state_dict(model, state, source)
    if not report.ok:
        raise InitWeightsError(f"train.init_from {source} does not match the model built from params.model: "
                               f"{report.summary()}")
    model.load_state_dict(state, strict=True)
    return report
