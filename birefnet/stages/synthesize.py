"""``synthesize`` stage: write the embedded DIS-like dataset in DIS5K layout.

Reads ``data.synthetic``; writes ``<data.synthetic.out>/<set>/im/<name>.jpg`` and ``.../gt/<name>.png``.
The output folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
from tqdm import tqdm

from birefnet.config import Params, SyntheticParams
from birefnet.data.synthetic import generate_sample
from birefnet.stages.common import add_params_args, run_stage

# forkserver, not fork: a fork of a process that already ran OpenCV or torch thread pools can deadlock.
_POOL_CONTEXT = multiprocessing.get_context("forkserver")

log = logging.getLogger("birefnet.synthesize")


def _write_one(job: tuple[int, int, int, str, int, int, int, str]) -> str:
    seed, set_index, index, set_name, min_side, max_side, quality, root = job
    sample = generate_sample(seed, set_index, index, set_name, min_side, max_side)
    set_dir = Path(root) / set_name
    ok_im, jpg = cv2.imencode(".jpg", cv2.cvtColor(sample.image, cv2.COLOR_RGB2BGR),
                              [cv2.IMWRITE_JPEG_QUALITY, quality])
    ok_gt, png = cv2.imencode(".png", sample.mask, [cv2.IMWRITE_PNG_COMPRESSION, 6])
    if not (ok_im and ok_gt):
        raise RuntimeError(f"OpenCV failed to encode sample {set_name}/{sample.name}")
    (set_dir / "im" / f"{sample.name}.jpg").write_bytes(jpg.tobytes())
    (set_dir / "gt" / f"{sample.name}.png").write_bytes(png.tobytes())
    return sample.name


def synthesize(cfg: SyntheticParams, workers: int = 2, progress: bool = True) -> dict[str, int]:
    """Generate the dataset described by ``cfg`` into ``cfg.out``.

    Returns:
        Number of samples written per set.
    """
    out = Path(cfg.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    jobs = []
    for set_index, (set_name, count) in enumerate(cfg.counts.items()):
        (tmp / set_name / "im").mkdir(parents=True, exist_ok=True)
        (tmp / set_name / "gt").mkdir(parents=True, exist_ok=True)
        jobs += [(cfg.seed, set_index, i, set_name, cfg.min_side, cfg.max_side, cfg.jpeg_quality, str(tmp))
                 for i in range(count)]
    bar = tqdm(total=len(jobs), desc="synthesize", unit="img", disable=not progress)
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers, mp_context=_POOL_CONTEXT) as pool:
            for _ in pool.map(_write_one, jobs, chunksize=4):
                bar.update()
    else:
        for job in jobs:
            _write_one(job)
            bar.update()
    bar.close()
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return dict(cfg.counts)


def run(params: Params, progress: bool = False) -> dict[str, int]:
    """Stage entry for flows and tests: write the dataset of ``params.data.synthetic``."""
    return synthesize(params.data.synthetic, workers=max(1, params.data.workers), progress=progress)


def _run(params: Params, args: argparse.Namespace) -> None:
    cfg = params.data.synthetic
    counts = synthesize(cfg, workers=max(1, params.data.workers), progress=not args.quiet)
    log.info("wrote %d samples to %s: %s", sum(counts.values()), cfg.out,
             ", ".join(f"{k} {v}" for k, v in counts.items()))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="birefnet synthesize",
        description="Write the embedded DIS-like dataset (DIS5K layout: <set>/im/*.jpg, <set>/gt/*.png) to "
                    "data.synthetic.out. Deterministic: the same data.synthetic params give byte-identical files. "
                    "DIS-TE1..4 have increasing structural complexity.")
    return add_params_args(parser)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    return run_stage("synthesize", _run, args)


if __name__ == "__main__":
    raise SystemExit(main())
