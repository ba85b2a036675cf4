"""Score a model on test sets: batched inference overlapped with per-image metrics in worker processes.

:func:`evaluate_sets` runs the model over each set's raw batches (:func:`predict`), scores every prediction at the
ground truth's resolution (:func:`birefnet.evaluation.metrics.score_image`) in this process or a process pool, and
reduces the scores in loader order, so the results do not depend on the number of metric processes. It keeps per
set the metrics and curves, one record per image and the hardest samples for the visual report;
:func:`build_report` and :func:`write_per_image` turn that into ``eval.json`` and ``per_image.csv``. The
``evaluate`` stage (:mod:`birefnet.stages.evaluate`) reads params and paths, calls these and publishes the files.
"""

from __future__ import annotations

import csv
import logging
import multiprocessing
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("birefnet.evaluate")

IMAGE_KEYS = ("Sm", "MAE", "wF", "adpF", "adpE", "HCE", "MSE", "mBA", "maxBIoU", "meanBIoU")


class EmptySetError(ValueError):
    """A test set's loader yielded no sample; the message names the set."""


@dataclass
class SetEvaluation:
    """Everything the stage keeps of one set.

    Attributes:
        result: the set's metrics and image-averaged curves.
        images: per image, in loader order: ``{"key", "Sm", "MAE", "wF", "adpF", "adpE"[, "HCE"]}``.
        hardest: the report candidates, hardest first.
    """

    result: Any  # birefnet.evaluation.metrics.SetResult
    images: list[dict[str, Any]]
    hardest: list[Any]  # birefnet.evaluation.report.HardSample


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core already


class _Scorer:
    """Scores ``(pred, gt)`` pairs in order, in this process (``workers == 1``) or in a process pool."""

    def __init__(self, workers: int, hce: bool, extra_metrics: Sequence[str] = ()) -> None:
        self.hce = hce
        self.extra = tuple(extra_metrics)
        self.pool: ProcessPoolExecutor | None = None
        if workers > 1:
            # forkserver: the parent holds torch (threads, maybe CUDA), which must not be forked
            self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("forkserver"),
                                            initializer=_init_worker)
        self.max_pending = 4 * workers

    def submit(self, pred: np.ndarray, gt: np.ndarray) -> Any:
        from birefnet.evaluation.metrics import score_image

        if self.pool is None:
            return score_image(pred, gt, hce=self.hce, extra=self.extra)
        return self.pool.submit(score_image, pred, gt, hce=self.hce, extra=self.extra)

    @staticmethod
    def result(handle: Any) -> Any:
        return handle.result() if isinstance(handle, Future) else handle

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def image_record(key: str, scores: Any) -> dict[str, Any]:
    """Scalar per-image metrics of an :class:`~birefnet.evaluation.metrics.ImageScores`."""
    record: dict[str, Any] = {"key": key, "Sm": scores.sm, "MAE": scores.mae, "wF": scores.wfm,
                              "adpF": scores.adp_fm, "adpE": scores.adp_em}
    if scores.hce is not None:
        record["HCE"] = scores.hce
    if scores.extra is not None:
        record.update(scores.extra.values())
    return record


def predict(model: Any, loader: Iterable[dict[str, Any]], *, device: Any, precision: str) -> Iterator[
        tuple[dict[str, Any], np.ndarray]]:
    """Run ``model`` over raw (uint8) batches.

    Args:
        model: a BiRefNet; ``model(image).logits`` is (B, 1, H, W).
        loader: batches with uint8 ``image`` (B, 3, H, W) (``normalize=False``), ``mask``, ``key`` and
            optionally ``mask_original``.
        device: torch device.
        precision: ``auto`` (bf16 on CUDA), ``fp32`` or ``bf16``.

    Yields:
        ``(batch, preds)``: the raw batch and (B, H, W) uint8 probability maps (x255, truncated).
    """
    import torch

    from birefnet.data.loader import normalize_batch
    from birefnet.imaging import predictions_to_uint8
    from birefnet.precision import autocast_for

    model.eval()
    with torch.no_grad():
        for batch in loader:
            inputs = normalize_batch({"image": batch["image"], "mask": batch["mask"]}, device)
            with autocast_for(device, precision):
                logits = model(inputs["image"]).logits
            yield batch, predictions_to_uint8(logits)


def evaluate_sets(model: Any, loaders: Mapping[str, Iterable[dict[str, Any]]], *, device: Any,
                  precision: str = "auto", hce: bool = True, workers: int = 1, hard_samples: int = 0,
                  hard_by: str = "Sm", progress: bool = False, extra_metrics: Sequence[str] = ()
                  ) -> dict[str, SetEvaluation]:
    """Predict and score every set; inference overlaps with scoring in ``workers`` processes.

    Args:
        model: the model (eval mode is set here).
        loaders: per set name, raw batches as :func:`predict` takes them (one exact pass).
        device: torch device of the model.
        precision: ``auto``, ``fp32`` or ``bf16``.
        hce: compute HCE.
        workers: metric processes (1 = in this process); the results do not depend on it.
        hard_samples: report candidates kept per set.
        hard_by: hardness metric (``Sm``, ``wF``, ``MAE``, ``HCE``).
        progress: tqdm bars.
        extra_metrics: names of ``birefnet.evaluation.metrics.EXTRA_METRICS`` (``evaluate.extra_metrics``) to add
            to every set's metrics and every image's record.

    Returns:
        Per set, its :class:`SetEvaluation`. Ground truth is ``mask_original`` when the batch has it, else the
        (resized) ``mask``.

    Raises:
        EmptySetError: a set's loader yielded no sample.
        ValueError: ``hard_by`` is ``HCE`` with ``hce`` off.
    """
    from birefnet.evaluation.report import HardestSamples

    if hard_by == "HCE" and not hce:
        raise ValueError("hard_by HCE needs hce on")
    scorer = _Scorer(workers, hce, extra_metrics)
    out: dict[str, SetEvaluation] = {}
    try:
        for set_name, loader in loaders.items():
            out[set_name] = _evaluate_set(model, set_name, loader, scorer, device=device, precision=precision,
                                          hardest=HardestSamples(hard_samples, hard_by), progress=progress)
            m = out[set_name].result.metrics
            log.info("%s: n=%d Sm=%.4f maxF=%.4f wF=%.4f MAE=%.4f meanE=%.4f%s", set_name, m["n"], m["Sm"],
                     m["maxF"], m["wF"], m["MAE"], m["meanE"], f" HCE={m['HCE']:.1f}" if "HCE" in m else "")
    finally:
        scorer.close()
    return out


def _evaluate_set(model: Any, set_name: str, loader: Iterable[dict[str, Any]], scorer: _Scorer, *, device: Any,
                  precision: str, hardest: Any, progress: bool) -> SetEvaluation:
    from tqdm import tqdm

    from birefnet.evaluation.metrics import MetricAccumulator

    accumulator = MetricAccumulator()
    images: list[dict[str, Any]] = []
    pending: deque[tuple[Any, str, np.ndarray, np.ndarray, np.ndarray]] = deque()

    def drain(limit: int) -> None:
        # results are taken in submission order, so the reduction does not depend on the worker count
        while len(pending) > limit:
            handle, key, image, pred, gt = pending.popleft()
            scores = scorer.result(handle)
            accumulator.update(scores)
            record = image_record(key, scores)
            images.append(record)
            hardest.offer(key, record, image, pred, gt)

    total = len(loader) if hasattr(loader, "__len__") else None
    with tqdm(total=total, desc=f"evaluate {set_name}", unit="batch", disable=not progress) as bar:
        for batch, preds in predict(model, loader, device=device, precision=precision):
            originals = batch.get("mask_original")
            masks = batch["mask"][:, 0].numpy()
            rgb = batch["image"].permute(0, 2, 3, 1).numpy()
            for i, pred in enumerate(preds):
                gt = originals[i].numpy() if originals is not None else masks[i]
                gt = np.ascontiguousarray(gt, dtype=np.uint8)
                pending.append((scorer.submit(pred, gt), str(batch["key"][i]), rgb[i].copy(), pred, gt))
                drain(scorer.max_pending)
            bar.update()
        drain(0)
    if not len(accumulator):
        raise EmptySetError(f"set {set_name}: no samples were read")
    return SetEvaluation(accumulator.compute(), images, hardest.hardest())


def build_report(evaluations: Mapping[str, SetEvaluation], meta: Mapping[str, Any],
                 selection: Mapping[str, SetEvaluation] | None = None) -> dict[str, Any]:
    """The ``eval.json`` document: ``{"sets", "mean", "meta"}`` (the folders schema), and ``selection`` (per set
    metrics of the promotion gate's validation sets, ``register.selection_sets``) when there are any."""
    from birefnet.evaluation.folders import mean_over_sets

    results = {name: e.result for name, e in evaluations.items()}
    doc: dict[str, Any] = {
        "sets": {name: dict(r.metrics) for name, r in results.items()},
        "mean": mean_over_sets(results),
    }
    if selection:
        doc["selection"] = {name: dict(e.result.metrics) for name, e in selection.items()}
    doc["meta"] = dict(meta)
    return doc


def write_per_image(path: Path, evaluations: Mapping[str, SetEvaluation]) -> None:
    """``set,key,Sm,MAE,wF,adpF,adpE[,HCE]`` per image."""
    keys = [k for k in IMAGE_KEYS if any(k in r for e in evaluations.values() for r in e.images)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["set", "key", *keys])
        for name, e in evaluations.items():
            for r in e.images:
                writer.writerow([name, r["key"], *(f"{r[k]:.6f}" for k in keys)])
