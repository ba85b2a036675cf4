"""The extra metrics (``evaluate.extra_metrics``): MSE, mean boundary accuracy and boundary IoU on hand-made cases.

Hand computations (64 x 64 images unless stated): the boundary IoU width is ``d = round(0.02 * 90.5) = 2``; every
mBA radius is 1 ((64 + 64) / 300 < 1), whose elliptic 3x3 kernel is a cross.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from birefnet.config import EvaluateParams, ParamsError, load_params
from birefnet.evaluation import EXTRA_METRICS, MetricAccumulator, extra_metrics, score_extra, score_image
from birefnet.evaluation.metrics import (
    METRIC_KEYS,
    biou_dilation,
    boundary_iou_curve,
    mba_radii,
    mean_boundary_accuracy,
    mse,
    reduce_extra,
)

ALL = list(EXTRA_METRICS)


def left_half(columns: int = 32, size: int = 64) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[:, :columns] = 255
    return mask


def square(side: int = 10, at: int = 20, size: int = 64) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[at : at + side, at : at + side] = 255
    return mask


def brute_force_biou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """256 binarisations, each boundary by iterated 3x3 erosion with background beyond the border (the paper's
    reference procedure)."""
    dilation = biou_dilation(*gt.shape)

    def boundary(mask: np.ndarray) -> np.ndarray:
        eroded = ndimage.binary_erosion(mask, structure=np.ones((3, 3)), iterations=dilation, border_value=0)
        return mask & ~eroded

    gt_boundary = boundary(gt > 128)
    out = []
    for t in range(256):
        pred_boundary = boundary(pred >= t)
        union = (gt_boundary | pred_boundary).sum()
        out.append(1.0 if union == 0 else (gt_boundary & pred_boundary).sum() / union)
    return np.array(out)


# ------------------------------------------------------------------------------------------------ perfect


def test_perfect_prediction() -> None:
    gt = left_half()
    values = extra_metrics(gt, gt, ALL)
    assert values["MSE"] == 0.0 and values["mBA"] == 1.0
    curve = boundary_iou_curve(gt, gt)
    # t >= 1: the prediction is the GT; t = 0 takes the whole image: its boundary is the 2-wide frame (496 px),
    # the GT's 368 px (see the shifted case) meet it in 248 px -> 248 / (368 + 496 - 248)
    assert (curve[1:] == 1.0).all()
    assert curve[0] == pytest.approx(248 / 616)
    assert values["maxBIoU"] == 1.0 and values["meanBIoU"] == pytest.approx((255 + 248 / 616) / 256)


def test_perfect_soft_prediction_has_zero_mse_against_the_soft_alpha() -> None:
    alpha = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (8, 1))  # a 64-level ramp
    assert mse(alpha, alpha) == 0.0
    # the same map as float GT in [0, 1] is read as is (not thresholded)
    assert mse(alpha, alpha.astype(np.float64) / 255) == pytest.approx(0.0, abs=1e-30)
    # a constant 0.5 alpha against 8-bit 128: (128/255 - 0.5)^2
    assert mse(np.full((4, 4), 128, np.uint8), np.full((4, 4), 0.5)) == pytest.approx((128 / 255 - 0.5) ** 2)


# -------------------------------------------------------------------------------------------------- empty


def test_empty_prediction_of_a_square() -> None:
    gt, empty = square(), np.zeros((64, 64), np.uint8)
    values = extra_metrics(empty, gt, ALL)
    assert values["MSE"] == pytest.approx(100 / 4096)
    # radius 1 (cross): the band is the 40 px ring outside the 10 x 10 square (4 x 10, no corners) and the 36 px
    # inner ring; an empty prediction is right on the outside only
    assert values["mBA"] == pytest.approx(40 / 76)
    # t >= 1: no predicted boundary (IoU 0); t = 0: the image frame, far from the square (IoU 0)
    assert values["maxBIoU"] == 0.0 and values["meanBIoU"] == 0.0


def test_empty_ground_truth() -> None:
    empty = np.zeros((64, 64), np.uint8)
    values = extra_metrics(empty, empty, ALL)
    assert values["MSE"] == 0.0
    assert math.isnan(values["mBA"])  # no GT boundary: undefined
    curve = boundary_iou_curve(empty, empty)
    assert curve[0] == 0.0 and (curve[1:] == 1.0).all()  # two empty boundaries agree
    # a false positive square: its boundary against none
    assert boundary_iou_curve(square(), empty)[1:].max() == 0.0


# ------------------------------------------------------------------------------------------ shifted boundary


def test_boundary_shifted_by_one_pixel() -> None:
    gt, pred = left_half(32), left_half(33)
    values = extra_metrics(pred, gt, ALL)
    assert values["MSE"] == pytest.approx(64 / 4096)  # one column of 64 wrong pixels
    # band: columns 31 (GT) and 32 (outside); the prediction is wrong on column 32
    assert values["mBA"] == pytest.approx(0.5)
    # d = 2, the image border counts as outside. GT boundary: rows 0-1 and 62-63 of columns 0-31 plus columns 0-1
    # and 30-31: 64*32 - 60*28 = 368. Prediction: 64*33 - 60*29 = 372. Shared: the 4 rows x 32 columns and
    # columns 0, 1, 31 of rows 2-61: 128 + 180 = 308. IoU = 308 / (368 + 372 - 308).
    curve = boundary_iou_curve(pred, gt)
    assert curve[1:] == pytest.approx(np.full(255, 308 / 432))
    assert curve[0] == pytest.approx(248 / 616)
    assert values["maxBIoU"] == pytest.approx(308 / 432)
    assert values["meanBIoU"] == pytest.approx((248 / 616 + 255 * 308 / 432) / 256)


def test_mba_radii_follow_cascadepsp() -> None:
    assert mba_radii(64, 64) == [1, 1, 1, 1, 1]
    assert mba_radii(300, 300) == [1, 1, 1, 1, 1]  # r_max = 2: 1 + int(0.2 i)
    assert mba_radii(600, 600) == [1, 1, 2, 2, 3]  # r_max = 4: 1 + int(0.6 i)
    assert mba_radii(1500, 1500) == [1, 2, 4, 6, 8]  # r_max = 10: 1 + int(1.8 i)


def test_mba_of_a_shifted_straight_edge_at_several_radii() -> None:
    # 600 x 600, edge one column off: radius r has a band of 2r columns, one of them wrong -> 1 - 1/(2r);
    # radii 1, 1, 2, 2, 3
    gt, pred = left_half(300, 600), left_half(301, 600)
    expected = np.mean([1 / 2, 1 / 2, 3 / 4, 3 / 4, 5 / 6])
    assert mean_boundary_accuracy(pred, gt) == pytest.approx(expected)


# ------------------------------------------------------------------------------------------- general maps


def test_boundary_iou_curve_equals_256_explicit_binarisations() -> None:
    rng = np.random.default_rng(0)
    for height, width in ((37, 53), (64, 29), (80, 80)):
        pred = np.clip(ndimage.gaussian_filter(rng.random((height, width)), 3) * 765 - 255, 0, 255).astype(np.uint8)
        gt = (ndimage.gaussian_filter(rng.random((height, width)), 4) > 0.5).astype(np.uint8) * 255
        np.testing.assert_allclose(boundary_iou_curve(pred, gt), brute_force_biou(pred, gt), rtol=0, atol=1e-12)


def test_prediction_is_resized_to_the_ground_truth() -> None:
    gt = left_half()
    small = gt[::2, ::2]  # 32 x 32, the same half
    values = extra_metrics(small, gt, ALL)
    assert values["MSE"] < 0.01 and values["mBA"] >= 0.5 and values["maxBIoU"] > 0.7


def test_unknown_name_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown extra metric"):
        score_extra(left_half(), left_half(), ["mse", "sad"])


# ------------------------------------------------------------------------------------- set reduction, params


def test_score_image_and_accumulator_add_the_extra_set_metrics() -> None:
    gt = left_half()
    shifted, perfect, empty = left_half(33), gt, np.zeros((64, 64), np.uint8)
    accumulator = MetricAccumulator()
    for pred, truth in ((shifted, gt), (perfect, gt), (empty, empty)):
        accumulator.update(score_image(pred, truth, hce=False, extra=["biou", "mba", "mse"]))
    metrics = accumulator.compute().metrics
    assert list(metrics)[-4:] == ["MSE", "mBA", "maxBIoU", "meanBIoU"]
    assert metrics["MSE"] == pytest.approx(64 / 4096 / 3)
    assert metrics["mBA"] == pytest.approx((0.5 + 1.0) / 2)  # the empty GT has no boundary: not averaged
    # max / mean of the image-averaged curve (as maxF / meanF), not of per-image maxima
    mean_curve = (boundary_iou_curve(shifted, gt) + boundary_iou_curve(perfect, gt)
                  + boundary_iou_curve(empty, empty)) / 3
    assert metrics["maxBIoU"] == pytest.approx(mean_curve.max())
    assert metrics["meanBIoU"] == pytest.approx(mean_curve.mean())


def test_without_extra_metrics_nothing_changes() -> None:
    scores = score_image(left_half(33), left_half(), hce=False)
    assert scores.extra is None
    accumulator = MetricAccumulator()
    accumulator.update(scores)
    assert list(accumulator.compute().metrics) == ["n", *[k for k in METRIC_KEYS if k != "HCE"]]


def test_mba_absent_from_a_set_whose_ground_truths_have_no_boundary() -> None:
    empty = np.zeros((16, 16), np.uint8)
    assert "mBA" not in reduce_extra([score_extra(empty, empty, ["mba"])])


def test_params_default_is_empty_and_names_are_checked() -> None:
    assert EvaluateParams().extra_metrics == []
    assert EvaluateParams(extra_metrics=["mse", "mba", "biou"]).extra_metrics == ALL
    params_file = Path(__file__).resolve().parents[2] / "params.yaml"
    assert load_params(params_file).evaluate.extra_metrics == []
    with pytest.raises(ParamsError, match="extra_metrics"):
        load_params(params_file, ["evaluate.extra_metrics=[mse, sad]"])
