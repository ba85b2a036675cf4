"""Registry of BiRefNet variants, timm style: ``register_model``, ``create_model``, ``list_models``.

Variants are registered in ``birefnet/models/birefnet.py`` (the first ``create_model``/``list_models`` call, or
importing that module, fills the registry; nothing else happens at import). ``build_model(config)`` is the one
entry point that turns a :class:`ModelConfig` (or the params' ``model`` group) into a module; every variant
builds through it, so every model carries its config as ``model.config`` (as timm models carry
``pretrained_cfg``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from birefnet.models.birefnet import BiRefNet
    from birefnet.models.config import ModelConfig, SupportsToConfig

_ENTRYPOINTS: dict[str, Callable[..., Any]] = {}
F = TypeVar("F", bound=Callable[..., Any])


def register_model(fn: F) -> F:
    """Register a variant constructor under its function name."""
    name = fn.__name__
    if name in _ENTRYPOINTS and _ENTRYPOINTS[name] is not fn:
        raise ValueError(f"model {name!r} is already registered")
    _ENTRYPOINTS[name] = fn
    return fn


def _ensure_registered() -> None:
    import birefnet.models.birefnet  # noqa: F401  (registers the variants)


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered variants matching a shell-style pattern."""
    _ensure_registered()
    return sorted(n for n in _ENTRYPOINTS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **kwargs: Any) -> BiRefNet:
    """Build a registered variant; keyword arguments override its :class:`ModelConfig` fields.

    Returns:
        The model, carrying the resolved config as ``model.config``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
        ModelConfigError: invalid keyword arguments.
    """
    _ensure_registered()
    if name not in _ENTRYPOINTS:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(sorted(_ENTRYPOINTS))}")
    return _ENTRYPOINTS[name](**kwargs)


def build_model(config: ModelConfig | SupportsToConfig | Mapping[str, Any]) -> BiRefNet:
    """Build BiRefNet from its config (the only place that reads model config).

    Args:
        config: a :class:`ModelConfig`, the params' ``model`` group (anything with ``to_config()``) or a mapping
            of ``ModelConfig`` fields.

    Returns:
        The model (train mode, random or ``encoder_weights`` init), carrying the config as ``model.config``.
    """
    from birefnet.models.birefnet import BiRefNet
    from birefnet.models.config import as_model_config

    resolved = as_model_config(config)
    model = BiRefNet(**resolved.to_dict())
    model.config = resolved
    return model
