"""Losses of BiRefNet: one module per term and the composite (``BiRefNetLoss``) returning (total, parts)."""

from __future__ import annotations

from birefnet.losses.composite import BiRefNetLoss
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
    "BCELoss",
    "BiRefNetLoss",
    "ClassificationLoss",
    "GradientLoss",
    "IoULoss",
    "MAELoss",
    "MSELoss",
    "SSIMLoss",
    "ssim",
]
