"""Curves for ``dvc plots`` (CSV) and as PNGs, and the visual report of the hardest samples.

The report follows the paper's qualitative figures (Zheng et al., "Bilateral Reference for High-Resolution
Dichotomous Image Segmentation", CAAI AIR 2024, Fig. 1 and Fig. 5): for each of the hardest samples of a set,
one PNG with image | ground truth | prediction | error map at full width, and below it zoomed crops of the same
four panels where the ground truth has the most boundary / thin structure and the prediction the most error.

Error map colours: red = false positive (prediction above the ground truth), cyan = false negative; the
brightness is the size of the error.
"""

from __future__ import annotations

import csv
import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

#: Metric keys of the hardness ranking and whether a lower value is harder.
HARDNESS_LOWER_IS_WORSE: dict[str, bool] = {"Sm": True, "wF": True, "MAE": False, "HCE": False}

CURVE_FILES: dict[str, tuple[str, ...]] = {
    "pr": ("threshold", "recall", "precision"),
    "fmeasure": ("threshold", "fmeasure"),
    "emeasure": ("threshold", "emeasure"),
}

PANEL_HEIGHT = 320
GAP = 6
LABEL_HEIGHT = 22


# --------------------------------------------------------------------------------------------------------
# curves


def write_curves(plots_dir: str | Path, curves: Mapping[str, Mapping[str, np.ndarray]]) -> list[Path]:
    """Write the per-set curves as CSV (DVC plots) and one PNG per curve kind with every set overlaid.

    Args:
        plots_dir: output folder; gets ``pr/<set>.csv`` (threshold, recall, precision),
            ``fmeasure/<set>.csv``, ``emeasure/<set>.csv`` (threshold, value) and ``png/{pr,fmeasure,emeasure}.png``.
        curves: per set, the ``SetResult.curves`` arrays (``(256,)`` each, ascending threshold).

    Returns:
        The files written.
    """
    plots_dir = Path(plots_dir)
    written: list[Path] = []
    for kind, columns in CURVE_FILES.items():
        folder = plots_dir / kind
        folder.mkdir(parents=True, exist_ok=True)
        for name, curve in curves.items():
            path = folder / f"{name}.csv"
            with path.open("w", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh)
                writer.writerow(columns)
                for i in range(len(curve["threshold"])):
                    writer.writerow([int(curve["threshold"][i])] + [f"{float(curve[c][i]):.6f}" for c in columns[1:]])
            written.append(path)
    written += _curve_pngs(plots_dir / "png", curves)
    return written


def _curve_pngs(folder: Path, curves: Mapping[str, Mapping[str, np.ndarray]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    specs = (
        ("pr", "recall", "precision", "Precision-recall (256 thresholds)", "recall", "precision"),
        ("fmeasure", "threshold", "fmeasure", "F-measure (beta^2 = 0.3) vs threshold", "threshold", "F-measure"),
        ("emeasure", "threshold", "emeasure", "E-measure vs threshold", "threshold", "E-measure"),
    )
    written = []
    for kind, x, y, title, x_label, y_label in specs:
        fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=100)
        for name, curve in curves.items():
            ax.plot(curve[x], curve[y], label=name, linewidth=1.5)
        ax.set(title=title, xlabel=x_label, ylabel=y_label, ylim=(0, 1.02))
        if kind == "pr":
            ax.set_xlim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = folder / f"{kind}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


# --------------------------------------------------------------------------------------------------------
# hardest samples


@dataclass(order=True)
class HardSample:
    """One candidate for the report; ordered so that the heap root is the easiest kept sample.

    Attributes:
        priority: ``-badness`` then ``index``: larger is easier (and later among equals).
        key: sample key (original file stem).
        scores: the image's scalar metrics.
        image: ``(h, w, 3)`` uint8 RGB network input.
        pred: ``(h, w)`` uint8 prediction at network resolution.
        gt: ``(H, W)`` uint8 ground truth at original resolution.
    """

    priority: tuple[float, int]
    key: str = field(compare=False)
    scores: dict[str, float] = field(compare=False)
    image: np.ndarray = field(compare=False, repr=False)
    pred: np.ndarray = field(compare=False, repr=False)
    gt: np.ndarray = field(compare=False, repr=False)


class HardestSamples:
    """Keeps the ``k`` hardest samples of a set by one metric, ties broken by order of arrival (earlier first)."""

    def __init__(self, k: int, metric: str) -> None:
        if metric not in HARDNESS_LOWER_IS_WORSE:
            raise ValueError(f"hardness metric must be one of {sorted(HARDNESS_LOWER_IS_WORSE)}, got {metric!r}")
        self.k, self.metric = k, metric
        self._heap: list[HardSample] = []
        self._count = 0

    def badness(self, scores: Mapping[str, float]) -> float:
        """Larger is harder."""
        value = float(scores[self.metric])
        return -value if HARDNESS_LOWER_IS_WORSE[self.metric] else value

    def offer(self, key: str, scores: Mapping[str, float], image: np.ndarray, pred: np.ndarray,
              gt: np.ndarray) -> None:
        """Consider one sample (arrays are kept only while it ranks among the ``k`` hardest)."""
        # heap root = the easiest kept sample: smallest badness, then the latest arrival
        item = HardSample((self.badness(scores), -self._count), key, dict(scores), image, pred, gt)
        self._count += 1
        if self.k <= 0:
            return
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, item)
        elif item > self._heap[0]:
            heapq.heapreplace(self._heap, item)

    def hardest(self) -> list[HardSample]:
        """The kept samples, hardest first."""
        return sorted(self._heap, reverse=True)


def error_map(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Signed error as RGB: red where the prediction exceeds the ground truth, cyan where it falls short.

    Args:
        pred: ``(H, W)`` uint8 prediction.
        gt: ``(H, W)`` uint8 ground truth (binarised at > 128).

    Returns:
        ``(H, W, 3)`` uint8 RGB.
    """
    target = np.where(gt > 128, 255, 0).astype(np.int16)
    diff = pred.astype(np.int16) - target
    over = np.clip(diff, 0, 255).astype(np.uint8)
    under = np.clip(-diff, 0, 255).astype(np.uint8)
    return np.stack([over, under, under], axis=-1)


def detail_windows(gt: np.ndarray, pred: np.ndarray, count: int, fraction: float) -> list[tuple[int, int, int]]:
    """Square windows ``(y, x, side)`` on fine details: most GT boundary plus prediction error, non-overlapping.

    The score of a pixel is its GT boundary strength (morphological gradient of the binary GT: thin structures
    are nearly all boundary) plus its absolute error; windows are chosen greedily by the box sum of that score.

    Args:
        gt: ``(H, W)`` uint8 ground truth.
        pred: ``(H, W)`` uint8 prediction at the ground truth's size.
        count: windows wanted.
        fraction: window side as a fraction of the shorter side (at least 16 px).

    Returns:
        Up to ``count`` windows, best first.
    """
    h, w = gt.shape
    side = max(16, int(round(min(h, w) * fraction)))
    side = min(side, h, w)
    binary = (gt > 128).astype(np.uint8)
    boundary = cv2.morphologyEx(binary, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)).astype(np.float32)
    error = np.abs(pred.astype(np.float32) / 255 - binary)
    score = boundary + error
    # box sum of every side x side window, indexed by its top-left corner
    integral = cv2.integral(score, sdepth=cv2.CV_64F)
    sums = integral[side:, side:] - integral[:-side, side:] - integral[side:, :-side] + integral[:-side, :-side]
    windows: list[tuple[int, int, int]] = []
    for _ in range(count):
        y, x = np.unravel_index(int(np.argmax(sums)), sums.shape)
        if sums[y, x] <= 0:
            break
        windows.append((int(y), int(x), side))
        # no overlap with a chosen window: its top-left corner must be a full side away
        sums[max(0, y - side + 1):y + side, max(0, x - side + 1):x + side] = -1
    return windows


def _fit_height(image: np.ndarray, height: int, nearest: bool = False) -> np.ndarray:
    h, w = image.shape[:2]
    width = max(1, int(round(w * height / h)))
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)


def _label(panel: np.ndarray, text: str) -> np.ndarray:
    bar = np.full((LABEL_HEIGHT, panel.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, text, (4, LABEL_HEIGHT - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, panel], axis=0)


def _row(panels: Sequence[np.ndarray]) -> np.ndarray:
    gap = np.full((panels[0].shape[0], GAP, 3), 255, np.uint8)
    parts: list[np.ndarray] = []
    for i, p in enumerate(panels):
        parts += [gap, p] if i else [p]
    return np.concatenate(parts, axis=1)


def _stack(rows: Sequence[np.ndarray]) -> np.ndarray:
    width = max(r.shape[1] for r in rows)
    out: list[np.ndarray] = []
    for i, r in enumerate(rows):
        if i:
            out.append(np.full((GAP, width, 3), 255, np.uint8))
        out.append(np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255))
    return np.concatenate(out, axis=0)


def render_sample(sample: HardSample, *, crops: int, crop_fraction: float) -> np.ndarray:
    """The report figure of one sample at the ground truth's resolution.

    Returns:
        ``(H', W', 3)`` uint8 RGB: a labelled row image | ground truth | prediction | error map (crop windows
        outlined in yellow), then one row per zoomed crop of the same four panels.
    """
    gt = sample.gt
    h, w = gt.shape
    image = cv2.resize(sample.image, (w, h), interpolation=cv2.INTER_LINEAR)
    pred = cv2.resize(sample.pred, (w, h), interpolation=cv2.INTER_LINEAR) if sample.pred.shape != gt.shape \
        else sample.pred
    full = [image, np.repeat(gt[..., None], 3, axis=2), np.repeat(pred[..., None], 3, axis=2), error_map(pred, gt)]
    windows = detail_windows(gt, pred, crops, crop_fraction)
    thickness = max(1, min(h, w) // 200)
    outlined = []
    for panel in full:
        panel = panel.copy()
        for i, (y, x, side) in enumerate(windows):
            cv2.rectangle(panel, (x, y), (x + side - 1, y + side - 1), (255, 210, 0), thickness)
            cv2.putText(panel, str(i + 1), (x + 3 * thickness, y + 12 * thickness), cv2.FONT_HERSHEY_SIMPLEX,
                        0.4 * thickness, (255, 210, 0), thickness, cv2.LINE_AA)
        outlined.append(panel)
    score_text = " ".join(f"{k}={v:.3f}" for k, v in sample.scores.items() if k in ("Sm", "MAE", "wF"))
    if "HCE" in sample.scores:
        score_text += f" HCE={sample.scores['HCE']:.0f}"
    names = (f"image {sample.key}", "ground truth", "prediction", f"error  {score_text}")
    rows = [_row([_label(_fit_height(p, PANEL_HEIGHT), n) for p, n in zip(outlined, names, strict=True)])]
    for i, (y, x, side) in enumerate(windows):
        crop = [p[y:y + side, x:x + side] for p in full]
        crop_names = [f"crop {i + 1} ({x},{y},{side}px)", "", "", ""]
        rows.append(_row([_label(_fit_height(c, PANEL_HEIGHT, nearest=side < PANEL_HEIGHT), n)
                          for c, n in zip(crop, crop_names, strict=True)]))
    return _stack(rows)


def figure_name(rank: int, key: str) -> str:
    """File name of a report figure: ``<rank>_<key>.png`` with unsafe characters replaced."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    return f"{rank:02d}_{safe}.png"


def write_report(reports_dir: str | Path, hardest: Mapping[str, Sequence[HardSample]], *, metric: str, crops: int,
                 crop_fraction: float) -> Path:
    """Write one PNG per hard sample and ``index.md`` listing them per set.

    Args:
        reports_dir: output folder; gets ``<set>/<rank>_<key>.png`` and ``index.md``.
        hardest: per set, the samples hardest first.
        metric: the hardness metric (for the index text).
        crops: zoomed crops per sample.
        crop_fraction: crop side as a fraction of the shorter side.

    Returns:
        The index path.
    """
    reports_dir = Path(reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    order = "lowest" if HARDNESS_LOWER_IS_WORSE[metric] else "highest"
    lines = ["# Evaluation report: hardest samples", "",
             f"Per test set, the samples with the {order} {metric}. Each figure: image | ground truth | prediction | "
             "error map (red: false positive, cyan: false negative), then zoomed crops where the ground truth has "
             "the most boundary / thin structure and the prediction the most error.", ""]
    for set_name, samples in hardest.items():
        folder = reports_dir / set_name
        folder.mkdir(parents=True, exist_ok=True)
        lines += [f"## {set_name}", "", "| rank | sample | Sm | MAE | wF | HCE | figure |",
                  "|---|---|---|---|---|---|---|"]
        for rank, sample in enumerate(samples, start=1):
            path = folder / figure_name(rank, sample.key)
            figure = render_sample(sample, crops=crops, crop_fraction=crop_fraction)
            cv2.imwrite(str(path), cv2.cvtColor(figure, cv2.COLOR_RGB2BGR))
            s = sample.scores
            hce = f"{s['HCE']:.0f}" if "HCE" in s else "-"
            rel = path.relative_to(reports_dir).as_posix()
            lines.append(f"| {rank} | {sample.key} | {s['Sm']:.4f} | {s['MAE']:.4f} | {s['wF']:.4f} | {hce} | "
                         f"[{path.name}]({rel}) |")
        lines += [""]
        lines += [f"![{s.key}]({set_name}/{figure_name(r, s.key)})" for r, s in enumerate(samples, start=1)]
        lines += [""]
    index = reports_dir / "index.md"
    index.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return index
