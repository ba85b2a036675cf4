"""Salient-object / dichotomous-segmentation metrics, equal to PySODMetrics, computed from histograms.

The suite the BiRefNet paper (Zheng et al., "Bilateral Reference for High-Resolution Dichotomous Image
Segmentation", CAAI AIR 2024) reports on DIS5K: S-measure (Fan et al., ICCV 2017), max/mean/adaptive
F-measure (Achanta et al., CVPR 2009, beta^2 = 0.3), weighted F-measure (Margolin et al., CVPR 2014),
max/mean/adaptive E-measure (Fan et al., IJCAI 2018), MAE, and the DIS human correction effort HCE_gamma
(Qin et al., ECCV 2022; see :mod:`birefnet.evaluation.hce`). On request (``evaluate.extra_metrics``) also the
matting and boundary metrics of :func:`score_extra`: MSE, mean boundary accuracy (Cheng et al., CVPR 2020) and
boundary IoU (Cheng et al., CVPR 2021), whose definitions and conventions are stated there.

Conventions follow PySODMetrics (``py_sod_metrics``), which the tests use as the oracle:

* The prediction is 8-bit. It is resized to the ground truth's size with OpenCV bilinear, divided by 255 and
  min-max normalised per image unless constant. The ground truth is binarised at ``> 128``.
* F- and E-curves have 256 thresholds over ``uint8(p * 255)``; the dataset max/mean F and E are the max/mean
  of the image-averaged curve, not the mean of per-image maxima. Adaptive thresholds are ``min(2 mean(p), 1)``.

Why this is fast: every pixel of a normalised prediction takes one of at most 256 values, so all of S, F, E
and MAE are computed exactly from four per-quadrant 512-bin histograms (8-bit value x GT class) and a
256-entry value table built with the very float operations PySODMetrics applies per pixel. Weighted F only
needs the nearest-foreground error in a 3-pixel band around the foreground (found by a local search that
breaks ties as scipy's feature transform does), a separable Gaussian, and exact distances to the foreground.

Two deliberate differences:

* where PySODMetrics' S-measure returns NaN (all foreground in the last row or column makes a quadrant empty:
  ``nan * 0``), an empty quadrant contributes 0 here;
* the E-measure is capped at 1. The reference divides a sum over ``w * h`` pixels by ``w * h - 1 + eps``, so a
  (near-)perfect map on a ``w * h``-pixel image scores up to ``w * h / (w * h - 1)`` there (1.0003 on 50x70,
  2 on 1x2, 4.5e15 on 1x1); wherever the reference is at most 1 the values are equal.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy.ndimage import distance_transform_edt

from birefnet.evaluation.hce import relax_hce

EPS = float(np.spacing(1))  # MATLAB's eps, as the reference implementations use it
F_BETA2 = 0.3
WF_BETA = 1.0
S_ALPHA = 0.5
NUM_THRESHOLDS = 256
GT_THRESHOLD = 128

METRIC_KEYS: tuple[str, ...] = ("Sm", "maxF", "meanF", "adpF", "wF", "maxE", "meanE", "adpE", "MAE", "HCE")


def _gauss_1d(size: int = 7, sigma: float = 5.0) -> np.ndarray:
    """1-D factor of MATLAB ``fspecial('gaussian', size, sigma)``: the 2-D kernel is its outer product."""
    half = (size - 1) / 2
    x = np.arange(-half, half + 1)
    g = np.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


_WF_KERNEL = _gauss_1d()
_BAND_KERNEL = np.ones((7, 7), np.uint8)


# --------------------------------------------------------------------------------------------------------
# input handling


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Return an 8-bit grey map.

    Args:
        image: ``(H, W)`` or ``(H, W, C)`` (first channel used). uint8 is returned as is; bool maps to 0/255;
            float is read as [0, 1], clipped and scaled by 255 with truncation, as the upstream prediction
            writer (``ToPILImage``) does; other integer types are clipped to [0, 255].

    Returns:
        ``(H, W)`` uint8 array.
    """
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[..., 0]
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D map, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image
    if image.dtype == bool:
        return image.astype(np.uint8) * 255
    if np.issubdtype(image.dtype, np.floating):
        return (np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    return np.clip(image, 0, 255).astype(np.uint8)


def binarize_gt(gt: np.ndarray) -> np.ndarray:
    """Binarise a ground truth at ``> 128`` on its 8-bit values (bool passes through).

    Args:
        gt: ``(H, W)`` map, any dtype accepted by :func:`to_uint8`.

    Returns:
        ``(H, W)`` bool mask.
    """
    gt = np.asarray(gt)
    if gt.dtype == bool and gt.ndim == 2:
        return gt
    return to_uint8(gt) > GT_THRESHOLD


def resize_to(pred: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize an 8-bit prediction to ``shape = (H, W)`` with OpenCV bilinear (no-op when equal)."""
    if pred.shape[:2] == tuple(shape):
        return pred
    return cv2.resize(pred, (int(shape[1]), int(shape[0])), interpolation=cv2.INTER_LINEAR)


def _value_table(pred: np.ndarray) -> np.ndarray:
    """Per 8-bit value, the normalised prediction ``p`` exactly as PySODMetrics computes it per pixel.

    Args:
        pred: ``(H, W)`` uint8 prediction.

    Returns:
        ``(256,)`` float64; entries of values absent from ``pred`` are meaningless but finite.
    """
    lo, hi = int(pred.min()), int(pred.max())
    table = np.arange(256) / 255
    if lo != hi:
        mn, mx = lo / 255, hi / 255
        table = (table - mn) / (mx - mn)
    return table


# --------------------------------------------------------------------------------------------------------
# per-image scores


@dataclass(frozen=True)
class ImageScores:
    """All metrics of one prediction/ground-truth pair.

    Curves are indexed by threshold ``t`` in ``0..255`` (binarisation ``uint8(p * 255) >= t``).

    Attributes:
        sm: S-measure.
        mae: mean absolute error.
        wfm: weighted F-measure (0 for an empty ground truth).
        adp_fm: adaptive F-measure.
        adp_em: adaptive E-measure.
        hce: relax HCE_gamma, or None when not computed.
        precision: ``(256,)`` float64.
        recall: ``(256,)`` float64.
        fm_curve: ``(256,)`` float64 F-measure per threshold.
        em_curve: ``(256,)`` float64 E-measure per threshold.
        extra: the requested metrics of :func:`score_extra`, or None when none was asked for.
    """

    sm: float
    mae: float
    wfm: float
    adp_fm: float
    adp_em: float
    hce: float | None
    precision: np.ndarray = field(repr=False)
    recall: np.ndarray = field(repr=False)
    fm_curve: np.ndarray = field(repr=False)
    em_curve: np.ndarray = field(repr=False)
    extra: ExtraScores | None = None


class _Stats:
    """Histogram statistics of one pair: everything but weighted F and HCE derives from these."""

    def __init__(self, pred: np.ndarray, gt: np.ndarray) -> None:
        h, w = gt.shape
        self.pred, self.gt = pred, gt
        self.size = h * w
        self.table = _value_table(pred)
        self.n_fg = int(np.count_nonzero(gt))
        # code = 8-bit value + 256 * gt, histogrammed per S-measure quadrant; the image histogram is their sum
        code = pred.astype(np.uint16)
        code[gt] += 256
        self.center = self._centroid()
        cy, cx = self.center
        self.quadrants: list[tuple[float, np.ndarray]] = []
        for rows, cols in ((slice(0, cy), slice(0, cx)), (slice(0, cy), slice(cx, w)),
                           (slice(cy, h), slice(0, cx)), (slice(cy, h), slice(cx, w))):
            part = code[rows, cols]
            hist = np.bincount(part.ravel(), minlength=512).reshape(2, 256) if part.size else np.zeros((2, 256), int)
            self.quadrants.append((part.size, hist))
        self.hist = sum(q[1] for q in self.quadrants)  # (2, 256): [gt bg, gt fg] x 8-bit value
        self.present = self.hist.sum(axis=0) > 0

    def _centroid(self) -> tuple[int, int]:
        h, w = self.gt.shape
        if self.n_fg == 0:
            cy, cx = np.round(h / 2), np.round(w / 2)
        else:
            rows = np.count_nonzero(self.gt, axis=1)
            cols = np.count_nonzero(self.gt, axis=0)
            cy = np.round((rows @ np.arange(h)) / self.n_fg)
            cx = np.round((cols @ np.arange(w)) / self.n_fg)
        # MATLAB's 1-based split: the upper-left quadrant includes the centroid row and column
        return int(cy) + 1, int(cx) + 1

    def mean_pred(self) -> float:
        """``mean(p)``; recomputed per pixel when the adaptive threshold lands within rounding of a value."""
        counts = self.hist.sum(axis=0)
        mean = float(counts @ self.table) / self.size
        used = self.table[self.present]
        if np.any(np.abs(used - 2 * mean) <= 1e-9) or abs(2 * mean - 1) <= 1e-9:
            mean = float(self.table[self.pred].mean())
        return mean


def _s_object(count: np.ndarray, values: np.ndarray) -> float:
    n = int(count.sum())
    mean = float(count @ values) / n
    std = float(np.sqrt(count @ (values - mean) ** 2 / (n - 1))) if n > 1 else 0.0
    return 2 * mean / (mean * mean + 1 + std + EPS)


def _ssim(size: int, hist: np.ndarray, table: np.ndarray) -> float:
    counts = hist.sum(axis=0)
    n_fg = int(hist[1].sum())
    x = float(counts @ table) / size
    y = n_fg / size
    dx = table - x
    denom = size - 1 + EPS
    sigma_x = float(counts @ (dx * dx)) / denom
    sigma_y = (n_fg * (1 - y) ** 2 + (size - n_fg) * y * y) / denom
    sigma_xy = float(hist[1] @ dx * (1 - y) - hist[0] @ dx * y) / denom
    alpha = 4 * x * y * sigma_xy
    beta = (x * x + y * y) * (sigma_x + sigma_y)
    if alpha != 0:
        return alpha / (beta + EPS)
    return 1.0 if beta == 0 else 0.0


def _s_measure(stats: _Stats) -> float:
    table = stats.table
    y = stats.n_fg / stats.size
    if stats.n_fg == 0:
        return 1 - float(stats.hist.sum(axis=0) @ table) / stats.size
    if stats.n_fg == stats.size:
        return float(stats.hist.sum(axis=0) @ table) / stats.size
    fg_score = _s_object(stats.hist[1], table) * y
    bg_score = _s_object(stats.hist[0], 1 - table) * (1 - y)
    object_score = fg_score + bg_score
    h, w = stats.gt.shape
    cy, cx = stats.center
    area = h * w
    w_lt = cx * cy / area
    w_rt = cy * (w - cx) / area
    w_lb = (h - cy) * cx / area
    weights = (w_lt, w_rt, w_lb, 1 - w_lt - w_rt - w_lb)
    region_score = sum(wt * _ssim(size, hist, table) for wt, (size, hist) in zip(weights, stats.quadrants, strict=True)
                       if size)
    return max(0.0, object_score * S_ALPHA + region_score * (1 - S_ALPHA))


def _threshold_counts(stats: _Stats) -> tuple[np.ndarray, np.ndarray]:
    """Pixels with ``uint8(p * 255) >= t`` inside GT foreground and background, for t = 0..255: two (256,)."""
    quantised = (stats.table * 255).astype(np.uint8)
    fg = np.bincount(quantised, weights=stats.hist[1], minlength=256)
    bg = np.bincount(quantised, weights=stats.hist[0], minlength=256)
    fg_ge = np.cumsum(fg[::-1])[::-1]
    bg_ge = np.cumsum(bg[::-1])[::-1]
    return fg_ge.astype(np.int64), bg_ge.astype(np.int64)


def _f_curves(stats: _Stats, fg_ge: np.ndarray, bg_ge: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tps = fg_ge
    ps = fg_ge + bg_ge
    ps[ps == 0] = 1
    t = max(stats.n_fg, 1)
    precision = tps / ps
    recall = tps / t
    numerator = (1 + F_BETA2) * precision * recall
    denominator = np.where(numerator == 0, 1, F_BETA2 * precision + recall)
    return precision, recall, numerator / denominator


def _adaptive(stats: _Stats) -> tuple[int, int]:
    """(TP, FP) of the adaptive binarisation ``p >= min(2 mean(p), 1)``."""
    threshold = min(2 * stats.mean_pred(), 1)
    keep = stats.table >= threshold
    return int(stats.hist[1][keep].sum()), int(stats.hist[0][keep].sum())


def _adaptive_f(stats: _Stats, tp: int, fp: int) -> float:
    if tp == 0:
        return 0.0
    precision = tp / (tp + fp)
    recall = tp / stats.n_fg
    return (1 + F_BETA2) * precision * recall / (F_BETA2 * precision + recall)


def _e_measure(stats: _Stats, fg_fg: np.ndarray | int, fg_bg: np.ndarray | int) -> np.ndarray | float:
    """Enhanced-alignment measure from the counts of predicted foreground in GT fg/bg (scalars or curves)."""
    size, gt_fg = stats.size, stats.n_fg
    pred_fg = fg_fg + fg_bg
    pred_bg = size - pred_fg
    if gt_fg == 0:
        enhanced = pred_bg
    elif gt_fg == size:
        enhanced = pred_fg
    else:
        bg_fg = gt_fg - fg_fg
        bg_bg = pred_bg - bg_fg
        mean_pred = pred_fg / size
        mean_gt = gt_fg / size
        pred_values = (1 - mean_pred, 0 - mean_pred)
        gt_values = (1 - mean_gt, 0 - mean_gt)
        parts = ((fg_fg, 0, 0), (fg_bg, 0, 1), (bg_fg, 1, 0), (bg_bg, 1, 1))
        enhanced = 0
        for numel, pi, gi in parts:
            a, b = pred_values[pi], gt_values[gi]
            align = 2 * (a * b) / (a * a + b * b + EPS)
            enhanced = enhanced + (align + 1) ** 2 / 4 * numel
    # The reference (Fan et al.'s MATLAB code, PySODMetrics) divides the sum over ``size`` pixels, each term in
    # [0, 1], by ``size - 1 + eps``: a (near-)perfect map scores up to size / (size - 1) (2 on a 1x2 image) and
    # a 1x1 image divides by eps (2.25e15 on a match). The E-measure of a perfect map is 1, so the ratio is
    # capped at 1; below 1 it is the reference's value exactly.
    return np.minimum(enhanced / (size - 1 + EPS), 1.0)


def _mae(stats: _Stats) -> float:
    table = stats.table
    return float(stats.hist[0] @ table + stats.hist[1] @ (1 - table)) / stats.size


def weighted_fmeasure(pred: np.ndarray, gt: np.ndarray) -> float:
    """Weighted F-measure (Margolin et al. 2014), beta = 1, as PySODMetrics computes it.

    Args:
        pred: ``(H, W)`` 8-bit prediction (see :func:`to_uint8`), already at the ground truth's size.
        gt: ``(H, W)`` ground truth (see :func:`binarize_gt`).

    Returns:
        The score in [0, 1]; 0 for an empty ground truth.
    """
    pred, gt = to_uint8(pred), binarize_gt(gt)
    return _weighted_fmeasure(pred, gt, _value_table(pred))


_EXACT_FLOAT32_DISTANCE = 4000.0  # below sqrt(2^24) = 4096 px, squared distances are exact in float32
_BAND_REACH = 4  # a pixel within Chebyshev distance 3 of the foreground has one within Euclidean 3*sqrt(2) < 5
# Offsets (dy, dx) within the band's reach, in the order scipy's exact feature transform resolves them:
# nearest first, then the smallest column, then the smallest row (see _band_nearest).
_BAND_OFFSETS = sorted(
    ((dy, dx) for dy in range(-_BAND_REACH, _BAND_REACH + 1) for dx in range(-_BAND_REACH, _BAND_REACH + 1)),
    key=lambda o: (o[0] * o[0] + o[1] * o[1], o[1], o[0]),
)


def _band_nearest(gt: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest foreground pixel of each band pixel, equal to scipy's ``distance_transform_edt`` feature transform.

    scipy computes the feature transform separably (Maurer et al., PAMI 2003): first the nearest feature along
    each column (ties to the smaller row), then the lower envelope along each row (ties to the smaller
    column). The answer for a pixel is therefore its nearest foreground pixel, ties broken by the smallest
    column, then the smallest row. Band pixels have one within ``_BAND_REACH``, so the first offset of
    ``_BAND_OFFSETS`` (in that order) that lands on the foreground is scipy's answer, found without
    transforming the whole image.

    Args:
        gt: ``(H, W)`` bool ground truth.
        rows, cols: ``(N,)`` coordinates of background pixels within Chebyshev distance 3 of the foreground.

    Returns:
        ``(N,)`` rows and columns of their nearest foreground pixels.
    """
    r = _BAND_REACH
    padded = np.zeros((gt.shape[0] + 2 * r, gt.shape[1] + 2 * r), dtype=bool)
    padded[r:-r, r:-r] = gt
    width = padded.shape[1]
    flat = padded.ravel()
    base = (rows + r) * width + (cols + r)
    near_y, near_x = np.empty_like(rows), np.empty_like(cols)
    todo = np.arange(len(rows))
    for dy, dx in _BAND_OFFSETS:
        if not len(todo):
            break
        hit = flat[base[todo] + (dy * width + dx)]
        done = todo[hit]
        near_y[done] = rows[done] + dy
        near_x[done] = cols[done] + dx
        todo = todo[~hit]
    if len(todo):  # unreachable for band pixels; a guard against a wrong band
        raise AssertionError(f"{len(todo)} band pixels without foreground within {r} pixels")
    return near_y, near_x


def _foreground_distance(gt: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance to the nearest foreground pixel, as float64 ``sqrt(dy^2 + dx^2)``, at ``where``.

    OpenCV's precise L2 transform gives the exact distance in float32; squaring and rounding recovers the
    integer ``dy^2 + dx^2`` while it is exact in float32 (below 2^24, distances under 4096 px), so the float64
    square root equals scipy's bit for bit, whatever thread count or SIMD path OpenCV took. Farther pixels
    (only in images over 4096 px) fall back to scipy's transform.

    Args:
        gt: ``(H, W)`` bool ground truth with at least one foreground pixel.
        where: ``(H, W)`` bool pixels to return.

    Returns:
        ``(count_nonzero(where),)`` float64 distances in row-major order.
    """
    approx = cv2.distanceTransform((~gt).view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[where]
    if approx.size and float(approx.max()) >= _EXACT_FLOAT32_DISTANCE:
        return distance_transform_edt(~gt)[where]
    squared = np.rint(np.square(approx, dtype=np.float64))
    return np.sqrt(squared, out=squared)


def _weighted_fmeasure(pred: np.ndarray, gt: np.ndarray, table: np.ndarray) -> float:
    n_fg = int(np.count_nonzero(gt))
    if n_fg == 0:
        return 0.0
    error = table[pred]  # |p - gt| on the background
    np.subtract(1.0, error, out=error, where=gt)  # |p - 1| on the foreground
    background = ~gt
    # Pixel dependency: a background pixel takes the error of its nearest foreground pixel. Only pixels within
    # the 7x7 Gaussian's reach of the foreground matter, as the smoothed error is read on the foreground only.
    band = cv2.dilate(gt.view(np.uint8), _BAND_KERNEL).view(bool) & background
    spread = np.where(gt, error, 0.0)
    band_rows, band_cols = np.nonzero(band)
    near_y, near_x = _band_nearest(gt, band_rows, band_cols)
    spread[band_rows, band_cols] = error[near_y, near_x]
    smoothed = cv2.sepFilter2D(spread, cv2.CV_64F, _WF_KERNEL, _WF_KERNEL, borderType=cv2.BORDER_CONSTANT)
    np.minimum(smoothed, error, out=smoothed)
    weighted_fg_sum = float(np.sum(smoothed, where=gt))
    # Pixel importance: background errors weighted by 2 - exp(ln(0.5) / 5 * distance to the foreground),
    # where the error is non-zero only.
    wrong_bg = background & (error > 0)
    distance = _foreground_distance(gt, wrong_bg)
    fp_w = float(np.sum(error[wrong_bg] * (2 - np.exp(np.log(0.5) / 5 * distance))))
    tp_w = n_fg - weighted_fg_sum
    recall = 1 - weighted_fg_sum / n_fg
    precision = tp_w / (tp_w + fp_w + EPS)
    return float((1 + WF_BETA) * recall * precision / (recall + WF_BETA * precision + EPS))


def _prepare(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(uint8 prediction at the ground truth's size, bool ground truth)``, both C-contiguous ``(H, W)``.

    Raises:
        ValueError: a map with no pixels (every metric divides by the pixel count).
    """
    gt_mask = binarize_gt(gt)
    pred8 = to_uint8(pred)
    if gt_mask.size == 0 or pred8.size == 0:
        raise ValueError(f"cannot score an empty map: prediction shape {pred8.shape}, ground truth {gt_mask.shape}")
    return np.ascontiguousarray(resize_to(pred8, gt_mask.shape)), np.ascontiguousarray(gt_mask)


def score_image(pred: np.ndarray, gt: np.ndarray, *, hce: bool = True, extra: Sequence[str] = ()) -> ImageScores:
    """Score one prediction against its ground truth with the full suite.

    Args:
        pred: ``(h, w)`` prediction: uint8 in [0, 255], or float in [0, 1] (quantised like the upstream writer,
            see :func:`to_uint8`). Resized to the ground truth's size with OpenCV bilinear when sizes differ.
        gt: ``(H, W)`` ground truth: uint8 (binarised at > 128), bool, or float in [0, 1].
        hce: also compute the DIS human correction effort (the slowest metric).
        extra: names of :data:`EXTRA_METRICS` to compute as well (see :func:`score_extra`).

    Returns:
        The per-image scores and threshold curves; every score but HCE is in [0, 1] for any image size.

    Raises:
        ValueError: a map with no pixels, or not 2-D, or an unknown ``extra`` name.
    """
    pred8, gt_mask = _prepare(pred, gt)
    stats = _Stats(pred8, gt_mask)
    fg_ge, bg_ge = _threshold_counts(stats)
    precision, recall, fm_curve = _f_curves(stats, fg_ge, bg_ge)
    em_curve = np.asarray(_e_measure(stats, fg_ge, bg_ge), dtype=np.float64)
    tp, fp = _adaptive(stats)
    hce_value = float(relax_hce(pred8 > 128, gt_mask).total) if hce else None
    return ImageScores(
        sm=float(_s_measure(stats)),
        mae=_mae(stats),
        wfm=_weighted_fmeasure(pred8, gt_mask, stats.table),
        adp_fm=float(_adaptive_f(stats, tp, fp)),
        adp_em=float(_e_measure(stats, tp, fp)),
        hce=hce_value,
        precision=precision,
        recall=recall,
        fm_curve=fm_curve,
        em_curve=em_curve,
        extra=score_extra(pred, gt, extra) if extra else None,
    )


def s_measure(pred: np.ndarray, gt: np.ndarray) -> float:
    """S-measure (alpha = 0.5) of one pair; inputs as in :func:`score_image`."""
    return float(_s_measure(_Stats(*_prepare(pred, gt))))


def mae(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean absolute error of one pair; inputs as in :func:`score_image`."""
    return _mae(_Stats(*_prepare(pred, gt)))


# --------------------------------------------------------------------------------------------------------
# per-set accumulation


@dataclass(frozen=True)
class SetResult:
    """Metrics of one set of images.

    Attributes:
        metrics: ``{"n", "Sm", "maxF", "meanF", "adpF", "wF", "maxE", "meanE", "adpE", "MAE", "HCE"}``
            (``HCE`` only when computed), then the requested extra metrics (:func:`reduce_extra`), floats except
            ``n``.
        curves: ``{"threshold", "precision", "recall", "fmeasure", "emeasure"}``: ``(256,)`` float64 arrays of
            the image-averaged curves, by ascending threshold 0..255.
    """

    metrics: dict[str, float | int]
    curves: dict[str, np.ndarray] = field(repr=False)


class MetricAccumulator:
    """Collects :class:`ImageScores` of one set and reduces them as PySODMetrics does.

    Scalar metrics are means over images; max/mean F and E come from the image-averaged curves.
    """

    def __init__(self) -> None:
        self._scores: list[ImageScores] = []

    def __len__(self) -> int:
        return len(self._scores)

    def update(self, scores: ImageScores) -> None:
        """Add one image's scores."""
        self._scores.append(scores)

    def extend(self, scores: Iterable[ImageScores]) -> None:
        """Add several images' scores, in order."""
        self._scores.extend(scores)

    def compute(self) -> SetResult:
        """Reduce to set metrics and curves; raises ValueError when empty."""
        if not self._scores:
            raise ValueError("no images were scored")

        def mean(name: str) -> float:
            return float(np.mean(np.array([getattr(s, name) for s in self._scores], dtype=np.float64)))

        def curve(name: str) -> np.ndarray:
            return np.mean(np.array([getattr(s, name) for s in self._scores], dtype=np.float64), axis=0)

        fm, em = curve("fm_curve"), curve("em_curve")
        metrics: dict[str, float | int] = {
            "n": len(self._scores),
            "Sm": mean("sm"),
            "maxF": float(fm.max()),
            "meanF": float(fm.mean()),
            "adpF": mean("adp_fm"),
            "wF": mean("wfm"),
            "maxE": float(em.max()),
            "meanE": float(em.mean()),
            "adpE": mean("adp_em"),
            "MAE": mean("mae"),
        }
        if all(s.hce is not None for s in self._scores):
            metrics["HCE"] = mean("hce")
        extras = [s.extra for s in self._scores]
        if all(e is not None for e in extras):
            metrics.update(reduce_extra(extras))  # type: ignore[arg-type]
        curves = {
            "threshold": np.arange(NUM_THRESHOLDS, dtype=np.float64),
            "precision": curve("precision"),
            "recall": curve("recall"),
            "fmeasure": fm,
            "emeasure": em,
        }
        return SetResult(metrics=metrics, curves=curves)


def score_set(pairs: Iterable[tuple[np.ndarray, np.ndarray]], *, hce: bool = True,
              extra: Sequence[str] = ()) -> SetResult:
    """Score an iterable of ``(pred, gt)`` arrays (see :func:`score_image`) as one set."""
    accumulator = MetricAccumulator()
    for pred, gt in pairs:
        accumulator.update(score_image(pred, gt, hce=hce, extra=extra))
    return accumulator.compute()


# --------------------------------------------------------------------------------------------------------
# matting and boundary metrics (evaluate.extra_metrics)

#: ``evaluate.extra_metrics`` names and the set metrics each adds, in this order.
EXTRA_METRICS: dict[str, tuple[str, ...]] = {"mse": ("MSE",), "mba": ("mBA",), "biou": ("maxBIoU", "meanBIoU")}
#: Every set metric the extra metrics can add, in order (after :data:`METRIC_KEYS`).
EXTRA_METRIC_KEYS: tuple[str, ...] = tuple(key for keys in EXTRA_METRICS.values() for key in keys)
#: Boundary IoU band width as a fraction of the image diagonal (Cheng et al., CVPR 2021).
BIOU_DILATION_RATIO = 0.02
#: Radii of the mean boundary accuracy (CascadePSP, Cheng et al., CVPR 2020).
MBA_STEPS = 5


@dataclass(frozen=True)
class ExtraScores:
    """The extra metrics of one pair; a field is None when it was not asked for.

    Attributes:
        mse: mean squared error on the soft maps.
        mba: mean boundary accuracy; NaN when the ground truth has no boundary (all background or all
            foreground), where it is undefined.
        biou_curve: ``(256,)`` float64 boundary IoU per threshold ``t`` in ``0..255`` (``pred8 >= t``).
    """

    mse: float | None = None
    mba: float | None = None
    biou_curve: np.ndarray | None = field(default=None, repr=False)

    def values(self) -> dict[str, float]:
        """Per-image scalars under the set metric names: ``MSE``, ``mBA``, ``maxBIoU``/``meanBIoU`` (of this
        image's own curve), for the metrics computed."""
        out: dict[str, float] = {}
        if self.mse is not None:
            out["MSE"] = self.mse
        if self.mba is not None:
            out["mBA"] = self.mba
        if self.biou_curve is not None:
            out["maxBIoU"] = float(self.biou_curve.max())
            out["meanBIoU"] = float(self.biou_curve.mean())
        return out


def check_extra_names(names: Iterable[str]) -> list[str]:
    """The names, duplicates dropped, in the order given.

    Raises:
        ValueError: a name that is not a key of :data:`EXTRA_METRICS`.
    """
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in EXTRA_METRICS]
    if unknown:
        raise ValueError(f"unknown extra metric(s) {unknown}: expected any of {', '.join(EXTRA_METRICS)}")
    return names


def _unit_map(image: np.ndarray) -> np.ndarray:
    """A 2-D map as float64 in [0, 1]: uint8 / 255, bool as 0/1, float clipped, other integers clipped / 255."""
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[..., 0]
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D map, got shape {image.shape}")
    if image.dtype == bool:
        return image.astype(np.float64)
    if np.issubdtype(image.dtype, np.floating):
        return np.clip(image.astype(np.float64), 0.0, 1.0)
    return np.clip(image, 0, 255).astype(np.float64) / 255


def mse(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean squared error ``mean((p - g)^2)`` between the soft maps, as matting benchmarks report it.

    ``p`` is the 8-bit prediction at the ground truth's size divided by 255 (no min-max normalisation) and ``g``
    the ground truth **kept soft** (an alpha matte: uint8 / 255, float as is); so unlike this module's MAE, which
    follows PySODMetrics (binarised ground truth, normalised prediction), a perfect soft prediction scores 0 on
    matting data. Upstream BiRefNet's MSE is the PySODMetrics-style variant.

    Args:
        pred: ``(h, w)`` prediction as in :func:`score_image`.
        gt: ``(H, W)`` ground truth: uint8, bool or float in [0, 1].
    """
    pred8, _ = _prepare(pred, gt)
    diff = pred8.astype(np.float64) / 255 - _unit_map(gt)
    return float(np.mean(diff * diff))


def mba_radii(height: int, width: int) -> list[int]:
    """The CascadePSP radii: ``1 + int((r_max - 1) * i / 5)`` for ``i = 0..4`` with ``r_max = (H + W) / 300``.

    Five radii from 1 towards ``(H + W) / 300`` (truncated; all 1 below 600 pixels of height + width).
    """
    top = (height + width) / 300
    return [1 + int((top - 1) / MBA_STEPS * i) for i in range(MBA_STEPS)]


def mean_boundary_accuracy(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean boundary accuracy, mBA (CascadePSP: Cheng et al., "CascadePSP", CVPR 2020).

    Both maps are binarised at ``> 128`` (8-bit; the prediction at the ground truth's size). For each radius
    ``r`` of :func:`mba_radii`, the band is the morphological gradient (dilation minus erosion) of the ground
    truth with an elliptic ``(2r + 1)`` kernel (OpenCV's ``MORPH_ELLIPSE``; image borders are not boundaries), and
    the accuracy is the fraction of band pixels where the prediction equals the ground truth. mBA is the mean over
    the five radii. A straight ground-truth edge gives a band of ``2r`` pixels across it, so a prediction whose edge
    is one pixel off scores ``1 - 1 / (2r)`` at radius ``r``.

    Returns:
        mBA in [0, 1]; NaN when the ground truth has no boundary (every band is empty).
    """
    pred8, gt_mask = _prepare(pred, gt)
    pred_mask = pred8 > GT_THRESHOLD
    gt8 = gt_mask.astype(np.uint8)
    accuracies = []
    for radius in mba_radii(*gt_mask.shape):
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        band = cv2.morphologyEx(gt8, cv2.MORPH_GRADIENT, kernel) > 0
        count = int(band.sum())
        if not count:
            return float("nan")
        accuracies.append(int((pred_mask[band] == gt_mask[band]).sum()) / count)
    return float(np.mean(accuracies))


def biou_dilation(height: int, width: int, ratio: float = BIOU_DILATION_RATIO) -> int:
    """Boundary width ``d = max(1, round(ratio * sqrt(H^2 + W^2)))`` in pixels (Boundary IoU's convention)."""
    return max(1, int(round(ratio * float(np.hypot(height, width)))))


def _erode_zero_padded(values: np.ndarray, dilation: int, fill: int) -> np.ndarray:
    """Minimum over the ``(2d + 1)`` square around each pixel, with ``fill`` outside the image."""
    padded = cv2.copyMakeBorder(values, dilation, dilation, dilation, dilation, cv2.BORDER_CONSTANT, value=fill)
    kernel = np.ones((2 * dilation + 1, 2 * dilation + 1), np.uint8)
    return cv2.erode(padded, kernel)[dilation:-dilation, dilation:-dilation]


def mask_boundary(mask: np.ndarray, dilation: int) -> np.ndarray:
    """Inner boundary of a binary mask: its pixels within chessboard distance ``dilation`` of the outside.

    The outside includes everything beyond the image (Boundary IoU pads with background, so an object cut by the
    image border has a boundary there). Equals ``mask`` minus its erosion by a ``(2d + 1)`` square.

    Args:
        mask: ``(H, W)`` bool.
        dilation: ``d`` in pixels (>= 1).

    Returns:
        ``(H, W)`` bool.
    """
    mask8 = mask.astype(np.uint8)
    return mask & ~(_erode_zero_padded(mask8, dilation, 0) > 0)


def boundary_iou_curve(pred: np.ndarray, gt: np.ndarray, ratio: float = BIOU_DILATION_RATIO) -> np.ndarray:
    """Boundary IoU (Cheng et al., "Boundary IoU", CVPR 2021) at every 8-bit threshold.

    ``BIoU = |G_b & P_b| / |G_b | P_b|`` where ``X_b`` is the inner boundary of mask ``X`` of width
    ``d = biou_dilation(H, W, ratio)`` (:func:`mask_boundary`: mask pixels within ``d`` of the outside, the image
    border counting as outside). ``G`` is the ground truth binarised at ``> 128``; ``P_t`` is the 8-bit prediction
    (at the ground truth's size, **not** min-max normalised) binarised at ``>= t`` for ``t = 0..255``, the
    thresholds of this module's F/E curves. Two empty boundaries give 1. ``t = 0`` takes the whole image as
    foreground (its boundary is the frame of width ``d``).

    Computed exactly without 256 erosions: binarising commutes with erosion, so pixel ``x`` is on ``P_t``'s
    boundary exactly when ``m(x) < t <= p(x)``, with ``m`` the minimum of ``p`` over the ``(2d + 1)`` square (-1
    outside the image); the boundary sizes per threshold are then cumulative counts. (Upstream BiRefNet instead
    erodes the grey prediction once and thresholds the grey difference, and normalises the prediction first.)

    Args:
        pred: ``(h, w)`` prediction as in :func:`score_image`.
        gt: ``(H, W)`` ground truth.
        ratio: band width as a fraction of the image diagonal.

    Returns:
        ``(256,)`` float64 in [0, 1], by ascending threshold.
    """
    pred8, gt_mask = _prepare(pred, gt)
    dilation = biou_dilation(*gt_mask.shape, ratio=ratio)
    gt_boundary = mask_boundary(gt_mask, dilation)
    values = pred8.astype(np.int16)
    lowest = _erode_zero_padded(values, dilation, -1)
    on_boundary = lowest < values  # pixels on some threshold's boundary: thresholds lowest + 1 .. value
    start, stop = lowest[on_boundary] + 1, values[on_boundary] + 1
    inside = gt_boundary[on_boundary]
    bins = NUM_THRESHOLDS + 1

    def sizes(first: np.ndarray, last: np.ndarray) -> np.ndarray:
        steps = np.bincount(first, minlength=bins) - np.bincount(last, minlength=bins)
        return np.cumsum(steps)[:NUM_THRESHOLDS].astype(np.float64)

    pred_sizes = sizes(start, stop)
    intersections = sizes(start[inside], stop[inside])
    unions = float(gt_boundary.sum()) + pred_sizes - intersections
    return np.divide(intersections, unions, out=np.ones(NUM_THRESHOLDS), where=unions > 0)


def score_extra(pred: np.ndarray, gt: np.ndarray, names: Iterable[str]) -> ExtraScores:
    """The extra metrics ``names`` (keys of :data:`EXTRA_METRICS`) of one pair.

    ``mse``: :func:`mse`; ``mba``: :func:`mean_boundary_accuracy`; ``biou``: :func:`boundary_iou_curve`
    (per set, ``maxBIoU`` and ``meanBIoU`` are the max and mean of the image-averaged curve, as the F-measure).

    Args:
        pred: ``(h, w)`` prediction as in :func:`score_image`.
        gt: ``(H, W)`` ground truth.
        names: which metrics.

    Raises:
        ValueError: an unknown name, or maps as :func:`score_image` refuses.
    """
    names = check_extra_names(names)
    return ExtraScores(
        mse=mse(pred, gt) if "mse" in names else None,
        mba=mean_boundary_accuracy(pred, gt) if "mba" in names else None,
        biou_curve=boundary_iou_curve(pred, gt) if "biou" in names else None,
    )


def extra_metrics(pred: np.ndarray, gt: np.ndarray, names: Iterable[str]) -> dict[str, float]:
    """The extra metrics of one pair as ``{"MSE", "mBA", "maxBIoU", "meanBIoU"}`` (those asked for).

    Args:
        pred: ``(h, w)`` prediction as in :func:`score_image`.
        gt: ``(H, W)`` ground truth.
        names: keys of :data:`EXTRA_METRICS`.
    """
    return score_extra(pred, gt, names).values()


def reduce_extra(scores: Sequence[ExtraScores]) -> dict[str, float]:
    """Set values of the extra metrics every image has: ``MSE`` (mean), ``mBA`` (mean over the images whose
    ground truth has a boundary; absent when none has), ``maxBIoU``/``meanBIoU`` (max/mean of the mean curve)."""
    out: dict[str, float] = {}
    if scores and all(s.mse is not None for s in scores):
        out["MSE"] = float(np.mean([s.mse for s in scores]))
    if scores and all(s.mba is not None for s in scores):
        defined = [s.mba for s in scores if s.mba is not None and not np.isnan(s.mba)]
        if defined:
            out["mBA"] = float(np.mean(defined))
    if scores and all(s.biou_curve is not None for s in scores):
        curve = np.mean(np.stack([s.biou_curve for s in scores]), axis=0)  # type: ignore[misc]
        out["maxBIoU"], out["meanBIoU"] = float(curve.max()), float(curve.mean())
    return out
