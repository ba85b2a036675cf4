"""birefnet-pipeline: BiRefNet (Zheng et al., "Bilateral Reference for High-Resolution Dichotomous Image
Segmentation", CAAI AIR 2024) as a reproducible training pipeline.

Importing the package does no I/O and imports no heavy dependency; ``load_model`` is resolved lazily.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_model"]


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from birefnet.models.io import load_model

        return load_model
    raise AttributeError(f"module 'birefnet' has no attribute {name!r}")
