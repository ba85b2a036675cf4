"""``shard`` stage: pack the prepared dataset into WebDataset tar shards, one folder per split.

Reads ``<data.prepared>/manifest.jsonl`` (the ingest stage's accepted samples), the original images and masks it
points to and, with ``gradients.mode: precomputed``, the gradient labels ``<gradients.out>/<set>/<key>.png``.
Writes ``<shard.out>/<split>/<set>-%06d.tar`` and ``<shard.out>/<split>/index.json`` (shards, sample counts,
sha256). Samples of a set are written in the order of their manifest key, encoded by ``data.workers`` processes.

``shard.out`` may be an object-store URL (``s3://bucket/prefix``; credentials and endpoint from the AWS variables,
e.g. ``AWS_ENDPOINT_URL_S3`` for MinIO): shards are then uploaded as they are written, nothing staged locally. That
is for the cluster path (``birefnet shard --set shard.out=s3://...`` outside DVC): the dvc.yaml ``outs`` entry stays
a local folder, because DVC tracks and caches local outputs only.

Usage::

    python -m birefnet.stages.shard --params params.yaml [--set shard.max_samples=128]
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import multiprocessing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from birefnet.config import Params
from birefnet.data.shards import (
    INDEX_NAME,
    AtomicShardWriter,
    EncodeOptions,
    SampleError,
    SampleTask,
    SplitIndex,
    clean_split_folder,
    encode_sample,
    is_url,
    join_location,
    remove_location,
    safe_name,
    write_atomic,
)
from birefnet.stages.common import StageInputError, add_params_args, read_manifest, run_stage

log = logging.getLogger("birefnet.shard")

SPLITS = ("train", "val", "test")


def group_entries(entries: list[dict[str, Any]], params: Params) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """split -> set -> entries sorted by key; sets outside every split are left out (logged).

    Raises:
        StageInputError: duplicate keys in a set, or two set names that map to the same shard name.
    """
    grouped: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for entry in entries:
        split = entry.get("split") or params.data.split_of(entry["set"])
        if split is None:
            continue
        grouped.setdefault(split, {}).setdefault(entry["set"], []).append(entry)
    for sets in grouped.values():
        seen: dict[str, str] = {}
        for set_name, items in sets.items():
            if safe_name(set_name) in seen:
                raise StageInputError(f"sets {seen[safe_name(set_name)]!r} and {set_name!r} both map to shard "
                                      f"name {safe_name(set_name)!r}")
            seen[safe_name(set_name)] = set_name
            items.sort(key=lambda e: e["key"])
            for a, b in zip(items, items[1:], strict=False):
                if a["key"] == b["key"]:
                    raise StageInputError(f"set {set_name!r}: key {a['key']!r} appears twice in the manifest")
    unused = sorted({e["set"] for e in entries} - {s for sets in grouped.values() for s in sets})
    if unused:
        log.info("sets not in data.train_sets/val_sets/test_sets, not sharded: %s", unused)
    return grouped


def read_gradient_records(folder: Path) -> dict[str, dict[str, Any]] | None:
    """``files`` of ``<gradients.out>/index.json``: ``<set>/<key>.png`` -> ``{"sha256", "image_sha256"}``.

    Returns:
        The records, or None when the folder has no index or an index without ``files`` (labels written by other
        tools): those labels are still decoded in full, but not hash-checked.

    Raises:
        StageInputError: an index that is not JSON.
    """
    path = folder / "index.json"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StageInputError(f"{path}: unreadable gradients index ({exc}); rerun `birefnet gradients`") from None
    files = doc.get("files") if isinstance(doc, dict) else None
    return files if isinstance(files, dict) else None


def gradient_sha256_for(entry: dict[str, Any], records: dict[str, dict[str, Any]] | None, folder: Path) -> str | None:
    """The recorded sha256 of a sample's gradient label, after checking it was computed from this image version.

    Raises:
        StageInputError: the label is not in the index, or was computed from an image whose sha256 is not the
            manifest's (the gradients stage ran before the last ingest).
    """
    if records is None:
        return None
    from birefnet.stages.gradients import label_name

    name = label_name(entry["set"], entry["key"])
    record = records.get(name)
    if not isinstance(record, dict) or not record.get("sha256"):
        raise StageInputError(f"{folder / name}: not listed in {folder / 'index.json'} (set {entry['set']!r}, key "
                              f"{entry['key']!r}); rerun `birefnet gradients`")
    if record.get("image_sha256") != entry.get("image_sha256"):
        raise StageInputError(f"{folder / name} was computed from {entry['image']} with sha256 "
                              f"{record.get('image_sha256')}, but the manifest has {entry.get('image_sha256')}; "
                              "rerun `birefnet gradients`")
    return str(record["sha256"])


def _init_worker() -> None:
    import cv2

    # A process forked from a parent that used OpenCV's thread pool deadlocks on it: run OpenCV sequentially.
    cv2.setNumThreads(0)


def _encode(task: SampleTask, options: EncodeOptions) -> dict[str, Any]:
    try:
        return encode_sample(task, options)
    except SampleError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure is reported with the sample's name
        raise SampleError(f"set {task.entry['set']!r}, key {task.entry['key']!r}: {type(exc).__name__}: {exc}") \
            from None


def run(params: Params, quiet: bool = False) -> dict[str, SplitIndex]:
    """Shard every split of the manifest.

    Args:
        params: the whole params (reads ``data``, ``gradients``, ``shard``).
        quiet: no progress bar.

    Returns:
        split -> the index written to ``<shard.out>/<split>/index.json``.

    Raises:
        StageInputError: missing/invalid manifest, unreadable originals or gradient labels, an original whose
            sha256 is not the manifest's (changed after ingest) or a gradient label whose sha256 is not the
            gradients index's (each named).
    """
    shard = params.shard
    entries = read_manifest(Path(params.data.prepared) / "manifest.jsonl")
    grouped = group_entries(entries, params)
    if not grouped:
        raise StageInputError(f"{params.data.prepared}/manifest.jsonl has no sample of a train/val/test set")
    with_gradient = params.gradients.mode == "precomputed"
    gradients_dir = Path(params.gradients.out)
    gradient_records = read_gradient_records(gradients_dir) if with_gradient else None
    if with_gradient and gradient_records is None:
        log.warning("%s has no per-file hashes: gradient labels are decoded in full but not hash-checked (rerun "
                    "`birefnet gradients` to record them)", gradients_dir / "index.json")
    # checked for every sample before any output is touched
    gradient_hashes = {(e["set"], e["key"]): gradient_sha256_for(e, gradient_records, gradients_dir)
                       for sets in grouped.values() for items in sets.values() for e in items} if with_gradient else {}
    size = tuple(params.data.size)
    options = EncodeOptions(size=size if shard.resize else None, image_format=shard.image_format,
                            quality=shard.quality, png_compression=shard.png_compression,
                            gradient_size=size, max_pixels=params.data.max_image_pixels)
    out = str(shard.out) if is_url(shard.out) else Path(shard.out)
    total = sum(len(items) for sets in grouped.values() for items in sets.values())
    log.info("sharding %d samples (%s) into %s with %d worker(s)", total,
             ", ".join(f"{s}: {sum(len(v) for v in grouped[s].values())}" for s in SPLITS if s in grouped),
             out, max(1, params.data.workers))
    # Readers enter through index.json: remove every index first so an interrupted run leaves none behind.
    for split in SPLITS:
        remove_location(join_location(out, split, INDEX_NAME))
    for split in SPLITS:
        if split not in grouped:
            clean_split_folder(join_location(out, split))

    indexes: dict[str, SplitIndex] = {}
    encode = functools.partial(_encode, options=options)
    pool = (multiprocessing.get_context("forkserver").Pool(params.data.workers, initializer=_init_worker)
            if params.data.workers > 1 else None)
    try:
        with logging_redirect_tqdm(), tqdm(total=total, unit="sample", desc="shard", disable=quiet) as bar:
            for split in SPLITS:
                if split not in grouped:
                    continue
                folder = join_location(out, split)
                clean_split_folder(folder)
                index = SplitIndex(split=split, size=list(size) if shard.resize else None,
                                   image_ext=f"image.{shard.image_format}", gradient=with_gradient,
                                   original_mask=split in shard.original_masks)
                for set_name, items in grouped[split].items():
                    tasks = [SampleTask(entry=e, index=i,
                                        gradient_path=str(gradients_dir / e["set"] / f"{e['key']}.png")
                                        if with_gradient else None,
                                        original_mask=index.original_mask,
                                        gradient_sha256=gradient_hashes.get((e["set"], e["key"])))
                             for i, e in enumerate(items)]
                    results: Iterator[dict[str, Any]] = (pool.imap(encode, tasks, chunksize=2) if pool is not None
                                                         else map(encode, tasks))
                    with AtomicShardWriter(folder, set_name, shard.max_samples, shard.max_bytes) as writer:
                        for sample in results:
                            writer.write(sample)
                            bar.update(1)
                    shards = writer.shards
                    index.sets[set_name] = {"samples": len(items), "shards": [vars(s) for s in shards]}
                    log.info("%s/%s: %d samples in %d shard(s), %.1f MiB", split, set_name, len(items), len(shards),
                             sum(s.bytes for s in shards) / 2**20)
                keep = [s["file"] for v in index.sets.values() for s in v["shards"]]
                clean_split_folder(folder, keep=keep)
                write_atomic(join_location(folder, INDEX_NAME), index.to_json())
                indexes[split] = index
    except SampleError as exc:
        raise StageInputError(str(exc)) from None
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return indexes


def get_args_parser() -> argparse.ArgumentParser:
    """Parser for ``birefnet shard``."""
    parser = argparse.ArgumentParser(
        prog="birefnet shard",
        description="Pack the samples of data.prepared/manifest.jsonl (the ingest stage's output) into WebDataset "
                    "tar shards, one folder per split: image and mask (resized to data.size when shard.resize), "
                    "plus the gradient label from gradients.out with gradients.mode: precomputed. Writes "
                    "shard.out/<split>/<set>-NNNNNN.tar (at most shard.max_samples samples or shard.max_bytes "
                    "each) and shard.out/<split>/index.json (shards, sample counts, sha256); samples are encoded "
                    "by data.workers processes, in manifest-key order.")
    return add_params_args(parser)


def main(argv: list[str] | None = None) -> int:
    """Run the stage; returns the exit code (0 ok, 2 bad params, 3 bad input)."""
    args = get_args_parser().parse_args(argv)
    return run_stage("shard", lambda params, a: run(params, quiet=a.quiet), args)


if __name__ == "__main__":
    raise SystemExit(main())
