"""Synthetic prediction/ground-truth pairs covering the metric suite's edge cases, and the PySODMetrics oracle."""

from __future__ import annotations

import warnings

import cv2
import numpy as np


def _blob_gt(rng: np.random.Generator, h: int, w: int, n_shapes: int = 3) -> np.ndarray:
    gt = np.zeros((h, w), np.uint8)
    for _ in range(n_shapes):
        center = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(2, max(3, w // 4))), int(rng.integers(2, max(3, h // 4))))
        cv2.ellipse(gt, center, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
    return gt


def _wires(rng: np.random.Generator, gt: np.ndarray, n: int, max_width: int = 2) -> np.ndarray:
    h, w = gt.shape
    for _ in range(n):
        p0 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.line(gt, p0, p1, 255, int(rng.integers(1, max_width + 1)))
    return gt


def _soft_prediction(rng: np.random.Generator, gt: np.ndarray, blur: float, noise: float,
                     drop: float = 0.0) -> np.ndarray:
    pred = gt.astype(np.float32)
    if drop:
        keep = cv2.resize((rng.random((8, 8)) > drop).astype(np.float32), gt.shape[::-1],
                          interpolation=cv2.INTER_NEAREST)
        pred *= keep
    if blur:
        pred = cv2.GaussianBlur(pred, (0, 0), blur)
    pred += rng.normal(0, noise * 255, gt.shape).astype(np.float32)
    return np.clip(pred, 0, 255).astype(np.uint8)


def make_corpus(seed: int = 0, large: bool = False) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Named ``(pred uint8, gt uint8)`` pairs; predictions are sometimes of another size than their GT."""
    rng = np.random.default_rng(seed)
    cases: list[tuple[str, np.ndarray, np.ndarray]] = []
    gt = _blob_gt(rng, 96, 128)
    cases.append(("soft_blobs", _soft_prediction(rng, gt, 2.0, 0.05), gt))
    gt = _wires(rng, np.zeros((120, 90), np.uint8), 12, 2)
    cases.append(("thin_wires", _soft_prediction(rng, gt, 1.0, 0.1, drop=0.3), gt))
    gt = _wires(rng, _blob_gt(rng, 100, 100, 2), 8, 1)
    cases.append(("wires_and_blobs_binary", (_soft_prediction(rng, gt, 1.5, 0.0) > 100).astype(np.uint8) * 255, gt))
    cases.append(("empty_gt_soft", _soft_prediction(rng, _blob_gt(rng, 64, 80, 1), 3.0, 0.05),
                  np.zeros((64, 80), np.uint8)))
    cases.append(("empty_gt_zero_pred", np.zeros((64, 80), np.uint8), np.zeros((64, 80), np.uint8)))
    cases.append(("full_gt_soft", _soft_prediction(rng, np.full((50, 70), 255, np.uint8), 0, 0.2),
                  np.full((50, 70), 255, np.uint8)))
    cases.append(("full_gt_full_pred", np.full((50, 70), 255, np.uint8), np.full((50, 70), 255, np.uint8)))
    gt = _blob_gt(rng, 80, 80)
    cases.append(("constant_pred_mid", np.full((80, 80), 77, np.uint8), gt))
    cases.append(("constant_pred_zero", np.zeros((80, 80), np.uint8), gt))
    cases.append(("constant_pred_full", np.full((80, 80), 255, np.uint8), gt))
    gt = np.zeros((90, 110), np.uint8)
    gt[40:42, 60:61] = 255
    gt[10, 10] = 255
    cases.append(("tiny_objects", _soft_prediction(rng, gt, 0.8, 0.02), gt))
    cases.append(("tiny_objects_missed", np.zeros((90, 110), np.uint8), gt))
    gt = _blob_gt(rng, 70, 150)
    cases.append(("non_square_resized", cv2.resize(_soft_prediction(rng, gt, 2, 0.05), (75, 35)), gt))
    gt = _blob_gt(rng, 64, 64)
    gt[gt > 0] = 128  # exactly 128 is background (> 128 binarisation)
    gt[20:40, 20:40] = 129
    cases.append(("gt_values_128", _soft_prediction(rng, gt, 1.0, 0.05), gt))
    gt = _blob_gt(rng, 72, 72)
    pred = _soft_prediction(rng, gt, 1.0, 0.0)
    pred[pred > 0] = np.maximum(pred[pred > 0], 3)
    cases.append(("two_level_pred", np.where(gt > 0, 200, 0).astype(np.uint8), gt))
    cases.append(("uint8_ramp", np.tile(np.arange(256, dtype=np.uint8), (40, 1)), _blob_gt(rng, 40, 256)))
    gt = np.zeros((60, 60), np.uint8)
    gt[:, :30] = 255
    cases.append(("half_plane_fp_blob", np.pad(np.full((10, 10), 255, np.uint8), ((40, 10), (40, 10))) | gt, gt))
    if large:
        gt = _wires(rng, _blob_gt(rng, 768, 1024, 4), 30, 3)
        cases.append(("large", cv2.resize(_soft_prediction(rng, gt, 2.0, 0.05, drop=0.2), (512, 384)), gt))
    return cases


def oracle(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Set metrics by PySODMetrics (predictions resized to GT size with cv2 bilinear first)."""
    import py_sod_metrics as sod

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fm, em, sm, wfm, mae = sod.Fmeasure(), sod.Emeasure(), sod.Smeasure(), sod.WeightedFmeasure(), sod.MAE()
        for pred, gt in pairs:
            if pred.shape != gt.shape:
                pred = cv2.resize(pred, gt.shape[::-1], interpolation=cv2.INTER_LINEAR)
            for metric in (fm, em, sm, wfm, mae):
                metric.step(pred=pred, gt=gt)
        f, e = fm.get_results(), em.get_results()
    return {
        "Sm": float(sm.get_results()["sm"]),
        "maxF": float(f["fm"]["curve"].max()),
        "meanF": float(f["fm"]["curve"].mean()),
        "adpF": float(f["fm"]["adp"]),
        "wF": float(wfm.get_results()["wfm"]),
        "maxE": float(e["em"]["curve"].max()),
        "meanE": float(e["em"]["curve"].mean()),
        "adpE": float(e["em"]["adp"]),
        "MAE": float(mae.get_results()["mae"]),
        "precision": f["pr"]["p"][::-1],
        "recall": f["pr"]["r"][::-1],
        "fmeasure": f["fm"]["curve"][::-1],
        "emeasure": e["em"]["curve"][::-1],
    }
