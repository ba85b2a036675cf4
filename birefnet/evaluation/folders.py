"""Score folders of existing predictions against ground-truth folders: ``birefnet evaluate --pred-dir``.

Pairs files by stem (``.png``, ``.jpg``, ``.jpeg``, any case). Layouts:

* one set: ``--gt-dir`` holds the masks (or a ``gt/`` folder, as in DIS5K) and ``--pred-dir`` the
  predictions; the set is named after the prediction folder;
* several sets: ``--gt-dir`` has one subfolder per set (each with masks or a ``gt/`` folder, e.g. the
  ``DIS5K`` root) and ``--pred-dir`` the same subfolders, as upstream's inference writes them.

Writes one JSON document (the schema the evaluate stage writes too)::

    {"sets": {"<set>": {"n": N, "Sm": ..., "maxF": ..., "meanF": ..., "adpF": ..., "wF": ...,
                        "maxE": ..., "meanE": ..., "adpE": ..., "MAE": ..., "HCE": ...}, ...},
     "mean": {"sets": [<set>, ...], "n": N, "Sm": ..., ..., "HCE": ...},
     "meta": {"pred_dir": ..., "gt_dir": ..., "hce": {"relax": 5, "epsilon": 2.0}}}

``mean`` is the unweighted mean over DIS-TE1..4 when all four are scored (the paper's DIS-TE column), else
over all sets. Results do not depend on ``--workers``: images are scored independently and reduced in order.

Every file's header is read before it is decoded: a declared size over ``data.max_image_pixels`` (from
``--params`` when given, else the project default) is refused, naming the file (decompression-bomb guard;
OpenCV alone decodes up to 2^30 pixels).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from birefnet.data.io import DEFAULT_MAX_PIXELS, ImageReadError, read_header_size
from birefnet.evaluation.hce import EPSILON, RELAX
from birefnet.evaluation.metrics import (
    EXTRA_METRIC_KEYS,
    METRIC_KEYS,
    ImageScores,
    MetricAccumulator,
    SetResult,
    score_image,
)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
DIS_TEST_SETS = ("DIS-TE1", "DIS-TE2", "DIS-TE3", "DIS-TE4")
EXIT_MISSING = 3  # the project's exit code for bad input data
EXIT_PARAMS = 2  # the project's exit code for bad parameters


class MissingPredictionError(FileNotFoundError):
    """A ground-truth mask has no prediction (or a folder has two files with one stem); the message names it."""


def list_images(folder: Path) -> dict[str, Path]:
    """Images in ``folder`` (not recursive) by file stem.

    Raises:
        MissingPredictionError: when two files share a stem (``a.png`` and ``a.jpg``).
    """
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            if path.stem in found:
                raise MissingPredictionError(f"ambiguous stem {path.stem!r}: {found[path.stem]} and {path}")
            found[path.stem] = path
    return found


def _mask_folder(folder: Path) -> Path | None:
    """``folder`` itself if it holds images, else its ``gt/`` subfolder if that does, else None."""
    if list_images(folder):
        return folder
    if (folder / "gt").is_dir() and list_images(folder / "gt"):
        return folder / "gt"
    return None


def discover_sets(pred_dir: Path, gt_dir: Path) -> dict[str, tuple[Path, Path]]:
    """Map set name -> (prediction folder, mask folder) for the two layouts described in the module doc."""
    single = _mask_folder(gt_dir)
    if single is not None:
        return {pred_dir.resolve().name: (pred_dir, single)}
    sets: dict[str, tuple[Path, Path]] = {}
    for sub in sorted(p for p in gt_dir.iterdir() if p.is_dir()):
        masks = _mask_folder(sub)
        if masks is not None:
            sets[sub.name] = (pred_dir / sub.name, masks)
    if not sets:
        raise MissingPredictionError(f"no ground-truth images in {gt_dir} or its set subfolders")
    return sets


def pair_files(pred_dir: Path, gt_dir: Path) -> list[tuple[Path, Path]]:
    """``(prediction, mask)`` paths of one set, sorted by stem.

    Raises:
        MissingPredictionError: naming the first missing prediction (and how many are missing).
    """
    masks = list_images(gt_dir)
    preds = list_images(pred_dir) if pred_dir.is_dir() else {}
    missing = [stem for stem in masks if stem not in preds]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MissingPredictionError(f"missing prediction for {masks[missing[0]].name} in {pred_dir}{more}")
    return [(preds[stem], masks[stem]) for stem in sorted(masks)]


def read_grey(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image as ``(H, W)`` uint8 grey (``cv2.IMREAD_GRAYSCALE``, as upstream does).

    The header is parsed first and a declared size over ``max_pixels`` is refused before any pixel is decoded.

    Raises:
        MissingPredictionError: unreadable, not an image, or over ``max_pixels``; the message names the file.
    """
    try:
        read_header_size(path, max_pixels)
    except ImageReadError as exc:
        raise MissingPredictionError(str(exc)) from None
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise MissingPredictionError(f"cannot read image {path}")
    return image


def score_files(paths: tuple[Path, Path], hce: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageScores:
    """Score one ``(prediction path, mask path)`` pair; each file is refused over ``max_pixels``."""
    pred_path, gt_path = paths
    return score_image(read_grey(pred_path, max_pixels), read_grey(gt_path, max_pixels), hce=hce)


def _init_worker() -> None:
    cv2.setNumThreads(1)  # processes already use the cores


def _scores(pairs: list[tuple[Path, Path]], hce: bool, workers: int, desc: str,
            progress: bool, max_pixels: int) -> Iterator[ImageScores]:
    from functools import partial

    from tqdm import tqdm

    score = partial(score_files, hce=hce, max_pixels=max_pixels)
    bar = dict(total=len(pairs), desc=desc, unit="img", disable=not progress)
    if workers <= 1:
        yield from tqdm(map(score, pairs), **bar)
        return
    # forkserver, not fork: forking a process that already ran OpenCV/torch thread pools can deadlock
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, mp_context=context) as pool:
        yield from tqdm(pool.map(score, pairs, chunksize=4), **bar)


def mean_over_sets(results: dict[str, SetResult]) -> dict[str, object]:
    """Unweighted mean of each metric over DIS-TE1..4 when all are present, else over all sets."""
    names = list(DIS_TEST_SETS) if all(s in results for s in DIS_TEST_SETS) else list(results)
    mean: dict[str, object] = {"sets": names, "n": int(sum(results[s].metrics["n"] for s in names))}
    for key in (*METRIC_KEYS, *EXTRA_METRIC_KEYS):
        if all(key in results[s].metrics for s in names):
            mean[key] = float(np.mean([results[s].metrics[key] for s in names]))
    return mean


def evaluate_folders(pred_dir: str | Path, gt_dir: str | Path, *, hce: bool = True, workers: int = 1,
                     progress: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, object]:
    """Score prediction folders against ground-truth folders.

    Args:
        pred_dir: predictions (one set, or one subfolder per set).
        gt_dir: masks (one set, or one subfolder per set; a set folder may hold them in ``gt/``).
        hce: compute HCE (the slowest metric).
        workers: processes to score images in; results are identical for any value.
        progress: show a tqdm bar per set.
        max_pixels: refuse any file whose header declares more pixels (``data.max_image_pixels``).

    Returns:
        ``{"sets": {name: metrics}, "mean": {...}, "meta": {...}}`` as in the module docstring, plus the
        per-set curves under ``"curves"`` (``{name: {"threshold", "precision", "recall", "fmeasure",
        "emeasure"}}``, (256,) float64 arrays; not JSON-ready, :func:`main` leaves them out).

    Raises:
        MissingPredictionError: a mask without a prediction, an unreadable or oversized image, or no masks.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    if not gt_dir.is_dir():
        raise MissingPredictionError(f"ground-truth folder {gt_dir} does not exist")
    sets = discover_sets(pred_dir, gt_dir)
    paired = {name: pair_files(p, g) for name, (p, g) in sets.items()}  # fail before any scoring
    results: dict[str, SetResult] = {}
    for name, pairs in paired.items():
        accumulator = MetricAccumulator()
        accumulator.extend(_scores(pairs, hce, workers, name, progress, max_pixels))
        results[name] = accumulator.compute()
    return {
        "sets": {name: dict(r.metrics) for name, r in results.items()},
        "mean": mean_over_sets(results),
        "meta": {"pred_dir": str(pred_dir), "gt_dir": str(gt_dir), "hce": {"relax": RELAX, "epsilon": EPSILON}},
        "curves": {name: r.curves for name, r in results.items()},
    }


def get_args_parser() -> argparse.ArgumentParser:
    """Parser of ``birefnet evaluate --pred-dir DIR --gt-dir DIR --out FILE.json``."""
    parser = argparse.ArgumentParser(prog="birefnet evaluate",
                                     description="Score existing prediction folders with the paper's metrics.")
    parser.add_argument("--pred-dir", type=Path, required=True, help="predictions (one set or a folder per set)")
    parser.add_argument("--gt-dir", type=Path, required=True, help="ground truth (one set or a folder per set)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--workers", type=int, default=1, help="processes (results do not depend on it)")
    parser.add_argument("--no-hce", dest="hce", action="store_false", help="skip HCE (the slowest metric)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--params", type=Path, default=None,
                        help="params file whose data.max_image_pixels limits each image's declared size "
                             f"(default without it: {DEFAULT_MAX_PIXELS})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override one parameter of --params (repeatable)")
    return parser


def _max_pixels(args: argparse.Namespace) -> int:
    """``data.max_image_pixels`` of ``--params`` (with ``--set``), or the project default without a file."""
    if args.params is None:
        return DEFAULT_MAX_PIXELS
    from birefnet.config import load_params

    return load_params(args.params, args.overrides).data.max_image_pixels


def main(argv: Sequence[str] | None = None) -> int:
    """Run the folder scoring; 0 on success, 2 on bad params, 3 when a prediction is missing or an image is
    unreadable or over ``data.max_image_pixels``."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.overrides and args.params is None:
        parser.error("--set needs --params")
    from birefnet.config import ParamsError

    try:
        max_pixels = _max_pixels(args)
    except ParamsError as exc:
        print(f"error: evaluate: {exc}", file=sys.stderr)
        return EXIT_PARAMS
    try:
        report = evaluate_folders(args.pred_dir, args.gt_dir, hce=args.hce, workers=max(1, args.workers),
                                  progress=not args.quiet, max_pixels=max_pixels)
    except MissingPredictionError as exc:
        print(f"error: evaluate: {exc}", file=sys.stderr)
        return EXIT_MISSING
    report.pop("curves")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if not args.quiet:
        for name, metrics in report["sets"].items():
            print(name, " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
