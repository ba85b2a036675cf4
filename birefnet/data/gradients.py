"""Outward-reference gradient labels (BiRefNet, Sec. 3.3; upstream-spec §3.4): their storage.

The label is the 5x5 Laplacian (ones with centre -24, divided by the sum of absolute values, 48; reflect-101
border) of the channel mean of the ImageNet-normalised input image at the training resolution. It is computed in
:mod:`birefnet.imaging`, which the model shares, and re-exported here with the ImageNet constants. During
training it is multiplied by the stage's upsampled prediction; only the image part is precomputed here.

Storage: 16-bit PNG, ``value = uint16 / 8192 - 4`` (a step of 1.2e-4 over a range of +-4; the label's
magnitude is below 2.3 for any 8-bit image), so a decoded label equals the on-the-fly one to about 6e-5.
"""

from __future__ import annotations

import numpy as np

from birefnet.imaging import IMAGENET_MEAN, IMAGENET_STD, gradient_label, laplacian_kernel, normalized_gray

__all__ = [
    "GRADIENT_OFFSET",
    "GRADIENT_SCALE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "decode_gradient",
    "encode_gradient",
    "gradient_label",
    "gradient_label_torch",
    "laplacian_kernel",
    "normalized_gray",
]

GRADIENT_SCALE = 8192.0
GRADIENT_OFFSET = 32768


def encode_gradient(label: np.ndarray) -> np.ndarray:
    """(H, W) float32 label -> (H, W) uint16 for a 16-bit PNG."""
    q = np.rint(label.astype(np.float64) * GRADIENT_SCALE) + GRADIENT_OFFSET
    if q.min(initial=GRADIENT_OFFSET) < 0 or q.max(initial=GRADIENT_OFFSET) > 65535:
        raise ValueError(f"gradient label out of the storable range +-4: min {label.min()}, max {label.max()}")
    return q.astype(np.uint16)


def decode_gradient(stored: np.ndarray) -> np.ndarray:
    """(H, W) uint16 from a 16-bit PNG -> (H, W) float32 label."""
    if stored.dtype != np.uint16:
        raise ValueError(f"gradient PNG must be 16-bit, got {stored.dtype}")
    return ((stored.astype(np.float32) - GRADIENT_OFFSET) / np.float32(GRADIENT_SCALE)).astype(np.float32)


def gradient_label_torch(images):  # noqa: ANN001, ANN201 - torch is imported lazily
    """On-the-fly gradient labels for a normalised batch: exactly what the model computes itself
    (:func:`birefnet.imaging.gradient_map`), so precomputed labels are checked against the real thing.

    Args:
        images: (B, 3, H, W) float tensor, ImageNet-normalised.

    Returns:
        (B, 1, H, W) tensor, the same Laplacian as :func:`gradient_label`.
    """
    from birefnet.imaging import gradient_map

    return gradient_map(images.float())
