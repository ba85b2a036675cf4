"""Image constants and the outward-reference gradient label, shared by the model and the data pipeline.

BiRefNet (Zheng et al., "Bilateral Reference for High-Resolution Dichotomous Image Segmentation", CAAI AIR 2024,
Sec. 3.3) supervises its outward reference with the gradient of the input image: the 5x5 Laplacian (ones with
centre -24, divided by the sum of absolute values, 48; reflect-101 border, upstream's kornia call) of the channel
mean of the ImageNet-normalised image. The model computes it on the fly in torch (:func:`gradient_map`); the
``gradients`` stage precomputes it in numpy/OpenCV (:func:`gradient_label`). Both live here so they are the same
maths by construction.

A leaf module: it imports nothing from ``birefnet``, numpy at import, and torch and OpenCV only when their
functions run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

#: ImageNet channel means and standard deviations (RGB, for images scaled to [0, 1]): the encoders' input
#: normalisation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Side of the gradient label's Laplacian kernel.
LAPLACIAN_KERNEL_SIZE = 5


def laplacian_kernel(size: int = LAPLACIAN_KERNEL_SIZE) -> np.ndarray:
    """The normalised Laplacian: ones with centre ``1 - size**2``, divided by the sum of absolute values.

    Returns:
        ``(size, size)`` float32 summing to 0, with absolute values summing to 1.
    """
    kernel = np.ones((size, size), dtype=np.float64)
    kernel[size // 2, size // 2] = 1 - size * size
    return (kernel / np.abs(kernel).sum()).astype(np.float32)


def laplacian_kernel_torch(size: int = LAPLACIAN_KERNEL_SIZE) -> torch.Tensor:
    """:func:`laplacian_kernel` built with torch ops (float32, CPU), as the model builds it inside ``forward``."""
    import torch

    kernel = torch.ones(size, size)
    kernel[size // 2, size // 2] = 1 - size * size
    return kernel / kernel.abs().sum()


def normalized_gray(image: np.ndarray) -> np.ndarray:
    """Channel mean of the ImageNet-normalised image.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.

    Returns:
        ``(H, W)`` float32.
    """
    scaled = image.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    return ((scaled - mean) / std).mean(axis=2, dtype=np.float32)


def gradient_label(image: np.ndarray) -> np.ndarray:
    """Gradient label of an image already resized to the training resolution (numpy/OpenCV).

    Args:
        image: ``(H, W, 3)`` uint8 RGB.

    Returns:
        ``(H, W)`` float32 Laplacian (reflect-101 border) of the normalised gray image.
    """
    import cv2

    gray = normalized_gray(image)
    return cv2.filter2D(gray, cv2.CV_32F, laplacian_kernel(LAPLACIAN_KERNEL_SIZE), borderType=cv2.BORDER_REFLECT_101)


def gradient_map(image: torch.Tensor, kernel_size: int = LAPLACIAN_KERNEL_SIZE) -> torch.Tensor:
    """Gradient-label base of the outward reference (torch; what the model computes itself).

    Args:
        image: ``(B, 3, H, W)`` ImageNet-normalised image.

    Returns:
        ``(B, 1, H, W)`` normalised Laplacian (reflect padding) of the channel mean.
    """
    import torch.nn.functional as F  # noqa: N812 - torch's own alias

    gray = image.mean(dim=1, keepdim=True)
    kernel = (
        laplacian_kernel_torch(kernel_size)
        .to(device=image.device, dtype=gray.dtype)
        .view(1, 1, kernel_size, kernel_size)
    )
    pad = kernel_size // 2
    return F.conv2d(F.pad(gray, (pad, pad, pad, pad), mode="reflect"), kernel)


def predictions_to_uint8(logits: torch.Tensor) -> np.ndarray:
    """(B, 1, H, W) logits -> (B, H, W) uint8 probability maps (x255, truncated as upstream saves them)."""
    import torch

    probs = torch.sigmoid(logits.float()).clamp_(0, 1)
    return (probs[:, 0] * 255).to(torch.uint8).cpu().numpy()
