"""``ingest`` stage: validate every image/mask pair under ``data.root`` and write the manifest.

Reads ``data.root``, ``data.*_sets``, ``data.on_bad_sample``, ``data.max_image_pixels``; writes
``<data.prepared>/manifest.jsonl`` (one accepted sample per line), ``classes.json`` and ``quarantine.json``
(every rejected file with its reason, ignored sets and files).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tqdm import tqdm

from birefnet.config import Params
from birefnet.data.ingest import (
    BadSample,
    IngestResult,
    assign_class_ids,
    find_candidates,
    output_paths,
    validate_all,
    write_outputs,
)
from birefnet.publish import retract
from birefnet.stages.common import StageInputError, add_params_args, run_stage

log = logging.getLogger("birefnet.ingest")

MAX_LISTED = 20


def ingest(params: Params, progress: bool = True) -> IngestResult:
    """Run ingest with ``params.data`` and publish its three outputs together.

    Raises:
        StageInputError: a missing root or set, no valid training sample, or bad samples with
            ``on_bad_sample=fail``. The previous outputs are removed first (and the message says so), so the
            gradients and shard stages cannot go on with a manifest of data that no longer validates.
    """
    try:
        return _ingest(params, progress)
    except StageInputError as exc:
        removed = retract("ingest", output_paths(Path(params.data.prepared)))
        if not removed:
            raise
        names = ", ".join(str(p) for p in removed)
        raise StageInputError(f"{exc}\nRemoved the previous ingest outputs ({names}) so that later stages cannot "
                              "use a stale manifest; fix the data and rerun `birefnet ingest`.") from None


def _ingest(params: Params, progress: bool) -> IngestResult:
    data = params.data
    split_of = {s: "train" for s in data.train_sets}
    split_of |= {s: "val" for s in data.val_sets}
    split_of |= {s: "test" for s in data.test_sets}
    root = Path(data.root)
    try:
        candidates, result = find_candidates(root, split_of)
    except FileNotFoundError as exc:
        raise StageInputError(str(exc)) from None
    bar = tqdm(total=len(candidates), desc="ingest", unit="pair", disable=not progress)
    outcomes = validate_all(candidates, data.max_image_pixels, max(1, data.workers), progress=bar)
    bar.close()
    for outcome in outcomes:
        if isinstance(outcome, BadSample):
            result.bad.append(outcome)
        else:
            result.records.append(outcome)
    result.bad.sort(key=lambda b: (list(split_of).index(b.set) if b.set in split_of else 99, b.file))
    if result.bad and data.on_bad_sample == "fail":
        lines = [f"  {b.file}: {b.reason}" for b in result.bad[:MAX_LISTED]]
        more = len(result.bad) - MAX_LISTED
        if more > 0:
            lines.append(f"  ... and {more} more")
        raise StageInputError(
            f"{len(result.bad)} bad sample(s) under {root} and data.on_bad_sample is 'fail' "
            f"(set it to 'quarantine' to skip and list them):\n" + "\n".join(lines))
    for split in ("train",):
        sets = [s for s, sp in split_of.items() if sp == split]
        if sets and not any(r["split"] == split for r in result.records):
            raise StageInputError(f"no valid {split} samples in sets {sets} under {root}")
    result.classes = assign_class_ids(result.records)
    write_outputs(Path(data.prepared), result, root)
    return result


def run(params: Params, progress: bool = False) -> IngestResult:
    """Stage entry for flows and tests (same as :func:`ingest`)."""
    return ingest(params, progress=progress)


def _run(params: Params, args: argparse.Namespace) -> None:
    result = ingest(params, progress=not args.quiet)
    per_set: dict[str, int] = {}
    for r in result.records:
        per_set[r["set"]] = per_set.get(r["set"], 0) + 1
    log.info("accepted %d samples (%s), %d classes", len(result.records),
             ", ".join(f"{k} {v}" for k, v in per_set.items()), len(result.classes))
    if result.bad:
        log.warning("quarantined %d file(s); see %s", len(result.bad), Path(params.data.prepared) / "quarantine.json")
        for b in result.bad[:MAX_LISTED]:
            log.warning("  %s: %s", b.file, b.reason)
    if result.ignored_sets:
        log.info("sets under %s not listed in params (ignored): %s", params.data.root, ", ".join(result.ignored_sets))
    if result.ignored_files:
        log.info("%d hidden files or subfolders ignored (listed in quarantine.json)", len(result.ignored_files))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="birefnet ingest",
        description="Validate every image/mask pair under data.root (DIS5K layout <set>/im + <set>/gt, or im/ + "
                    "gt/ directly) and write data.prepared/manifest.jsonl, classes.json and quarantine.json. "
                    "Bad pairs (undecodable, truncated, size mismatch, orphan, oversized) fail the stage or are "
                    "quarantined with their reason, as data.on_bad_sample says.")
    return add_params_args(parser)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    return run_stage("ingest", _run, args)


if __name__ == "__main__":
    raise SystemExit(main())
