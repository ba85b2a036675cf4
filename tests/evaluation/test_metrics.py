"""Parity of the metric suite with PySODMetrics, plus robustness of the inputs."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt

from birefnet.evaluation.metrics import (
    _BAND_KERNEL,
    METRIC_KEYS,
    MetricAccumulator,
    _band_nearest,
    _foreground_distance,
    s_measure,
    score_image,
    score_set,
    to_uint8,
    weighted_fmeasure,
)
from tests.evaluation.evaluation_corpus import make_corpus, oracle

TOL = 1e-6
CORPUS = make_corpus(seed=0)
SCALARS = [k for k in METRIC_KEYS if k != "HCE"]
CURVES = ("precision", "recall", "fmeasure", "emeasure")


def assert_matches_oracle(pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    ours = score_set(pairs, hce=False)
    ref = oracle(pairs)
    for key in SCALARS:
        assert ours.metrics[key] == pytest.approx(ref[key], abs=TOL), key
    for key in CURVES:
        np.testing.assert_allclose(ours.curves[key], ref[key], atol=TOL, err_msg=key)


@pytest.mark.parametrize("name,pred,gt", CORPUS, ids=[c[0] for c in CORPUS])
def test_image_matches_pysodmetrics(name: str, pred: np.ndarray, gt: np.ndarray) -> None:
    assert_matches_oracle([(pred, gt)])


def test_set_matches_pysodmetrics() -> None:
    assert_matches_oracle([(p, g) for _, p, g in CORPUS] + [(p, g) for _, p, g in make_corpus(seed=1)])


def test_large_image_matches_pysodmetrics() -> None:
    name, pred, gt = make_corpus(seed=2, large=True)[-1]
    assert name == "large" and gt.shape == (768, 1024) and pred.shape == (384, 512)
    assert_matches_oracle([(pred, gt)])


def test_set_max_is_max_of_mean_curve_not_mean_of_maxima() -> None:
    pairs = [(p, g) for _, p, g in CORPUS[:4]]
    result = score_set(pairs, hce=False)
    per_image_max = np.mean([score_set([pair], hce=False).metrics["maxF"] for pair in pairs])
    assert result.metrics["maxF"] == pytest.approx(result.curves["fmeasure"].max())
    assert result.metrics["maxF"] <= per_image_max + 1e-12


def test_adaptive_threshold_on_a_value_tie() -> None:
    # p in {0, 1} with mean 0.5: the adaptive threshold 2 * mean is exactly a pixel value
    gt = np.zeros((64, 64), np.uint8)
    gt[:, :20] = 255
    pred = np.zeros((64, 64), np.uint8)
    pred[:32] = 255
    assert_matches_oracle([(pred, gt)])


def test_perfect_prediction() -> None:
    gt = np.zeros((80, 100), np.uint8)
    cv2.circle(gt, (50, 40), 25, 255, -1)
    cv2.line(gt, (0, 0), (99, 79), 255, 1)
    scores = score_image(gt, gt)
    assert scores.sm == pytest.approx(1.0)
    assert scores.mae == 0.0
    assert scores.wfm == pytest.approx(1.0, abs=1e-9)
    assert scores.fm_curve.max() == pytest.approx(1.0)
    assert scores.em_curve.max() == pytest.approx(1.0, abs=1e-3)
    assert scores.hce == 0


@pytest.mark.parametrize("value", [0, 255])
@pytest.mark.parametrize("gt_value", [0, 255])
def test_constant_maps_are_finite(value: int, gt_value: int) -> None:
    pred = np.full((40, 30), value, np.uint8)
    gt = np.full((40, 30), gt_value, np.uint8)
    scores = score_image(pred, gt)
    for v in (scores.sm, scores.mae, scores.wfm, scores.adp_fm, scores.adp_em, scores.hce):
        assert math.isfinite(v)
    assert scores.mae == (0.0 if value == gt_value else 1.0)
    assert_matches_oracle([(pred, gt)])


def test_foreground_in_last_column_is_finite() -> None:
    # PySODMetrics returns NaN here (an empty S-measure quadrant times weight 0); an empty quadrant counts 0
    gt = np.zeros((20, 20), np.uint8)
    gt[:, -1] = 255
    pred = np.full((20, 20), 100, np.uint8)
    pred[5, 5] = 200
    assert math.isfinite(s_measure(pred, gt))


def test_float_bool_and_uint8_inputs_agree() -> None:
    _, pred, gt = CORPUS[0]
    as_uint8 = score_image(pred, gt)
    sigmoid = pred.astype(np.float32) / 255 + np.float32(1e-4)  # above each 8-bit level, so truncation is exact
    as_float = score_image(sigmoid, gt.astype(np.float32) / 255)
    as_bool = score_image(pred, gt > 128)
    for other in (as_float, as_bool):
        for key in ("sm", "mae", "wfm", "adp_fm", "adp_em", "hce"):
            assert getattr(other, key) == getattr(as_uint8, key), key
    np.testing.assert_array_equal(to_uint8(np.array([[0.0, 0.5, 1.0, 1.5, -1.0]])), [[0, 127, 255, 255, 0]])
    np.testing.assert_array_equal(to_uint8(np.array([[True, False]])), [[255, 0]])


def test_prediction_is_resized_to_gt_with_bilinear() -> None:
    _, pred, gt = CORPUS[0]
    small = cv2.resize(pred, (50, 40), interpolation=cv2.INTER_AREA)
    resized = cv2.resize(small, gt.shape[::-1], interpolation=cv2.INTER_LINEAR)
    assert score_image(small, gt).sm == score_image(resized, gt).sm
    assert weighted_fmeasure(resized, gt) == score_image(small, gt).wfm


def test_accumulator_schema_and_curves() -> None:
    accumulator = MetricAccumulator()
    for _, pred, gt in CORPUS[:3]:
        accumulator.update(score_image(pred, gt))
    result = accumulator.compute()
    assert list(result.metrics) == ["n", *METRIC_KEYS]
    assert result.metrics["n"] == 3
    assert set(result.curves) == {"threshold", "precision", "recall", "fmeasure", "emeasure"}
    assert all(c.shape == (256,) for c in result.curves.values())
    assert np.all(np.diff(result.curves["recall"]) <= 1e-12)  # recall falls as the threshold rises
    with pytest.raises(ValueError):
        MetricAccumulator().compute()


def _tie_heavy_masks(seed: int) -> list[np.ndarray]:
    """Masks whose background pixels often have several nearest foreground pixels at the same distance."""
    rng = np.random.default_rng(seed)
    masks = []
    for step_y, step_x in ((2, 2), (3, 5), (4, 4), (7, 3)):
        lattice = np.zeros((41, 57), bool)
        lattice[1::step_y, 2::step_x] = True
        masks.append(lattice)
    for _ in range(6):
        masks.append(rng.random((int(rng.integers(9, 70)), int(rng.integers(9, 70)))) < rng.uniform(0.002, 0.2))
    wires = np.zeros((64, 80), np.uint8)
    for _ in range(5):
        p0, p1 = tuple(int(v) for v in rng.integers(0, 64, 2)), tuple(int(v) for v in rng.integers(0, 64, 2))
        cv2.line(wires, p0, p1, 1, int(rng.integers(1, 3)))
    masks.append(wires.astype(bool))
    return masks


@pytest.mark.parametrize("index", range(11))
def test_band_nearest_equals_scipy_feature_transform(index: int) -> None:
    """The local nearest-foreground search breaks ties exactly as scipy's exact feature transform does."""
    gt = _tie_heavy_masks(seed=3)[index]
    background = ~gt
    near_y, near_x = distance_transform_edt(background, return_distances=False, return_indices=True)
    band = cv2.dilate(gt.view(np.uint8), _BAND_KERNEL).view(bool) & background
    rows, cols = np.nonzero(band)
    ours_y, ours_x = _band_nearest(gt, rows, cols)
    np.testing.assert_array_equal(ours_y, near_y[rows, cols])
    np.testing.assert_array_equal(ours_x, near_x[rows, cols])


@pytest.mark.parametrize("index", range(11))
def test_foreground_distance_equals_scipy_bit_for_bit(index: int) -> None:
    gt = _tie_heavy_masks(seed=4)[index]
    np.testing.assert_array_equal(_foreground_distance(gt, ~gt), distance_transform_edt(~gt)[~gt])


def test_foreground_distance_beyond_float32_exactness_falls_back() -> None:
    """Distances of 4000 px and more (squared beyond float32's exact integers) come from scipy."""
    gt = np.zeros((3, 4100), bool)
    gt[1, 0] = True
    np.testing.assert_array_equal(_foreground_distance(gt, ~gt), distance_transform_edt(~gt)[~gt])
