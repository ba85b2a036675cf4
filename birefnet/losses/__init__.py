"""Losses of BiRefNet: one module per term and the composite (``BiRefNetLoss``) returning (total, parts)."""

from __future__ import annotations

from birefnet.losses.composite import (
    LOSS_PRESETS,
    MATTING_WEIGHTS,
    PAPER_WEIGHTS,
    REGION_WEIGHTS,
    BiRefNetLoss,
    loss_weights,
)
from birefnet.losses.terms import (
    BCELoss,
    ClassificationLoss,
    GradientLoss,
    IoULoss,
    MAELoss,
    MSELoss,
    SSIMLoss,
    ssim,
)

__all__ = [
    "LOSS_PRESETS",
    "MATTING_WEIGHTS",
    "PAPER_WEIGHTS",
    "REGION_WEIGHTS",
    "BCELoss",
    "BiRefNetLoss",
    "ClassificationLoss",
    "GradientLoss",
    "IoULoss",
    "MAELoss",
    "MSELoss",
    "SSIMLoss",
    "loss_weights",
    "ssim",
]
