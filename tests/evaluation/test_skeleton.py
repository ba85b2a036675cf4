"""The frontier Zhang-Suen thinning equals ``skimage.morphology.skeletonize``."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage.morphology import skeletonize as skimage_skeletonize

from birefnet.evaluation.skeleton import skeletonize


def test_random_masks_equal_skimage() -> None:
    rng = np.random.default_rng(0)
    for _ in range(400):
        h, w = rng.integers(1, 48, 2)
        mask = rng.random((h, w)) < rng.uniform(0.1, 0.97)
        np.testing.assert_array_equal(skeletonize(mask), skimage_skeletonize(mask))


@pytest.mark.parametrize("shape", [(0, 0), (1, 1), (1, 9), (7, 1), (5, 5)])
@pytest.mark.parametrize("fill", [0, 1])
def test_degenerate_masks(shape: tuple[int, int], fill: int) -> None:
    mask = np.full(shape, fill, np.uint8)
    np.testing.assert_array_equal(skeletonize(mask), skimage_skeletonize(mask.astype(bool)))


def test_thick_shapes_wires_and_holes() -> None:
    rng = np.random.default_rng(1)
    for _ in range(4):
        mask = np.zeros((300, 420), np.uint8)
        cv2.ellipse(mask, (200, 150), (int(rng.integers(40, 140)), int(rng.integers(30, 100))),
                    float(rng.uniform(0, 180)), 0, 360, 255, -1)
        for _ in range(10):
            cv2.circle(mask, (int(rng.integers(0, 420)), int(rng.integers(0, 300))), int(rng.integers(2, 12)), 0, -1)
            p0 = (int(rng.integers(0, 420)), int(rng.integers(0, 300)))
            p1 = (int(rng.integers(0, 420)), int(rng.integers(0, 300)))
            cv2.line(mask, p0, p1, 255, int(rng.integers(1, 5)))
        np.testing.assert_array_equal(skeletonize(mask), skimage_skeletonize(mask > 0))
