"""HCE as the DIS benchmark defines it: hand-made cases with known answers, and the DIS reference algorithm."""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest

from birefnet.evaluation.hce import HCEParts, missed_skeleton, relax_hce
from birefnet.evaluation.metrics import score_image
from tests.evaluation.evaluation_corpus import make_corpus


def test_perfect_prediction_costs_nothing() -> None:
    gt = np.zeros((64, 64), bool)
    gt[10:40, 10:40] = True
    gt[50, 5:60] = True
    assert relax_hce(gt, gt) == HCEParts(0, 0, 0, 0)
    assert relax_hce(np.zeros_like(gt), np.zeros_like(gt)).total == 0


def test_small_errors_are_relaxed_away() -> None:
    # a 10x10 false blob vanishes after 5 erosions by disk(1): within the relax tolerance
    gt = np.zeros((80, 80), bool)
    gt[10:40, 10:40] = True
    pred = gt.copy()
    pred[60:70, 60:70] = True
    assert relax_hce(pred, gt).total == 0


def test_spurious_blob_far_from_the_object_is_one_independent_region() -> None:
    # no boundary point of the blob touches the object (or a false negative), so it is one region to delete
    gt = np.zeros((100, 100), bool)
    gt[10:40, 10:40] = True
    pred = gt.copy()
    pred[60:80, 60:80] = True
    assert relax_hce(pred, gt) == HCEParts(0, 1, 0, 0)


def test_blob_attached_to_the_object_costs_its_shared_edge() -> None:
    # the false part's edge against the true positive is one straight polyline: 2 control points
    gt = np.zeros((80, 80), bool)
    gt[20:60, 10:30] = True
    pred = gt.copy()
    pred[30:50, 30:50] = True
    assert relax_hce(pred, gt) == HCEParts(2, 0, 0, 0)


def test_missing_thin_wire_costs_its_two_end_points() -> None:
    # a 1-pixel wire is eroded away by the relaxation but kept by the GT skeleton: one straight polyline
    gt = np.zeros((80, 100), bool)
    gt[10:30, 10:30] = True
    gt[60, 10:90] = True
    pred = np.zeros_like(gt)
    pred[10:30, 10:30] = True
    assert relax_hce(pred, gt) == HCEParts(0, 0, 2, 0)


def test_region_covering_the_whole_image_counts_zero_as_upstream() -> None:
    # the official code counts independent regions as len(unique(labels)) - 1: a full mask has no background
    gt = np.zeros((30, 30), bool)
    assert relax_hce(np.ones_like(gt), gt).total == 0


def test_binarisation_is_strictly_above_128_on_raw_values() -> None:
    gt = np.zeros((60, 60), np.uint8)
    gt[10:30, 10:30] = 255
    pred = gt.copy()
    pred[40:58, 40:58] = 128  # not foreground
    assert score_image(pred, gt).hce == 0
    pred[40:58, 40:58] = 129  # foreground: a far spurious region
    assert score_image(pred, gt).hce == 1
    # no min-max stretch first (PySODMetrics' own HCE stretches): a faint map stays background
    assert score_image((gt // 4).astype(np.uint8), gt).hce == relax_hce(np.zeros((60, 60), bool), gt > 128).total


def test_missed_skeleton_equals_full_skeletonize() -> None:
    from skimage.morphology import skeletonize

    rng = np.random.default_rng(0)
    for _ in range(20):
        gt = cv2.GaussianBlur(rng.random((70, 90)), (0, 0), 3) > 0.5
        fn = gt & (rng.random(gt.shape) < 0.3)
        np.testing.assert_array_equal(missed_skeleton(gt, fn), skeletonize(gt) & fn)


def _dis_reference(pred: np.ndarray, gt: np.ndarray) -> float:
    """The DIS algorithm with its per-point loop, as PySODMetrics transcribes it (fed binary inputs)."""
    import py_sod_metrics as sod

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(sod.HumanCorrectionEffortMeasure().cal_hce(pred.astype(np.float64), gt))


def _random_pairs(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(5)
    pairs = []
    for _ in range(n):
        h, w = rng.integers(8, 70, 2)
        gt = cv2.GaussianBlur(rng.random((h, w)), (0, 0), rng.uniform(0.5, 3))
        gt = gt > np.median(gt)
        if rng.random() < 0.5:
            pred = gt ^ (rng.random((h, w)) < 0.05)
        else:
            pred = cv2.GaussianBlur(rng.random((h, w)), (0, 0), rng.uniform(0.5, 3))
            pred = pred > np.median(pred)
        pairs.append((pred, gt))
    return pairs


def test_matches_the_dis_reference_on_corpus_and_random_masks() -> None:
    pairs = []
    for _, pred, gt in make_corpus(seed=0) + make_corpus(seed=3):
        if pred.shape != gt.shape:
            pred = cv2.resize(pred, gt.shape[::-1], interpolation=cv2.INTER_LINEAR)
        pairs.append((pred > 128, gt > 128))
    for pred, gt in pairs + _random_pairs(80):
        if pred.all() or gt.all():  # the reference counts a full-image region as 1 (see test above)
            continue
        assert relax_hce(pred, gt).total == _dis_reference(pred, gt)


@pytest.mark.slow
def test_matches_the_dis_reference_on_large_images() -> None:
    for seed in range(3):
        _, pred, gt = make_corpus(seed=seed, large=True)[-1]
        pred = cv2.resize(pred, gt.shape[::-1], interpolation=cv2.INTER_LINEAR) > 128
        assert relax_hce(pred, gt > 128).total == _dis_reference(pred, gt > 128)
