"""Registry of BiRefNet variants, timm style: ``register_model``, ``create_model``, ``list_models``.

Variants are registered in ``birefnet/models/birefnet.py`` (importing ``birefnet.models`` fills the
registry; nothing else happens at import). ``build_model(params)`` is the one entry point that turns the
``model`` params group into a module.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from birefnet.config import ModelParams
    from birefnet.models.birefnet import BiRefNet

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
    """Build a registered variant; keyword arguments override its ``BiRefNet`` arguments.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    _ensure_registered()
    if name not in _ENTRYPOINTS:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(sorted(_ENTRYPOINTS))}")
    return _ENTRYPOINTS[name](**kwargs)


def build_model(params: ModelParams) -> BiRefNet:
    """Build BiRefNet from the ``model`` params group (the only place that reads model config)."""
    from birefnet.models.birefnet import BiRefNet

    return BiRefNet(**params.model_dump())
