"""``evaluate`` stage: the model on every test set, the paper's metrics, DVC metrics/plots and a visual report.

Two modes behind ``birefnet evaluate``:

* Stage (default): reads ``evaluate.model`` and the test shards under ``<shard.out>/test`` (one exact pass
  per set of ``data.test_sets``), predicts in batches (bf16 autocast on CUDA with ``evaluate.precision: auto``)
  and scores every prediction at the original ground-truth resolution (OpenCV bilinear resize inside the
  metric code, as the paper and upstream do), in ``evaluate.workers`` processes. Writes

  * ``evaluate.out`` (``metrics/eval.json``, DVC metrics): ``{"sets": {set: {n, Sm, maxF, meanF, adpF, wF,
    maxE, meanE, adpE, MAE, HCE}}, "mean": {...}, "meta": {...}}``, the schema of
    :mod:`birefnet.evaluation.folders`; ``mean`` is over DIS-TE1..4 when all four are evaluated, else over
    all sets; ``meta.model`` and ``meta.model_sha256`` (sha256 of the model file's bytes) name what was scored;
  * ``evaluate.plots`` (DVC plots): ``pr/<set>.csv``, ``fmeasure/<set>.csv``, ``emeasure/<set>.csv`` and
    ``png/{pr,fmeasure,emeasure}.png`` (``dvc plots show`` HTML needs a CDN; the PNGs do not);
  * ``evaluate.reports``: the ``evaluate.hard_samples`` hardest samples per set as figures (image | ground
    truth | prediction | error map, plus zoomed detail crops), ``index.md`` and ``per_image.csv``.

* Folders: ``birefnet evaluate --pred-dir DIR --gt-dir DIR --out FILE.json`` scores existing prediction
  folders (delegated to :mod:`birefnet.evaluation.folders`).

The three stage outputs (and the plot subfolders) are written under temporary names and published together
(:func:`publish_outputs`): a killed run never leaves new metrics beside old curves or an old report.

Metric values do not depend on ``evaluate.workers``: every image is scored independently and reduced in order.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from birefnet.config import Params
from birefnet.publish import OutputSet, PublishError, finish_pending
from birefnet.stages.common import StageInputError, add_params_args, run_stage

log = logging.getLogger("birefnet.evaluate")

IMAGE_KEYS = ("Sm", "MAE", "wF", "adpF", "adpE", "HCE", "MSE", "mBA", "maxBIoU", "meanBIoU")
PLOT_KINDS = ("pr", "fmeasure", "emeasure", "png")  # the evaluate.plots subfolders dvc.yaml declares


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
    from birefnet.training.engine import autocast_for, predictions_to_uint8

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
        raise StageInputError(f"set {set_name}: no samples were read")
    return SetEvaluation(accumulator.compute(), images, hardest.hardest())


def build_report(evaluations: Mapping[str, SetEvaluation], meta: Mapping[str, Any]) -> dict[str, Any]:
    """The ``eval.json`` document: ``{"sets", "mean", "meta"}`` (the folders schema)."""
    from birefnet.evaluation.folders import mean_over_sets

    results = {name: e.result for name, e in evaluations.items()}
    return {
        "sets": {name: dict(r.metrics) for name, r in results.items()},
        "mean": mean_over_sets(results),
        "meta": dict(meta),
    }


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


def load_model_hashed(path: Path, device: Any) -> tuple[Any, str]:
    """Load the model and return it with the sha256 of the file's bytes, hashed before and after loading.

    Raises:
        StageInputError: the file changed while it was being loaded (the hashes differ), or cannot be loaded.
    """
    import birefnet
    from birefnet.data.io import sha256_file
    from birefnet.models.io import ModelFileError

    before = sha256_file(path)
    try:
        model = birefnet.load_model(path, device=device)
    except ModelFileError as exc:
        raise StageInputError(str(exc)) from None
    after = sha256_file(path)
    if after != before:
        raise StageInputError(f"model {path} changed while it was being loaded (sha256 {before} before, {after} "
                              "after): rerun the evaluate stage once the train stage has finished")
    return model, before


def output_paths(params: Params) -> list[Path]:
    """The stage's outputs, as dvc.yaml declares them, in publication order: ``evaluate.out`` (the metrics
    ``register`` reads) last."""
    ep = params.evaluate
    plots = Path(ep.plots)
    return [Path(ep.reports), *(plots / kind for kind in PLOT_KINDS), Path(ep.out)]


def publish_outputs(params: Params, report: Mapping[str, Any], evaluations: Mapping[str, SetEvaluation]) -> Path:
    """Write the metrics, curves and report under temporary names, then publish them all together.

    A run killed at any point leaves the previous outputs or the new ones (a killed publication is finished by
    the next run), never a new ``eval.json`` beside old curves or an old report.

    Returns:
        The report's ``index.md`` (at its final path).
    """
    import shutil

    from birefnet.evaluation.report import write_curves, write_report

    ep = params.evaluate
    targets = output_paths(params)
    reports, plot_targets, metrics = targets[0], targets[1:-1], targets[-1]
    with OutputSet("evaluate", targets) as outputs:
        scratch = Path(ep.plots) / ".evaluate-scratch"
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            write_curves(scratch, {name: e.result.curves for name, e in evaluations.items()})
            for target in plot_targets:
                (scratch / target.name).mkdir(parents=True, exist_ok=True)
                os.replace(scratch / target.name, outputs.staged(target))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        staged_reports = outputs.staged(reports)
        write_per_image(staged_reports / "per_image.csv", evaluations)
        write_report(staged_reports, {name: e.hardest for name, e in evaluations.items()}, metric=ep.hard_by,
                     crops=ep.crops, crop_fraction=ep.crop_fraction)
        outputs.staged(metrics).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return reports / "index.md"


def _device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run(params: Params, progress: bool = False) -> dict[str, Any]:
    """Run the stage with ``params``; return the ``eval.json`` document written.

    Raises:
        StageInputError: a missing model file, test shards or set.
    """
    from birefnet.data.loader import eval_loader_from_params
    from birefnet.evaluation.hce import EPSILON, RELAX

    ep = params.evaluate
    try:
        # a train run killed while publishing left its new model under a temporary name: finish that first
        finish_pending(Path(ep.model).parent)
    except PublishError as exc:
        raise StageInputError(str(exc)) from None
    if not Path(ep.model).is_file():
        raise StageInputError(f"model {ep.model} not found: run the train stage first (birefnet train), or set "
                              "evaluate.model")
    test_dir = Path(params.shard.out) / "test"
    if not (test_dir / "index.json").is_file():
        raise StageInputError(f"{test_dir / 'index.json'} not found: run the shard stage first (birefnet shard)")
    if not params.data.test_sets:
        raise StageInputError("data.test_sets is empty: nothing to evaluate")
    start = time.perf_counter()
    device = _device()
    model, model_sha256 = load_model_hashed(Path(ep.model), device)
    loaders = {}
    for name in params.data.test_sets:
        try:
            loaders[name] = eval_loader_from_params(params, name, "test", batch_size=ep.batch_size, normalize=False)
        except (KeyError, ValueError, FileNotFoundError) as exc:
            raise StageInputError(f"test set {name}: {exc}") from exc
    log.info("evaluating %s on %s (%s) with %d metric process(es)", ep.model, ", ".join(loaders), device, ep.workers)
    evaluations = evaluate_sets(model, loaders, device=device, precision=ep.precision, hce=ep.hce,
                                workers=ep.workers, hard_samples=ep.hard_samples, hard_by=ep.hard_by,
                                progress=progress, extra_metrics=ep.extra_metrics)
    meta = {
        "model": str(ep.model),
        # sha256 of the model file's bytes that were scored: `birefnet register` refuses metrics of other weights
        "model_sha256": model_sha256,
        "device": device.type,
        "precision": ep.precision,
        "input_size": list(params.data.size),
        # metrics are at the original resolution when the shards keep original masks (shard.original_masks)
        "gt_resolution": "original" if all(loader.dataset.config.with_original_mask for loader in loaders.values())
        else "input",
        "hce": {"relax": RELAX, "epsilon": EPSILON} if ep.hce else None,
        # no timings here: every key of eval.json is a DVC metric, and `dvc metrics diff` should show only scores
    }
    report = build_report(evaluations, meta)
    out = Path(ep.out)
    index = publish_outputs(params, report, evaluations)
    mean = report["mean"]
    log.info("mean over %s: Sm=%.4f maxF=%.4f wF=%.4f MAE=%.4f; wrote %s, %s, %s (%.0f s)",
             ", ".join(mean["sets"]), mean["Sm"], mean["maxF"], mean["wF"], mean["MAE"], out, ep.plots, index,
             time.perf_counter() - start)
    return report


def _run(params: Params, args: argparse.Namespace) -> None:
    run(params, progress=not args.quiet)


def get_args_parser() -> argparse.ArgumentParser:
    """Parser of both modes (``--pred-dir`` selects folder scoring)."""
    parser = argparse.ArgumentParser(
        prog="birefnet evaluate",
        description="Score the model (evaluate.model) on every test set's shards with the paper's metrics; write "
                    "evaluate.out (DVC metrics), curves under evaluate.plots (DVC plots + PNGs) and the visual report "
                    "under evaluate.reports. With --pred-dir, score existing prediction folders instead.")
    add_params_args(parser)
    folders = parser.add_argument_group(
        "prediction folders (instead of the stage)",
        "--pred-dir selects this mode and requires --gt-dir and --out; the other options here apply to it only.")
    folders.add_argument("--pred-dir", type=Path,
                         help="predictions (one set or a folder per set); requires --gt-dir and --out")
    folders.add_argument("--gt-dir", type=Path, help="ground truth (one set or a folder per set)")
    folders.add_argument("--out", type=Path, help="JSON file to write the scores to")
    folders.add_argument("--workers", type=int, default=1,
                         help="metric processes for --pred-dir scoring (default: %(default)s). The stage itself "
                              "ignores this option and uses evaluate.workers from --params (--set evaluate.workers=N). "
                              "Results do not depend on it")
    folders.add_argument("--no-hce", dest="hce", action="store_false", help="skip HCE (the slowest metric)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the stage, or score prediction folders with ``--pred-dir``; returns the exit code."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.pred_dir is not None:
        if args.gt_dir is None or args.out is None:
            parser.error("--pred-dir needs --gt-dir and --out")
        from birefnet.evaluation import folders

        forwarded = ["--pred-dir", str(args.pred_dir), "--gt-dir", str(args.gt_dir), "--out", str(args.out),
                     "--workers", str(args.workers)]
        forwarded += [] if args.hce else ["--no-hce"]
        forwarded += ["-q"] if args.quiet else []
        if args.params.is_file() or args.overrides:  # data.max_image_pixels limits every file's declared size
            forwarded += ["--params", str(args.params)] + [a for o in args.overrides for a in ("--set", o)]
        return folders.main(forwarded)
    if args.gt_dir is not None or args.out is not None:
        parser.error("--gt-dir and --out go with --pred-dir (the stage's outputs come from params: evaluate.*)")
    return run_stage("evaluate", _run, args)


if __name__ == "__main__":
    raise SystemExit(main())
