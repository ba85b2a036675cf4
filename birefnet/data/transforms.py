"""Paired training augmentations for image, mask and gradient label (BiRefNet upstream ``image_proc.py``).

Upstream applies, when enabled and in this order: flip -> crop -> rotate -> enhance -> pepper (upstream-spec
§8). Geometric transforms (flip, crop, rotate) move the image, the mask and the precomputed gradient label with
the same parameters; photometric ones (enhance, pepper) change the image only, which makes a precomputed
gradient label stale (see :func:`check_gradient_compatible`).

The implementation uses OpenCV on numpy arrays instead of PIL, with the same semantics:

* flip: horizontal, probability ``flip_prob`` (upstream 0.5).
* crop: ``border = int(crop_border * min(w, h))``; a centred window of random size in ``[w - border, w - 1] x
  [h - border, h - 1]``. Upstream does not resize afterwards (its batches would no longer stack); here the window
  is resized back to the input size (bilinear; the gradient label too, a small approximation).
* rotate: probability ``rotate_prob`` (upstream 0.2), angle drawn from ``-rotate_degrees .. rotate_degrees - 1``
  (upstream ``np.random.randint(-15, 15)``), counter-clockwise about the centre, bicubic, no expand, black fill.
* enhance: PIL ``ImageEnhance`` brightness, contrast, colour, sharpness in that order, each factor drawn from its
  inclusive range in steps of 0.1 (upstream ``randint(5, 15) / 10`` etc.). Blends saturate to uint8 as PIL's do.
* pepper: ``int(pepper_fraction * H * W)`` random pixels set to 0 or 255 on all channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

AUGMENTATIONS = ("flip", "crop", "rotate", "enhance", "pepper")
GEOMETRIC = frozenset({"flip", "crop", "rotate"})
PHOTOMETRIC = frozenset({"enhance", "pepper"})

# PIL ImageFilter.SMOOTH, the "degenerate" image of ImageEnhance.Sharpness.
_SMOOTH_KERNEL = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13.0


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations run and their upstream parameters (mirrors ``loader.*`` in params.yaml).

    Attributes:
        augment: enabled names, any of ``flip, crop, rotate, enhance, pepper``; always applied in that order.
        flip_prob: probability of a horizontal flip.
        crop_border: fraction of the shorter side a centred crop may remove.
        rotate_prob: probability of a rotation.
        rotate_degrees: angle bound; the angle is an integer in ``[-rotate_degrees, rotate_degrees - 1]``.
        brightness: inclusive (low, high) factor range, steps of 0.1.
        contrast: inclusive (low, high) factor range, steps of 0.1.
        color: inclusive (low, high) factor range, steps of 0.1.
        sharpness: inclusive (low, high) factor range, steps of 0.1.
        pepper_fraction: fraction of pixels set to black or white.
    """

    augment: tuple[str, ...] = ()
    flip_prob: float = 0.5
    crop_border: float = 0.1
    rotate_prob: float = 0.2
    rotate_degrees: int = 15
    brightness: tuple[float, float] = (0.5, 1.4)
    contrast: tuple[float, float] = (0.5, 1.4)
    color: tuple[float, float] = (0.0, 1.9)
    sharpness: tuple[float, float] = (0.0, 2.9)
    pepper_fraction: float = 0.0015

    def __post_init__(self) -> None:
        unknown = sorted(set(self.augment) - set(AUGMENTATIONS))
        if unknown:
            raise ValueError(f"unknown augmentation(s) {unknown}; expected any of {list(AUGMENTATIONS)}")
        object.__setattr__(self, "augment", tuple(a for a in AUGMENTATIONS if a in self.augment))

    @property
    def photometric(self) -> bool:
        """True when an enabled augmentation changes image pixels but not the gradient label."""
        return bool(PHOTOMETRIC & set(self.augment))

    @classmethod
    def from_params(cls, loader: object) -> AugmentConfig:
        """Build from a ``LoaderParams`` (``params.loader``)."""
        names = ("flip_prob", "crop_border", "rotate_prob", "rotate_degrees", "brightness", "contrast", "color",
                 "sharpness", "pepper_fraction")
        return cls(augment=tuple(loader.augment), **{n: getattr(loader, n) for n in names})


def check_gradient_compatible(config: AugmentConfig, with_gradient: bool) -> None:
    """Refuse photometric augmentation together with precomputed gradient labels.

    The gradient label is a Laplacian of the image; after ``enhance`` or ``pepper`` the stored label no longer
    matches the image the model sees.

    Raises:
        ValueError: naming the params keys to change.
    """
    if with_gradient and config.photometric:
        enabled = sorted(PHOTOMETRIC & set(config.augment))
        raise ValueError(
            f"loader.augment enables photometric augmentation {enabled}, which makes precomputed gradient labels "
            "stale: set gradients.mode: on_the_fly (labels computed from the augmented image during training) "
            f"or remove {enabled} from loader.augment")


def _factor(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    low, high = round(bounds[0] * 10), round(bounds[1] * 10)
    return float(rng.integers(low, high + 1)) / 10.0


def hflip(*arrays: np.ndarray | None) -> list[np.ndarray | None]:
    """Mirror each array left-right.

    Args:
        *arrays: (H, W) or (H, W, C) arrays, or None (passed through).

    Returns:
        The flipped arrays, contiguous.
    """
    return [None if a is None else cv2.flip(a, 1) for a in arrays]


def center_crop_resize(arrays: Sequence[np.ndarray | None], crop_w: int, crop_h: int) -> list[np.ndarray | None]:
    """Take the centred ``crop_w x crop_h`` window (upstream's box) and resize it back to the input size.

    Args:
        arrays: (H, W) or (H, W, C) arrays of one size, or None.
        crop_w: window width, ``<= W``.
        crop_h: window height, ``<= H``.

    Returns:
        (H, W[, C]) arrays, bilinear.
    """
    out: list[np.ndarray | None] = []
    for a in arrays:
        if a is None:
            out.append(None)
            continue
        h, w = a.shape[:2]
        left, top = (w - crop_w) >> 1, (h - crop_h) >> 1
        window = a[top:top + crop_h, left:left + crop_w]
        out.append(cv2.resize(window, (w, h), interpolation=cv2.INTER_LINEAR))
    return out


def rotate(arrays: Sequence[np.ndarray | None], angle: float) -> list[np.ndarray | None]:
    """Rotate counter-clockwise by ``angle`` degrees about the centre, bicubic, black fill, same size.

    Args:
        arrays: (H, W) or (H, W, C) arrays of one size, or None.
        angle: degrees, counter-clockwise (PIL ``Image.rotate`` convention).

    Returns:
        Rotated arrays; uint8 inputs saturate to [0, 255].
    """
    out: list[np.ndarray | None] = []
    matrix = None
    for a in arrays:
        if a is None:
            out.append(None)
            continue
        h, w = a.shape[:2]
        if matrix is None:
            matrix = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), angle, 1.0)
        out.append(cv2.warpAffine(a, matrix, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_CONSTANT,
                                  borderValue=0))
    return out


def enhance(image: np.ndarray, brightness: float, contrast: float, color: float, sharpness: float) -> np.ndarray:
    """PIL ``ImageEnhance`` Brightness, Contrast, Color, Sharpness (in that order) with the given factors.

    Args:
        image: (H, W, 3) uint8 RGB.
        brightness: 1 keeps the image; 0 gives black.
        contrast: 1 keeps the image; 0 gives the mean gray.
        color: 1 keeps the image; 0 gives grayscale.
        sharpness: 1 keeps the image; 0 gives the PIL SMOOTH-filtered image; > 1 sharpens.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    img = cv2.addWeighted(image, brightness, image, 0.0, 0.0)
    mean = int(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).mean() + 0.5)
    img = cv2.addWeighted(img, contrast, img, 0.0, (1.0 - contrast) * mean)
    gray = cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    img = cv2.addWeighted(img, color, gray, 1.0 - color, 0.0)
    smooth = cv2.filter2D(img, -1, _SMOOTH_KERNEL, borderType=cv2.BORDER_REPLICATE)
    # PIL's 3x3 filters leave the outermost rows and columns unchanged.
    smooth[0], smooth[-1], smooth[:, 0], smooth[:, -1] = img[0], img[-1], img[:, 0], img[:, -1]
    return cv2.addWeighted(img, sharpness, smooth, 1.0 - sharpness, 0.0)


def pepper(image: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Set ``int(fraction * H * W)`` random pixels (with replacement) to 0 or 255 on all channels.

    Args:
        image: (H, W, 3) uint8; modified in place and returned.
        fraction: fraction of pixels.
        rng: random generator.

    Returns:
        (H, W, 3) uint8.
    """
    h, w = image.shape[:2]
    n = int(fraction * h * w)
    if n:
        ys, xs = rng.integers(0, h, n), rng.integers(0, w, n)
        image[ys, xs] = (rng.integers(0, 2, n) * 255).astype(np.uint8)[:, None]
    return image


def augment_sample(image: np.ndarray, mask: np.ndarray, gradient: np.ndarray | None, config: AugmentConfig,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Apply the enabled augmentations in upstream order.

    Args:
        image: (H, W, 3) uint8 RGB.
        mask: (H, W) uint8.
        gradient: (H, W) float32 gradient label, or None.
        config: which augmentations and their parameters.
        rng: random generator (one draw sequence per sample).

    Returns:
        (image, mask, gradient) with the same shapes and dtypes; geometric transforms are applied identically
        to all three, photometric ones to the image only.
    """
    enabled = config.augment
    if not enabled:
        return image, mask, gradient
    if "flip" in enabled and rng.random() < config.flip_prob:
        image, mask, gradient = hflip(image, mask, gradient)
    if "crop" in enabled:
        h, w = image.shape[:2]
        border = int(config.crop_border * min(w, h))
        if border > 0:
            crop_w = int(rng.integers(w - border, w))
            crop_h = int(rng.integers(h - border, h))
            image, mask, gradient = center_crop_resize((image, mask, gradient), crop_w, crop_h)
    if "rotate" in enabled and rng.random() < config.rotate_prob and config.rotate_degrees > 0:
        angle = float(rng.integers(-config.rotate_degrees, config.rotate_degrees))
        image, mask, gradient = rotate((image, mask, gradient), angle)
    if "enhance" in enabled:
        image = enhance(image, _factor(rng, config.brightness), _factor(rng, config.contrast),
                        _factor(rng, config.color), _factor(rng, config.sharpness))
    if "pepper" in enabled:
        image = pepper(np.ascontiguousarray(image), config.pepper_fraction, rng)
    return image, mask, gradient
