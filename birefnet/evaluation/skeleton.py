"""Zhang-Suen thinning equal to ``skimage.morphology.skeletonize`` (2-D), visiting only the changing frontier.

scikit-image's skeletonize (Zhang and Suen, "A fast parallel algorithm for thinning digital patterns", CACM
1984, with scikit-image's lookup table) scans every pixel of the image in each of its two sub-passes until
nothing changes: the cost is the image area times the number of passes, about half the thickness of the
thickest object (300-400 ms for thick 1024x1024 masks). The sub-passes are parallel (every decision reads the
state before the sub-pass), and a pixel's decision depends only on its 8 neighbours, so a pixel only needs to
be looked at again by a sub-pass type when a neighbour was removed since that type last looked at it. This
module keeps those frontiers as index arrays: the result is identical, the cost is proportional to the object
area once (about 6x faster on the benchmark's masks).

``_SKIMAGE_LUT`` is scikit-image's table (``skimage/morphology/_skeletonize_cy.pyx``; scikit-image is
BSD-3-Clause licensed, Copyright (C) 2019, the scikit-image team): per 8-neighbour code (NW=1, N=2, NE=4, E=8,
SE=16, S=32, SW=64, W=128), 1 = removable in the first sub-pass, 2 = in the second, 3 = in both. The tests
check equality with ``skimage.morphology.skeletonize``.
"""

from __future__ import annotations

import cv2
import numpy as np

_SKIMAGE_LUT = np.array([
    0, 0, 0, 1, 0, 0, 1, 3, 0, 0, 3, 1, 1, 0, 1, 3, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 2, 0, 3, 0, 3, 3,
    0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 3, 0, 2, 2,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    2, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 3, 0, 2, 0,
    0, 0, 3, 1, 0, 0, 1, 3, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
    3, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    2, 3, 1, 3, 0, 0, 1, 3, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    2, 3, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 3, 3, 0, 1, 0, 0, 0, 0, 2, 2, 0, 0, 2, 0, 0, 0,
], dtype=np.uint8)
#: removable in the first / second sub-pass, by 8-neighbour code
_REMOVABLE = ((_SKIMAGE_LUT & 1).astype(bool), (_SKIMAGE_LUT & 2).astype(bool))
_SQUARE3 = np.ones((3, 3), np.uint8)


def skeletonize(image: np.ndarray) -> np.ndarray:
    """Skeleton of a 2-D binary image, equal to ``skimage.morphology.skeletonize(image)``.

    Args:
        image: ``(H, W)`` mask; nonzero is foreground.

    Returns:
        ``(H, W)`` bool skeleton.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {image.shape}")
    h, w = image.shape
    width = w + 2
    padded = np.zeros((h + 2, width), np.uint8)  # one pixel of background around, as scikit-image does
    padded[1:-1, 1:-1] = image != 0
    flat = padded.ravel()
    offsets = np.array([-width - 1, -width, -width + 1, 1, width + 1, width, width - 1, -1], dtype=np.intp)
    # interior pixels (all 8 neighbours set, code 255) are never removable: start from the boundary
    interior = cv2.erode(padded, _SQUARE3, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    boundary = np.flatnonzero(padded > interior)
    slot = np.empty(flat.size, np.intp)

    def unique(indices: np.ndarray) -> np.ndarray:
        # order-free deduplication in O(n): the last occurrence of each index keeps its slot
        order = np.arange(len(indices))
        slot[indices] = order
        return indices[slot[indices] == order]

    frontier = [boundary, boundary]  # per sub-pass type: pixels whose neighbourhood changed since it last looked
    sub_pass = 0
    while len(frontier[0]) or len(frontier[1]):
        candidates = frontier[sub_pass]
        frontier[sub_pass] = candidates[:0]
        candidates = candidates[flat[candidates] == 1]
        if len(candidates):
            code = flat[candidates + offsets[0]].astype(np.intp)
            for bit in range(1, 8):
                code |= flat[candidates + offsets[bit]].astype(np.intp) << bit
            removed = candidates[_REMOVABLE[sub_pass][code]]  # decided on the state before this sub-pass
            if len(removed):
                flat[removed] = 0
                neighbours = (removed[:, None] + offsets).ravel()
                neighbours = neighbours[flat[neighbours] == 1]
                frontier = [unique(np.concatenate((f, neighbours))) for f in frontier]
        sub_pass ^= 1
    return padded[1:-1, 1:-1].astype(bool)
