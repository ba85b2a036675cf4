"""Foreground colour estimation for soft cut-outs (``birefnet predict --refine-foreground``).

A pixel of a soft edge (hair, fur, motion blur) is a mix ``I = alpha * F + (1 - alpha) * B`` of the object's colour
``F`` and the background ``B``. A cut-out that keeps ``I`` as its colour carries the old background into the
transparent edge (a halo on any new background). This module estimates ``F`` with blur fusion (Forte & Pitie,
"Approximate Fast Foreground Colour Estimation", ICIP 2021), the estimator upstream BiRefNet applies to its
cut-outs; written here from the paper's equations.

One level with a box filter ``blur`` of side ``k`` takes the current estimates ``F`` and ``B``::

    F_blur = blur(F * alpha) / blur(alpha)                   # local mean colour of the foreground
    B_blur = blur(B * (1 - alpha)) / blur(1 - alpha)         # local mean colour of the background
    F'     = F_blur + alpha * (I - alpha * F_blur - (1 - alpha) * B_blur)

(the correction term moves ``F_blur`` along the compositing residual, weighted by alpha; ``F'`` is clipped to
[0, 1]). The first level starts from ``F = B = I`` with a large box (local means over a wide area); the second
refines with a small box from the first level's ``F'`` and ``B_blur``. Box filters cost the same at any size, so the
estimator is linear in the pixel count. Where alpha is 1 the correction gives back ``I`` exactly; where it is 0
the colour is the nearby foreground's mean (invisible in a cut-out, but it keeps resampled edges clean).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

#: Box sides of the two levels: wide local means first, then a fine pass (Forte & Pitie use 90 and 6; odd sides
#: keep each box centred on its pixel).
DEFAULT_BOX_SIZES: tuple[int, ...] = (91, 7)
#: Guards the divisions by the blurred alpha (and by its complement) where a box holds no foreground (background).
_EPS = 1e-5


def _unit_image(image: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 or float in [0, 1] -> float32 in [0, 1]."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) * np.float32(1 / 255)
    if np.issubdtype(image.dtype, np.floating):
        return np.clip(image, 0.0, 1.0).astype(np.float32)
    raise ValueError(f"image must be uint8 or float in [0, 1], given dtype {image.dtype}")


def _unit_alpha(alpha: np.ndarray) -> np.ndarray:
    """``(H, W)`` / ``(H, W, 1)`` uint8, bool or float in [0, 1] -> float32 ``(H, W, 1)`` in [0, 1]."""
    if alpha.ndim == 3 and alpha.shape[2] == 1:
        alpha = alpha[..., 0]
    if alpha.ndim != 2:
        raise ValueError(f"alpha must be (H, W) or (H, W, 1), given shape {alpha.shape}")
    if alpha.dtype == np.uint8:
        out = alpha.astype(np.float32) * np.float32(1 / 255)
    elif alpha.dtype == bool:
        out = alpha.astype(np.float32)
    elif np.issubdtype(alpha.dtype, np.floating):
        out = np.clip(alpha, 0.0, 1.0).astype(np.float32)
    else:
        raise ValueError(f"alpha must be uint8, bool or float in [0, 1], given dtype {alpha.dtype}")
    return out[..., None]


def _box(values: np.ndarray, size: int) -> np.ndarray:
    """Mean over a ``size`` x ``size`` box (reflected borders); keeps ``(H, W, C)`` for C >= 1."""
    out = cv2.blur(values, (size, size))
    return out[..., None] if out.ndim == 2 else out


def blur_fusion_level(image: np.ndarray, foreground: np.ndarray, background: np.ndarray, alpha: np.ndarray,
                      box_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One blur-fusion level (see the module docstring).

    Args:
        image: ``(H, W, 3)`` float32 composite ``I`` in [0, 1].
        foreground: ``(H, W, 3)`` float32 current foreground estimate.
        background: ``(H, W, 3)`` float32 current background estimate.
        alpha: ``(H, W, 1)`` float32 alpha in [0, 1].
        box_size: side of the box filter (pixels).

    Returns:
        ``(F', B_blur)``: the refined foreground, clipped to [0, 1], and the local background means, both
        ``(H, W, 3)`` float32.
    """
    blurred_alpha = _box(alpha, box_size)
    foreground_mean = _box(foreground * alpha, box_size) / (blurred_alpha + _EPS)
    background_mean = _box(background * (1 - alpha), box_size) / ((1 - blurred_alpha) + _EPS)
    residual = image - alpha * foreground_mean - (1 - alpha) * background_mean
    refined = foreground_mean + alpha * residual
    return np.clip(refined, 0.0, 1.0, out=refined), background_mean


def estimate_foreground(image: np.ndarray, alpha: np.ndarray,
                        box_sizes: Sequence[int] = DEFAULT_BOX_SIZES) -> np.ndarray:
    """Estimate the foreground colours of ``image`` under ``alpha`` by multi-level blur fusion.

    Args:
        image: ``(H, W, 3)`` RGB, uint8 or float in [0, 1].
        alpha: ``(H, W)`` or ``(H, W, 1)`` alpha (the predicted mask), uint8, bool or float in [0, 1].
        box_sizes: box sides of the levels, applied in order (large first); each at least 1.

    Returns:
        ``(H, W, 3)`` foreground colours in the dtype of ``image`` (uint8 rounded, float as float32). Pixels with
        alpha 1 keep the image's colour.

    Raises:
        ValueError: shapes that do not match, unsupported dtypes, or no or non-positive box sizes.
    """
    image = np.asarray(image)
    alpha = np.asarray(alpha)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), given shape {image.shape}")
    if alpha.shape[:2] != image.shape[:2]:
        raise ValueError(f"alpha {alpha.shape[:2]} and image {image.shape[:2]} differ in size")
    sizes = [int(s) for s in box_sizes]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"box_sizes must be one or more positive sides, given {list(box_sizes)}")
    composite = _unit_image(image)
    weights = _unit_alpha(alpha)
    foreground, background = composite, composite
    for size in sizes:
        foreground, background = blur_fusion_level(composite, foreground, background, weights, size)
    if image.dtype == np.uint8:
        return np.rint(foreground * 255).astype(np.uint8)
    return foreground
