"""Benchmark: the evaluation suite (ours) against PySODMetrics plus the DIS HCE loop, side by side.

Scores the same synthetic DIS-like pairs (filled shapes, holes, thin wires; soft predictions with missed
parts and spurious blobs) with both implementations in one process and one thread, checks that the values
agree, and prints the median CPU time per image of each metric group and the ratio.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/metrics.py --n 200 --size 1024
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from collections.abc import Callable, Sequence

import cv2
import numpy as np


def make_pair(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A DIS-like ``(pred, gt)`` pair of ``(size, size)`` uint8 maps."""
    gt = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        center = (int(rng.integers(size // 4, 3 * size // 4)), int(rng.integers(size // 4, 3 * size // 4)))
        axes = (int(rng.integers(size // 16, size // 4)), int(rng.integers(size // 16, size // 4)))
        cv2.ellipse(gt, center, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
    for _ in range(int(rng.integers(5, 15))):  # holes
        center = (int(rng.integers(0, size)), int(rng.integers(0, size)))
        cv2.circle(gt, center, int(rng.integers(3, size // 40)), 0, -1)
    for _ in range(int(rng.integers(10, 40))):  # wires
        p0 = (int(rng.integers(0, size)), int(rng.integers(0, size)))
        p1 = (int(rng.integers(0, size)), int(rng.integers(0, size)))
        cv2.line(gt, p0, p1, 255, int(rng.integers(1, 4)))
    pred = gt.astype(np.float32)
    keep = cv2.resize((rng.random((6, 6)) > 0.15).astype(np.float32), (size, size), interpolation=cv2.INTER_NEAREST)
    pred *= keep  # missed parts
    for _ in range(int(rng.integers(0, 4))):  # spurious blobs
        cv2.circle(pred, (int(rng.integers(0, size)), int(rng.integers(0, size))), int(rng.integers(5, size // 20)),
                   255, -1)
    pred = cv2.GaussianBlur(pred, (0, 0), float(rng.uniform(0.8, 2.5)))
    pred += rng.normal(0, 8, pred.shape).astype(np.float32)
    return np.clip(pred, 0, 255).astype(np.uint8), gt


def reference_suite() -> tuple[dict[str, Callable[[np.ndarray, np.ndarray], None]], Callable[[], dict[str, float]]]:
    """PySODMetrics' S, F, wF, E, MAE and the DIS HCE loop (PySODMetrics' transcription, fed DIS's binarisation)."""
    import py_sod_metrics as sod

    warnings.simplefilter("ignore")
    fm, em, sm, wfm, mae = sod.Fmeasure(), sod.Emeasure(), sod.Smeasure(), sod.WeightedFmeasure(), sod.MAE()
    hce_ref = sod.HumanCorrectionEffortMeasure()
    hces: list[float] = []

    def hce(pred: np.ndarray, gt: np.ndarray) -> None:
        hces.append(float(hce_ref.cal_hce((pred > 128).astype(np.float64), gt > 128)))

    steps = {"S": sm.step, "F": fm.step, "E": em.step, "wF": wfm.step, "MAE": mae.step, "HCE": hce}

    def results() -> dict[str, float]:
        f, e = fm.get_results(), em.get_results()
        return {"Sm": float(sm.get_results()["sm"]), "maxF": float(f["fm"]["curve"].max()),
                "meanF": float(f["fm"]["curve"].mean()), "adpF": float(f["fm"]["adp"]),
                "wF": float(wfm.get_results()["wfm"]), "maxE": float(e["em"]["curve"].max()),
                "meanE": float(e["em"]["curve"].mean()), "adpE": float(e["em"]["adp"]),
                "MAE": float(mae.get_results()["mae"]), "HCE": float(np.mean(hces))}

    return steps, results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="image pairs")
    parser.add_argument("--size", type=int, default=1024, help="side of the square maps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if os.environ.get("OMP_NUM_THREADS") != "1":
        print("note: set OMP_NUM_THREADS=1 for single-thread numbers")
    cv2.setNumThreads(1)

    from birefnet.evaluation.hce import relax_hce
    from birefnet.evaluation.metrics import MetricAccumulator, score_image

    rng = np.random.default_rng(args.seed)
    steps, reference_results = reference_suite()
    accumulator = MetricAccumulator()
    ours_total, ours_no_hce, ours_hce, ref_total = [], [], [], []
    ref_groups: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.n):
        pred, gt = make_pair(rng, args.size)
        t0 = time.process_time()
        scores = score_image(pred, gt)
        ours_total.append(time.process_time() - t0)
        accumulator.update(scores)
        t0 = time.process_time()
        score_image(pred, gt, hce=False)
        ours_no_hce.append(time.process_time() - t0)
        t0 = time.process_time()
        relax_hce(pred > 128, gt > 128)
        ours_hce.append(time.process_time() - t0)
        t_ref = 0.0
        for name, step in steps.items():
            t0 = time.process_time()
            step(pred, gt)
            dt = time.process_time() - t0
            ref_groups[name].append(dt)
            t_ref += dt
        ref_total.append(t_ref)

    ours, ref = accumulator.compute().metrics, reference_results()
    worst = max(abs(ours[k] - ref[k]) for k in ref)
    ms = 1000.0
    print(f"{args.n} pairs at {args.size}x{args.size}, 1 thread, median CPU ms per image")
    print(f"{'':28s}{'ours':>10s}{'reference':>11s}{'ratio':>8s}")
    ref_no_hce = [t - h for t, h in zip(ref_total, ref_groups["HCE"], strict=True)]
    rows = [("full suite (S,F,E,wF,MAE,HCE)", ours_total, ref_total), ("without HCE", ours_no_hce, ref_no_hce),
            ("HCE", ours_hce, ref_groups["HCE"])]
    for label, a, b in rows:
        print(f"{label:28s}{np.median(a) * ms:10.1f}{np.median(b) * ms:11.1f}{np.median(b) / np.median(a):7.1f}x")
    print("reference by metric: " + ", ".join(f"{k} {np.median(v) * ms:.1f}" for k, v in ref_groups.items()))
    print(f"max |ours - reference| over set metrics: {worst:.2e}")
    print(" ".join(f"{k}={ours[k]:.4f}" for k in ref))
    return 0 if worst <= 1e-6 else 1


if __name__ == "__main__":
    raise SystemExit(main())
