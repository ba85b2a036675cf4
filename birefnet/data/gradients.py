"""Outward-reference gradient labels (BiRefNet, Sec. 3.3; upstream-spec §3.4).

The label is the 5x5 Laplacian (ones with centre -24, divided by the sum of absolute values, 48; reflect-101
border) of the channel mean of the ImageNet-normalised input image at the training resolution. During
training it is multiplied by the stage's upsampled prediction; only the image part is precomputed here.

Storage: 16-bit PNG, ``value = uint16 / 8192 - 4`` (a step of 1.2e-4 over a range of +-4; the label's
magnitude is below 2.3 for any 8-bit image), so a decoded label equals the on-the-fly one to about 6e-5.
"""

from __future__ import annotations

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRADIENT_SCALE = 8192.0
GRADIENT_OFFSET = 32768


def laplacian_kernel(size: int = 5) -> np.ndarray:
    """The normalised Laplacian kernel: (size, size) float32 summing to 0 with |sum| of entries 1."""
    k = np.ones((size, size), dtype=np.float64)
    k[size // 2, size // 2] = 1 - size * size
    return (k / np.abs(k).sum()).astype(np.float32)


def normalized_gray(image: np.ndarray) -> np.ndarray:
    """Channel mean of the ImageNet-normalised image.

    Args:
        image: (H, W, 3) uint8 RGB.

    Returns:
        (H, W) float32.
    """
    x = image.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    return ((x - mean) / std).mean(axis=2, dtype=np.float32)


def gradient_label(image: np.ndarray) -> np.ndarray:
    """Gradient label of an image already resized to the training resolution.

    Args:
        image: (H, W, 3) uint8 RGB.

    Returns:
        (H, W) float32 Laplacian of the normalised gray image.
    """
    import cv2

    gray = normalized_gray(image)
    return cv2.filter2D(gray, cv2.CV_32F, laplacian_kernel(5), borderType=cv2.BORDER_REFLECT_101)


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
    (:func:`birefnet.models.heads.gradient_map`), so precomputed labels are checked against the real thing.

    Args:
        images: (B, 3, H, W) float tensor, ImageNet-normalised.

    Returns:
        (B, 1, H, W) tensor, the same Laplacian as :func:`gradient_label`.
    """
    from birefnet.models.heads import gradient_map

    return gradient_map(images.float())
