"""Pre- and post-processing shared by ``birefnet predict``, the served model and the ONNX export.

BiRefNet (Zheng et al., "Bilateral Reference for High-Resolution Dichotomous Image Segmentation", CAAI AIR 2024)
predicts at a fixed working resolution. As upstream's ``inference.py``: the image is resized to it (OpenCV
bilinear, as our loader does for training and evaluation) and ImageNet-normalised; the logits go through a
sigmoid, the probability map is resized back to the original size with bilinear ``align_corners=True`` and kept
x255 truncated to 8 bits. The cut-out is the original RGB (or its estimated foreground colours, see
:mod:`birefnet.inference.foreground`) with the mask as alpha.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

#: Encoder output stride: model resolutions are multiples of it.
SIZE_MULTIPLE = 32


def check_size(size: Sequence[int], min_side: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """Validate a (width, height) model resolution (the decoder's patch grid needs multiples of 32).

    Args:
        size: (width, height).
        min_side: smallest side the model can run at (see :func:`min_model_side`).

    Raises:
        ValueError: not two positive multiples of 32, or a side under ``min_side``.
    """
    if len(size) != 2 or any(int(s) <= 0 or int(s) % SIZE_MULTIPLE for s in size):
        raise ValueError(f"size must be two positive multiples of {SIZE_MULTIPLE} (width height), given {list(size)}")
    if min(int(s) for s in size) < min_side:
        raise ValueError(f"size {int(size[0])}x{int(size[1])} is too small for this model: each side must be at "
                         f"least {min_side} (and a multiple of {SIZE_MULTIPLE})")
    return int(size[0]), int(size[1])


def min_model_side(model: torch.nn.Module) -> int:
    """Smallest side (pixels) ``model`` can run at.

    The encoder reduces the input 32 times; with ``multiscale_input`` ``cat`` or ``add`` it also reads the
    half-size image, whose deepest map would be under one pixel at side 32 (convolutions then fail inside the
    encoder), so such models need 64. Checked for convnext, ResNet, PVT v2 and Swin encoders.
    """
    multiscale = getattr(model, "multiscale_input", "none")
    return 2 * SIZE_MULTIPLE if multiscale in ("cat", "add") else SIZE_MULTIPLE


def preprocess(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Resize to the model resolution and ImageNet-normalise.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        size: model resolution (width, height).

    Returns:
        ``(3, size[1], size[0])`` float32.
    """
    import cv2
    import torch

    from birefnet.imaging import IMAGENET_MEAN, IMAGENET_STD

    if image.shape[1] != size[0] or image.shape[0] != size[1]:
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32) * 255.0
    scale = 1.0 / (np.asarray(IMAGENET_STD, dtype=np.float32) * 255.0)
    normalised = (image.astype(np.float32) - mean) * scale
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))


def postprocess(logits: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Logits at model resolution -> 8-bit masks at each original size (upstream's order and rounding).

    Args:
        logits: ``(B, 1, h, w)``.
        sizes: per sample, the original (height, width).

    Returns:
        B arrays ``(H_i, W_i)`` uint8: sigmoid, bilinear ``align_corners=True`` resize, x255 truncated.
    """
    import torch
    import torch.nn.functional as F

    probs = torch.sigmoid(logits.float())
    masks = []
    for prob, (height, width) in zip(probs, sizes, strict=True):
        prob = prob[None]
        if tuple(prob.shape[-2:]) != (height, width):
            prob = F.interpolate(prob, size=(height, width), mode="bilinear", align_corners=True)
        masks.append((prob[0, 0].clamp_(0, 1) * 255).to(torch.uint8).cpu().numpy())
    return masks


def make_cutout(image: np.ndarray, mask: np.ndarray, refine_foreground: bool = False) -> np.ndarray:
    """RGBA cut-out: the image's colours (or their estimated foreground colours) with the mask as alpha.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        mask: ``(H, W)`` uint8.
        refine_foreground: replace the colours by :func:`birefnet.inference.foreground.estimate_foreground` under
            the mask, removing the background's tint from soft edges (pixels with alpha 255 keep their colour).

    Returns:
        ``(H, W, 4)`` uint8.
    """
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    if refine_foreground:
        from birefnet.inference.foreground import estimate_foreground

        image = estimate_foreground(image, mask)
    return np.concatenate((image, mask[..., None]), axis=2)
