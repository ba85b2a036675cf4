"""``gradients`` stage: precompute outward-reference gradient labels at the training resolution.

Reads ``<data.prepared>/manifest.jsonl``, ``data.size``, ``gradients.mode``; writes
``<gradients.out>/<set>/<key>.png`` (16-bit, see :mod:`birefnet.data.gradients`) and ``index.json``, whose
``files`` maps ``<set>/<key>.png`` to the label's sha256 and its image's (the shard stage checks both).
With ``gradients.mode: on_the_fly`` only ``index.json`` is written and training computes labels itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
from tqdm import tqdm

from birefnet.config import Params
from birefnet.data.gradients import GRADIENT_OFFSET, GRADIENT_SCALE, encode_gradient, gradient_label
from birefnet.data.io import ImageReadError, load_image
from birefnet.stages.common import StageInputError, add_params_args, read_manifest, run_stage

# forkserver, not fork: a fork of a process that already ran OpenCV or torch thread pools can deadlock.
_POOL_CONTEXT = multiprocessing.get_context("forkserver")

log = logging.getLogger("birefnet.gradients")


def gradient_path(out: Path, set_name: str, key: str) -> Path:
    """Where the label of one sample is stored."""
    return Path(out) / set_name / f"{key}.png"


def label_name(set_name: str, key: str) -> str:
    """The name of a label relative to ``gradients.out`` (the key of ``index.json``'s ``files``)."""
    return f"{set_name}/{key}.png"


def _one(job: tuple[str, str | None, str, int, int, int]) -> tuple[str | None, str | None]:
    """Write one label; return ``(error, sha256 of the PNG written)``."""
    image_path, image_sha256, target, width, height, max_pixels = job
    try:
        # the image is hashed while it is read: a label is never computed from an original that changed after ingest
        image = load_image(image_path, max_pixels, expected_sha256=image_sha256)
    except ImageReadError as exc:
        return str(exc), None
    resized = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    ok, png = cv2.imencode(".png", encode_gradient(gradient_label(resized)), [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        return f"{image_path}: OpenCV could not encode the gradient label", None
    data = png.tobytes()
    Path(target).write_bytes(data)
    return None, hashlib.sha256(data).hexdigest()


def compute_gradients(params: Params, progress: bool = True) -> int:
    """Write every label and ``index.json`` (with each label's sha256 and its image's); return the number written.

    Raises:
        StageInputError: an image that cannot be read, or whose sha256 is not the manifest's (changed since
            ingest); nothing is published then.
    """
    records = read_manifest(Path(params.data.prepared) / "manifest.jsonl")
    out = Path(params.gradients.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    width, height = params.data.size
    jobs = []
    names: list[tuple[str, str | None]] = []
    if params.gradients.mode == "precomputed":
        for rec in records:
            target = gradient_path(tmp, rec["set"], rec["key"])
            target.parent.mkdir(parents=True, exist_ok=True)
            jobs.append((rec["image"], rec.get("image_sha256"), str(target), width, height,
                         params.data.max_image_pixels))
            names.append((label_name(rec["set"], rec["key"]), rec.get("image_sha256")))
    errors: list[str] = []
    files: dict[str, dict[str, str | None]] = {}
    bar = tqdm(total=len(jobs), desc="gradients", unit="img", disable=not progress)
    workers = max(1, params.data.workers)
    if workers > 1 and len(jobs) > 8:
        with ProcessPoolExecutor(max_workers=workers, mp_context=_POOL_CONTEXT) as pool:
            outcomes = []
            for outcome in pool.map(_one, jobs, chunksize=8):
                outcomes.append(outcome)
                bar.update()
    else:
        outcomes = []
        for job in jobs:
            outcomes.append(_one(job))
            bar.update()
    bar.close()
    for (name, image_sha256), (err, digest) in zip(names, outcomes, strict=True):
        if err:
            errors.append(err)
        else:
            files[name] = {"sha256": digest, "image_sha256": image_sha256}
    if errors:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StageInputError(f"{len(errors)} image(s) in the manifest could not be read (changed since ingest?): "
                              + "; ".join(errors[:10]))
    index = {
        "mode": params.gradients.mode,
        "size": [width, height],
        "count": len(jobs),
        "encoding": {"format": "png16", "value": f"uint16 / {GRADIENT_SCALE:g} - {GRADIENT_OFFSET / GRADIENT_SCALE:g}"},
        "definition": "5x5 normalised Laplacian (reflect-101) of the channel mean of the ImageNet-normalised image",
        "files": files,
    }
    (tmp / "index.json").write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return len(jobs)


def run(params: Params, progress: bool = False) -> int:
    """Stage entry for flows and tests (same as :func:`compute_gradients`)."""
    return compute_gradients(params, progress=progress)


def _run(params: Params, args: argparse.Namespace) -> None:
    n = compute_gradients(params, progress=not args.quiet)
    if params.gradients.mode == "precomputed":
        log.info("wrote %d gradient labels at %dx%d to %s", n, *params.data.size, params.gradients.out)
    else:
        log.info("gradients.mode is on_the_fly: no labels precomputed (index only) in %s", params.gradients.out)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="birefnet gradients",
        description="Precompute the outward-reference gradient labels (Laplacian of the normalised gray image, "
                    "at data.size) for every sample in the manifest, as 16-bit PNGs under gradients.out.")
    return add_params_args(parser)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    return run_stage("gradients", _run, args)


if __name__ == "__main__":
    raise SystemExit(main())
