"""Parity of the metric suite with PySODMetrics, plus robustness of the inputs."""

from __future__ import annotations

import math
import warnings

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


def capped_e_oracle(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, object]:
    """PySODMetrics' E-measure per image capped at 1 (its ``/(size - 1)`` exceeds 1 near a perfect map), then
    reduced over the set as PySODMetrics reduces it."""
    import py_sod_metrics as sod

    curves, adaptive = [], []
    for pred, gt in pairs:
        if pred.shape != gt.shape:
            pred = cv2.resize(pred, gt.shape[::-1], interpolation=cv2.INTER_LINEAR)
        metric = sod.Emeasure()
        metric.step(pred=pred, gt=gt)
        result = metric.get_results()["em"]
        curves.append(np.minimum(result["curve"][::-1], 1.0))
        adaptive.append(min(float(result["adp"]), 1.0))
    curve = np.mean(curves, axis=0)
    return {"maxE": float(curve.max()), "meanE": float(curve.mean()), "adpE": float(np.mean(adaptive)),
            "emeasure": curve}


def assert_matches_oracle(pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    ours = score_set(pairs, hce=False)
    ref = oracle(pairs) | capped_e_oracle(pairs)
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


# --- degenerate sizes: 1x1, 1xN, Nx1 ---------------------------------------------------------------------------

TINY_SHAPES = [(1, 1), (1, 2), (2, 1), (1, 7), (7, 1), (1, 64), (64, 1), (2, 2), (3, 3)]


def _tiny_pairs(shape: tuple[int, int], seed: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Prediction/ground-truth combinations on one small shape: perfect, inverted, constant, random."""
    rng = np.random.default_rng(seed)
    h, w = shape
    random_gt = (rng.random(shape) > 0.5).astype(np.uint8) * 255
    cases = []
    for gt_name, gt in (("gt0", np.zeros(shape, np.uint8)), ("gt255", np.full(shape, 255, np.uint8)),
                        ("gtrand", random_gt)):
        cases += [
            (f"{gt_name}-perfect", gt.copy(), gt),
            (f"{gt_name}-inverted", 255 - gt, gt),
            (f"{gt_name}-const0", np.zeros(shape, np.uint8), gt),
            (f"{gt_name}-const255", np.full(shape, 255, np.uint8), gt),
            (f"{gt_name}-const77", np.full(shape, 77, np.uint8), gt),
            (f"{gt_name}-random", rng.integers(0, 256, shape).astype(np.uint8), gt),
        ]
    return cases


@pytest.mark.parametrize("shape", TINY_SHAPES, ids=[f"{h}x{w}" for h, w in TINY_SHAPES])
def test_tiny_images_scores_in_unit_range_and_equal_pysodmetrics(shape: tuple[int, int]) -> None:
    """E-measure on 1x1 was 2.25e15 (division by ``size - 1``); every score must stay in [0, 1] for any size."""
    import py_sod_metrics as sod

    for name, pred, gt in _tiny_pairs(shape, seed=sum(shape)):
        scores = score_image(pred, gt)
        for key, value in (("sm", scores.sm), ("mae", scores.mae), ("wfm", scores.wfm), ("adp_fm", scores.adp_fm),
                           ("adp_em", scores.adp_em)):
            assert math.isfinite(value) and 0.0 <= value <= 1.0, (name, key, value)
        for key, curve in (("em", scores.em_curve), ("fm", scores.fm_curve), ("p", scores.precision),
                           ("r", scores.recall)):
            assert np.all(np.isfinite(curve)) and curve.min() >= 0.0 and curve.max() <= 1.0, (name, key)
        assert scores.hce is not None and math.isfinite(scores.hce) and scores.hce >= 0, name
        # equal to PySODMetrics wherever it is defined (finite; E capped at 1)
        ref_e = capped_e_oracle([(pred, gt)])
        np.testing.assert_allclose(scores.em_curve, ref_e["emeasure"], atol=TOL, err_msg=name)
        assert scores.adp_em == pytest.approx(ref_e["adpE"], abs=TOL), name
        for metric, key, ours in ((sod.Smeasure(), "sm", scores.sm), (sod.WeightedFmeasure(), "wfm", scores.wfm),
                                  (sod.MAE(), "mae", scores.mae)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # PySODMetrics' mean of an empty quadrant
                metric.step(pred=pred, gt=gt)
                ref = float(metric.get_results()[key])
            if math.isfinite(ref):
                assert ours == pytest.approx(ref, abs=TOL), (name, key)


def test_one_pixel_e_measure_is_zero_or_one() -> None:
    # (pred, gt, best E over thresholds, adaptive E); an all-zero map has adaptive threshold 0, so it is all
    # foreground there (PySODMetrics' convention) and scores 0 on an empty ground truth
    for pred_value, gt_value, best, adaptive in ((255, 255, 1.0, 1.0), (0, 0, 1.0, 0.0), (0, 255, 1.0, 1.0),
                                                 (255, 0, 0.0, 0.0)):
        scores = score_image(np.full((1, 1), pred_value, np.uint8), np.full((1, 1), gt_value, np.uint8))
        assert scores.adp_em == adaptive, (pred_value, gt_value)
        assert scores.em_curve.max() == best and scores.em_curve.min() >= 0.0, (pred_value, gt_value)


@pytest.mark.parametrize("seed", range(6))
def test_random_small_cases_equal_pysodmetrics(seed: int) -> None:
    """Random small shapes (including single rows/columns) reduced as a set: equal to PySODMetrics (E capped)."""
    rng = np.random.default_rng(100 + seed)
    pairs = []
    for _ in range(8):
        h, w = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        gt = (rng.random((h, w)) > rng.random()).astype(np.uint8) * 255
        pred = rng.integers(0, 256, (h, w)).astype(np.uint8)
        pairs.append((pred, gt))
    ours = score_set(pairs, hce=False)
    ref = capped_e_oracle(pairs)
    for key in ("maxE", "meanE", "adpE"):
        assert 0.0 <= ours.metrics[key] <= 1.0
        assert ours.metrics[key] == pytest.approx(ref[key], abs=TOL), key
    np.testing.assert_allclose(ours.curves["emeasure"], ref["emeasure"], atol=TOL)


@pytest.mark.parametrize("pred_shape,gt_shape", [((0, 5), (0, 5)), ((0, 5), (3, 5)), ((3, 5), (5, 0))])
def test_empty_maps_are_refused_with_their_shapes(pred_shape: tuple[int, int], gt_shape: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="empty map"):
        score_image(np.zeros(pred_shape, np.uint8), np.zeros(gt_shape, np.uint8))
    with pytest.raises(ValueError, match="empty map"):
        s_measure(np.zeros(pred_shape, np.uint8), np.zeros(gt_shape, np.uint8))
