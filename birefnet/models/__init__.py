"""BiRefNet model package (Zheng et al., "Bilateral Reference for High-Resolution Dichotomous Image
Segmentation", CAAI AIR 2024).

Public API: ``build_model(params.model)``, ``create_model(name, **kwargs)``, ``list_models()``,
``BiRefNet`` / ``BiRefNetOutput``, and ``save_model`` / ``load_model`` (``birefnet.models.io``).
"""

from __future__ import annotations

from birefnet.models.birefnet import BiRefNet, BiRefNetOutput
from birefnet.models.io import load_model, save_model
from birefnet.models.registry import build_model, create_model, list_models, register_model

__all__ = [
    "BiRefNet",
    "BiRefNetOutput",
    "build_model",
    "create_model",
    "list_models",
    "load_model",
    "register_model",
    "save_model",
]
