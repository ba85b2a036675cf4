"""Prediction heads of BiRefNet (Zheng et al., CAAI AIR 2024).

* ``GradientHead``: the outward reference of one decoder stage: a 3x3 conv -> BN -> ReLU trunk, a 1x1
  gradient prediction and a 1x1 attention whose sigmoid multiplies the stage's features.
* ``ClassificationHead``: the auxiliary classification head (global average pool -> linear).

The gradient label those heads learn (``gradient_map``) lives in :mod:`birefnet.imaging`, shared with the data
pipeline that precomputes it.
"""

from __future__ import annotations

import torch
from torch import nn

#: Width of the gradient heads' trunk.
GRADIENT_CHANNELS = 16


class GradientHead(nn.Module):
    """Outward-reference head of one decoder stage.

    Args:
        in_channels: channels of the stage's decoder output.
        hidden_channels: trunk width (16 upstream).
    """

    def __init__(self, in_channels: int, hidden_channels: int = GRADIENT_CHANNELS) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, 3, padding=1),
            nn.BatchNorm2d(hidden_channels),
            nn.ReLU(inplace=True),
        )
        self.prediction = nn.Conv2d(hidden_channels, 1, 1)
        self.attention = nn.Conv2d(hidden_channels, 1, 1)

    def forward(self, features: torch.Tensor, predict: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend the stage features with the predicted gradient.

        Args:
            features: ``(B, C, h, w)`` decoder stage output.
            predict: also return the gradient prediction (training).

        Returns:
            ``(B, C, h, w)`` attended features and the ``(B, 1, h, w)`` gradient logits (or None).
        """
        trunk = self.trunk(features)
        prediction = self.prediction(trunk) if predict else None
        return features * torch.sigmoid(self.attention(trunk)), prediction


class ClassificationHead(nn.Module):
    """Global average pool -> linear classifier (the auxiliary classification head).

    Args:
        in_channels: channels of the deepest encoder features.
        num_classes: number of classes (219 on DIS5K-TR).
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, num_classes) logits."""
        return self.fc(features.mean(dim=(2, 3)))
