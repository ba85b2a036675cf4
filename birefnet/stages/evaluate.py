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
    ``selection`` holds the same per-set metrics for the promotion gate's sets (``register.selection_sets``,
    DIS-VD by default, read from the validation shards), which are not reported as test figures;
  * ``evaluate.plots`` (DVC plots): ``pr/<set>.csv``, ``fmeasure/<set>.csv``, ``emeasure/<set>.csv`` and
    ``png/{pr,fmeasure,emeasure}.png`` (``dvc plots show`` HTML needs a CDN; the PNGs do not);
  * ``evaluate.reports``: the ``evaluate.hard_samples`` hardest samples per set as figures (image | ground
    truth | prediction | error map, plus zoomed detail crops), ``index.md`` and ``per_image.csv``.

* Folders: ``birefnet evaluate --pred-dir DIR --gt-dir DIR --out FILE.json`` scores existing prediction
  folders (delegated to :mod:`birefnet.evaluation.folders`).

The three stage outputs (and the plot subfolders) are written under temporary names and published together
(:func:`publish_outputs`): a killed run never leaves new metrics beside old curves or an old report.

Metric values do not depend on ``evaluate.workers``: every image is scored independently and reduced in order.
Inference and scoring live in :mod:`birefnet.evaluation.runner`; this module checks params and paths, calls it and
publishes the outputs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from birefnet.config import Params
from birefnet.publish import OutputSet, PublishError, finish_pending
from birefnet.stages.common import StageInputError, add_params_args, run_stage

if TYPE_CHECKING:
    from birefnet.evaluation.runner import SetEvaluation

log = logging.getLogger("birefnet.evaluate")

PLOT_KINDS = ("pr", "fmeasure", "emeasure", "png")  # the evaluate.plots subfolders dvc.yaml declares


def load_model_hashed(path: Path, device: Any) -> tuple[Any, str]:
    """Load the model and return it with the sha256 of the file's bytes, hashed before and after loading.

    Raises:
        StageInputError: the file changed while it was being loaded (the hashes differ), or cannot be loaded.
    """
    import birefnet
    from birefnet.hashing import sha256_file
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
    from birefnet.evaluation.runner import write_per_image

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


def check_inputs(params: Params) -> None:
    """Fail early, naming what to run first, when the model, the test shards or the set list is missing.

    Raises:
        StageInputError: a missing model file, test shards or test sets (or an unfinishable publication).
    """
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
    for name in params.selection_only_sets():
        index = Path(params.shard.out) / str(params.data.split_of(name)) / "index.json"
        if not index.is_file():
            raise StageInputError(f"{index} not found (selection set {name} of register.selection_sets): run the "
                                  "shard stage first (birefnet shard)")


def open_test_loaders(params: Params, names: list[str] | None = None) -> dict[str, Any]:
    """One exact-pass loader of raw (uint8) batches per set of ``names`` (default ``data.test_sets``), each read
    from its own split's shards.

    Raises:
        StageInputError: a set missing from its shards, or unreadable.
    """
    from birefnet.data.loader import eval_loader_from_params

    loaders = {}
    for name in params.data.test_sets if names is None else names:
        split = params.data.split_of(name) or "test"
        try:
            loaders[name] = eval_loader_from_params(params, name, split, batch_size=params.evaluate.batch_size,
                                                    normalize=False)
        except (KeyError, ValueError, FileNotFoundError) as exc:
            raise StageInputError(f"{split} set {name}: {exc}") from exc
    return loaders


def report_meta(params: Params, model_sha256: str, device: Any, loaders: Mapping[str, Any]) -> dict[str, Any]:
    """``eval.json``'s ``meta``: what was scored, where and how (no timings: every key is a DVC metric)."""
    from birefnet.evaluation.hce import EPSILON, RELAX

    ep = params.evaluate
    return {
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
    }


def run(params: Params, progress: bool = False) -> dict[str, Any]:
    """Run the stage with ``params``; return the ``eval.json`` document written.

    Raises:
        StageInputError: a missing model file, test shards or set, or a set without samples.
    """
    from birefnet.evaluation.runner import EmptySetError, build_report, evaluate_sets

    ep = params.evaluate
    check_inputs(params)
    start = time.perf_counter()
    device = _device()
    model, model_sha256 = load_model_hashed(Path(ep.model), device)
    loaders = open_test_loaders(params)
    log.info("evaluating %s on %s (%s) with %d metric process(es)", ep.model, ", ".join(loaders), device, ep.workers)
    selection_loaders = open_test_loaders(params, params.selection_only_sets())
    try:
        evaluations = evaluate_sets(model, loaders, device=device, precision=ep.precision, hce=ep.hce,
                                    workers=ep.workers, hard_samples=ep.hard_samples, hard_by=ep.hard_by,
                                    progress=progress, extra_metrics=ep.extra_metrics)
        # the promotion gate's sets (register.selection_sets): metrics only, no curves or report
        selection = evaluate_sets(model, selection_loaders, device=device, precision=ep.precision, hce=ep.hce,
                                  workers=ep.workers, progress=progress, extra_metrics=ep.extra_metrics)
    except EmptySetError as exc:
        raise StageInputError(str(exc)) from None
    report = build_report(evaluations, report_meta(params, model_sha256, device, loaders), selection)
    index = publish_outputs(params, report, evaluations)
    mean = report["mean"]
    log.info("mean over %s: Sm=%.4f maxF=%.4f wF=%.4f MAE=%.4f; wrote %s, %s, %s (%.0f s)",
             ", ".join(mean["sets"]), mean["Sm"], mean["maxF"], mean["wF"], mean["MAE"], ep.out, ep.plots, index,
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
