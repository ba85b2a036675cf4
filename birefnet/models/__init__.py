"""BiRefNet model package (Zheng et al., "Bilateral Reference for High-Resolution Dichotomous Image
Segmentation", CAAI AIR 2024).

Public API: ``build_model(config)``, ``create_model(name, **kwargs)``, ``list_models()``, ``ModelConfig``,
``BiRefNet`` / ``BiRefNetOutput``, and ``save_model`` / ``load_model`` (``birefnet.models.io``).

The package stands alone: it imports torch, timm and safetensors, never the pipeline (``birefnet.config``,
pydantic, YAML, Ray, MLflow). Names are imported on first use, so ``birefnet.models.config`` (which
``birefnet.config`` reuses) loads without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from birefnet.models.birefnet import BiRefNet, BiRefNetOutput
    from birefnet.models.config import ModelConfig, ModelConfigError
    from birefnet.models.io import load_model, save_model
    from birefnet.models.registry import build_model, create_model, list_models, register_model

#: Public name -> the submodule defining it.
_EXPORTS = {
    "BiRefNet": "birefnet.models.birefnet",
    "BiRefNetOutput": "birefnet.models.birefnet",
    "ModelConfig": "birefnet.models.config",
    "ModelConfigError": "birefnet.models.config",
    "build_model": "birefnet.models.registry",
    "create_model": "birefnet.models.registry",
    "list_models": "birefnet.models.registry",
    "load_model": "birefnet.models.io",
    "register_model": "birefnet.models.registry",
    "save_model": "birefnet.models.io",
}

__all__ = [
    "BiRefNet",
    "BiRefNetOutput",
    "ModelConfig",
    "ModelConfigError",
    "build_model",
    "create_model",
    "list_models",
    "load_model",
    "register_model",
    "save_model",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
