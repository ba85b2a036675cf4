"""Relax human correction effort (HCE_gamma) as the DIS benchmark defines it.

Qin et al., "Highly Accurate Dichotomous Image Segmentation", ECCV 2022, and the benchmark's official
evaluation code (``hce_metric_main.py`` in xuebinqin/DIS). HCE estimates the mouse clicks needed to fix a
prediction: the points of the (Ramer-Douglas-Peucker simplified) false-positive and false-negative boundary
segments that touch regions a human would have to correct, plus the number of wrong regions reachable only
as a whole ("independent" regions). The definition, step by step:

1. Binarise prediction and ground truth at ``> 128`` on the raw 8-bit values. The GT skeleton is
   ``skimage.morphology.skeletonize`` of the binary GT (computed in memory, with the identical and faster
   :func:`birefnet.evaluation.skeleton.skeletonize`; upstream caches it on disk).
2. Relax: ``FP_ = FP & erode(union, disk(1), relax)``, then ``relax`` times ``FP_ = dilate(FP_) & ~GT``, then
   ``& FP``; ``FN_`` likewise with ``~pred``, then ``& FN``, plus the GT skeleton pixels the prediction misses.
3. Contours of ``FP_`` and ``FN_`` (``cv2.findContours``, ``RETR_TREE``, ``CHAIN_APPROX_NONE``). A contour point
   counts when a condition mask dilated by ``disk(1)`` is set there (for FP: ``TP | FN_``; for FN:
   background ``~(TP | FP_ | FN_)``) and the pixel was not counted before (earlier in this or a previous
   contour). Runs of counted points form open polylines; a contour's last run is joined with its reversed
   first run when their ends are 8-neighbours. Each polyline is simplified with ``cv2.approxPolyDP``
   (epsilon 2.0, open) and its points are counted.
4. Independent regions: 8-connected regions of the mask without any counted point. The official code counts
   them as ``len(unique(labels)) - 1 - hit``, so a region covering the whole image counts 0; kept as is.
5. ``HCE = FP points + FP independent + FN points + FN independent``; a dataset's HCE is the mean.

This module reproduces that definition but walks the contours with array operations instead of a Python loop
per point, and skeletonises only the crop holding the GT components the prediction misses (thinning is
local to each 8-connected component, so the skeleton there is the same).
"""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np

from birefnet.evaluation.skeleton import skeletonize

DISK1 = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=np.uint8)  # skimage.morphology.disk(1)
RELAX = 5
EPSILON = 2.0


class HCEParts(NamedTuple):
    """The four terms of HCE for one image."""

    fp_points: int
    fp_independent: int
    fn_points: int
    fn_independent: int

    @property
    def total(self) -> int:
        """HCE of the image: the sum of the four terms."""
        return self.fp_points + self.fp_independent + self.fn_points + self.fn_independent


def _dilate(mask: np.ndarray) -> np.ndarray:
    return cv2.dilate(mask.view(np.uint8), DISK1).view(bool)


def missed_skeleton(gt: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Pixels of ``skeletonize(gt)`` that are false negatives, skeletonising only what can contain them.

    Args:
        gt: ``(H, W)`` bool ground truth.
        fn: ``(H, W)`` bool false negatives (``gt & ~pred``).

    Returns:
        ``(H, W)`` bool, ``skeletonize(gt) & fn``.
    """
    out = np.zeros_like(gt)
    if not fn.any():
        return out
    n, labels, boxes, _ = cv2.connectedComponentsWithStats(gt.view(np.uint8), connectivity=8)
    hit = np.unique(labels[fn])
    x0 = boxes[hit, cv2.CC_STAT_LEFT].min()
    y0 = boxes[hit, cv2.CC_STAT_TOP].min()
    x1 = (boxes[hit, cv2.CC_STAT_LEFT] + boxes[hit, cv2.CC_STAT_WIDTH]).max()
    y1 = (boxes[hit, cv2.CC_STAT_TOP] + boxes[hit, cv2.CC_STAT_HEIGHT]).max()
    # one pixel of margin keeps neighbouring components (if any) exactly as far as in the full image
    h, w = gt.shape
    y0, x0, y1, x1 = max(y0 - 1, 0), max(x0 - 1, 0), min(y1 + 1, h), min(x1 + 1, w)
    crop = gt[y0:y1, x0:x1]
    out[y0:y1, x0:x1] = skeletonize(crop) & fn[y0:y1, x0:x1]
    return out


def _count_boundary(mask: np.ndarray, condition: np.ndarray, epsilon: float) -> tuple[int, int]:
    """Simplified boundary points and independent regions of one relaxed error mask.

    Args:
        mask: ``(H, W)`` bool relaxed FP or FN mask.
        condition: ``(H, W)`` bool mask, already dilated, where a boundary point needs correction.
        epsilon: ``approxPolyDP`` tolerance.

    Returns:
        (points, independent regions).
    """
    if not mask.any():
        return 0, 0
    mask8 = mask.view(np.uint8)
    contours, _ = cv2.findContours(mask8, cv2.RETR_TREE, cv2.CHAIN_APPROX_NONE)
    n_labels, labels = cv2.connectedComponents(mask8, connectivity=8)
    # the official count: len(unique(labels)) - 1 - regions hit (no background label if the mask is full)
    n_unique = n_labels - 1 + int(not mask.all())
    lengths = np.array([len(c) for c in contours])
    points = np.concatenate(contours).reshape(-1, 2)  # (N, 2) as (x, y), contours back to back
    flat = points[:, 1].astype(np.int64) * mask.shape[1] + points[:, 0]
    first = np.zeros(len(flat), dtype=bool)
    first[np.unique(flat, return_index=True)[1]] = True  # a pixel counts at its first visit only
    valid = condition.ravel()[flat] & first
    n_hit = len(np.unique(labels.ravel()[flat[valid]]))
    independent = n_unique - 1 - n_hit
    if not valid.any():
        return 0, independent

    # runs of consecutive valid points inside each contour
    contour_id = np.repeat(np.arange(len(contours)), lengths)
    is_start = valid.copy()
    is_start[1:] &= ~valid[:-1] | (contour_id[1:] != contour_id[:-1])
    is_end = valid.copy()
    is_end[:-1] &= ~valid[1:] | (contour_id[1:] != contour_id[:-1])
    run_start = np.flatnonzero(is_start)
    run_end = np.flatnonzero(is_end) + 1
    run_contour = contour_id[run_start]

    total = 0
    runs_per_contour = np.bincount(run_contour, minlength=len(contours))
    # runs of contours with a single run, or whose first and last runs are not adjacent, stand alone
    first_run = np.searchsorted(run_contour, np.arange(len(contours)))
    merge = np.zeros(len(contours), dtype=bool)
    multi = np.flatnonzero(runs_per_contour > 1)
    if len(multi):
        head = points[run_start[first_run[multi]]]
        tail = points[run_end[first_run[multi] + runs_per_contour[multi] - 1] - 1]
        merge[multi] = np.abs(head - tail).max(axis=1) == 1
    points32 = np.ascontiguousarray(points, dtype=np.int32)
    skip_first = np.zeros(len(run_start), dtype=bool)
    skip_first[first_run[merge]] = True
    last_of_merged = np.zeros(len(run_start), dtype=bool)
    last_of_merged[first_run[merge] + runs_per_contour[merge] - 1] = True
    run_len = run_end - run_start
    # polylines of at most two points are kept whole by approxPolyDP
    simple = (run_len <= 2) & ~skip_first & ~last_of_merged
    total += int(run_len[simple].sum())
    for r in np.flatnonzero(~simple & ~skip_first):
        polyline = points32[run_start[r]:run_end[r]]
        if last_of_merged[r]:
            f = first_run[run_contour[r]]
            polyline = np.concatenate((polyline, points32[run_start[f]:run_end[f]][::-1]))
        total += len(cv2.approxPolyDP(polyline.reshape(-1, 1, 2), epsilon, False))
    return total, independent


def relax_hce(pred: np.ndarray, gt: np.ndarray, *, relax: int = RELAX, epsilon: float = EPSILON,
              skeleton: np.ndarray | None = None) -> HCEParts:
    """Human correction effort of one binary prediction, as the DIS benchmark computes it.

    Args:
        pred: ``(H, W)`` bool prediction, already binarised (``pred8 > 128``).
        gt: ``(H, W)`` bool ground truth (``gt8 > 128``).
        relax: erosion/dilation steps.
        epsilon: polygon simplification tolerance in pixels.
        skeleton: optional ``(H, W)`` bool ``skeletonize(gt)``, computed (in memory) when None.

    Returns:
        The four HCE terms; ``.total`` is the image's HCE.
    """
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
    pred = np.ascontiguousarray(pred, dtype=bool)
    gt = np.ascontiguousarray(gt, dtype=bool)
    tp = gt & pred
    fp = pred & ~gt
    fn = gt & ~pred
    union_eroded = cv2.erode((gt | pred).view(np.uint8), DISK1, iterations=relax).view(bool)

    fp_relaxed = fp & union_eroded
    if fp_relaxed.any():
        for _ in range(relax):
            fp_relaxed = _dilate(fp_relaxed) & ~gt
        fp_relaxed &= fp

    fn_relaxed = fn & union_eroded
    if fn_relaxed.any():
        for _ in range(relax):
            fn_relaxed = _dilate(fn_relaxed) & ~pred
        fn_relaxed &= fn
    fn_relaxed |= (skeleton & ~tp) if skeleton is not None else missed_skeleton(gt, fn)

    fp_points, fp_indep = _count_boundary(fp_relaxed, _dilate(tp | fn_relaxed), epsilon)
    fn_points, fn_indep = _count_boundary(fn_relaxed, _dilate(~(tp | fp_relaxed | fn_relaxed)), epsilon)
    return HCEParts(fp_points, fp_indep, fn_points, fn_indep)
