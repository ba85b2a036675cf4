"""Streaming WebDataset loader for training and evaluation (reads the ``shard`` stage's output).

Work is split over *readers*: reader ``j = rank * workers + worker`` of ``n = world_size * workers``. Each shard
is cut into ``k = ceil(n / shards)`` equal sample ranges ("units"), so every reader has work even when there are
fewer shards than readers, and uneven shards never starve a rank.

* Training (:func:`make_train_loader`): for epoch ``e`` all readers see the same endless stream of unit
  permutations seeded by ``(seed, e, cycle)``; reader ``j`` takes every ``n``-th unit starting at ``j`` (shard
  shuffle, split by rank and worker, with no overlap inside a cycle). Samples go through a shuffle buffer seeded
  by ``(seed, e, rank, worker)``, are decoded with OpenCV, augmented and batched in the worker. Every worker
  yields exactly ``batches_per_worker`` full batches, so every rank runs the same number of steps per epoch
  (no DDP hang on uneven shards); with the default epoch length one epoch is about one pass over the data.
* Evaluation (:func:`make_eval_loader`): one exact pass over one set. The set's samples (in index order) are cut
  into ``n`` contiguous ranges, one per reader: every sample is seen exactly once over all ranks and workers.
  Ranks may differ by one batch; evaluate without per-batch collectives (gather metrics at the end).

A batch is a dict:

* ``image``: (B, 3, H, W) float32, ImageNet-normalised RGB (uint8 RGB with ``normalize=False``; then
  :func:`normalize_batch` does it on the device).
* ``mask``: (B, 1, H, W) float32 in [0, 1] (uint8 0..255 with ``normalize=False``).
* ``gradient``: (B, 1, H, W) float32 gradient label (only when the shards carry precomputed labels and
  ``with_gradient`` is on).
* ``class_id``: (B,) int64, -1 when the sample has no class.
* ``orig_size``: (B, 2) int64 original (height, width).
* ``key`` / ``set`` / ``sample_key`` / ``shard``: lists of B strings (original file stem, set name, WebDataset
  key, shard path).
* ``mask_original``: list of B (H_i, W_i) uint8 tensors at original resolution (evaluation, when the shards
  keep them).
* ``skipped``: int, samples this worker skipped (``on_decode_error="skip"``) since its previous batch.
* ``size``: int, B.

Shard locations: a local split folder or an object-store URL (``s3://bucket/prefix/train``, read through fsspec;
credentials and endpoint from the AWS variables). Remote shards are streamed with ranged reads, never copied to
local disk, and split over ranks and workers exactly as local ones. Whenever a reader reads a whole shard, the
bytes it streamed are hashed and checked against the sha256 in ``index.json``.

Workers send uint8 images and masks; the float conversion happens after the transfer (in the main process, or on
the GPU with ``normalize=False``): a float32 batch costs four times the shared-memory pages, and page faults on
fresh buffers, not arithmetic, dominate the normalisation cost at 1024x1024.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from birefnet.data.gradients import decode_gradient
from birefnet.data.shards import SplitIndex, join_location, open_for_read
from birefnet.data.transforms import AugmentConfig, augment_sample, check_gradient_compatible
from birefnet.imaging import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger("birefnet.loader")

Unit = tuple[str, int, int]  # (shard path, first sample, end sample) of a shard's sample range


@functools.cache
def _normalize_luts() -> tuple[np.ndarray, ...]:
    values = np.arange(256, dtype=np.float64) / 255.0
    return tuple(((values - m) / sd).astype(np.float32).reshape(256, 1)
                 for m, sd in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))


def _normalize_cpu(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float32 ImageNet-normalised with one table lookup per channel (one pass)."""
    out = torch.empty(image.shape, dtype=torch.float32)
    source, target = image.contiguous().numpy(), out.numpy()
    for i in range(source.shape[0]):
        for c, lut in enumerate(_normalize_luts()):
            cv2.LUT(source[i, c], lut, dst=target[i, c])
    return out


def normalize_batch(batch: dict[str, Any], device: torch.device | str | None = None,
                    non_blocking: bool = True) -> dict[str, Any]:
    """Turn a raw batch (``normalize=False``) into the model's input, optionally on a device first.

    Moving uint8 to the GPU and normalising there moves a quarter of the bytes of a float batch.

    Args:
        batch: ``image`` (B, 3, H, W) uint8 RGB, ``mask`` (B, 1, H, W) uint8 (already float batches pass through).
        device: where to put the tensors (None: stay where they are).
        non_blocking: asynchronous copies from pinned memory.

    Returns:
        The same dict with ``image`` (B, 3, H, W) float32 ImageNet-normalised, ``mask`` (B, 1, H, W) float32 in
        [0, 1] and every other tensor on ``device``.
    """
    out = dict(batch)
    for name, value in batch.items():
        if isinstance(value, torch.Tensor) and device is not None:
            out[name] = value.to(device, non_blocking=non_blocking)
    image = out["image"]
    if image.dtype == torch.uint8 and image.device.type == "cpu":
        out["image"] = _normalize_cpu(image)
    elif image.dtype == torch.uint8:
        mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(1, 3, 1, 1) * 255.0
        scale = 1.0 / (torch.tensor(IMAGENET_STD, device=image.device).view(1, 3, 1, 1) * 255.0)
        out["image"] = image.to(torch.float32).sub_(mean).mul_(scale)
    if out["mask"].dtype == torch.uint8:
        out["mask"] = out["mask"].to(torch.float32).div_(255.0)
    return out


class SampleDecodeError(RuntimeError):
    """A sample or shard could not be read; the message names the shard and the sample key."""


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): the given values, else ``RANK``/``WORLD_SIZE`` (set by Ray Train / torchrun), else
    the initialised ``torch.distributed`` group, else (0, 1)."""
    if rank is None:
        if "RANK" in os.environ:
            rank = int(os.environ["RANK"])
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank()
        else:
            rank = 0
    if world_size is None:
        if "WORLD_SIZE" in os.environ:
            world_size = int(os.environ["WORLD_SIZE"])
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            world_size = torch.distributed.get_world_size()
        else:
            world_size = 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return rank, world_size


def split_units(shards: Sequence[tuple[str, int]], parts: int) -> list[Unit]:
    """Cut each shard into ``parts`` near-equal sample ranges (empty ranges dropped).

    Args:
        shards: (path, samples) per shard.
        parts: ranges per shard.
    """
    units: list[Unit] = []
    for path, count in shards:
        bounds = [count * p // parts for p in range(parts + 1)]
        units += [(path, a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    return units


def contiguous_units(shards: Sequence[tuple[str, int]], start: int, stop: int) -> list[Unit]:
    """The units covering global sample positions ``[start, stop)`` of the concatenated shards."""
    units: list[Unit] = []
    offset = 0
    for path, count in shards:
        a, b = max(start, offset), min(stop, offset + count)
        if b > a:
            units.append((path, a - offset, b - offset))
        offset += count
    return units


@dataclass(frozen=True)
class ReaderConfig:
    """Everything a worker needs to read, decode and batch (picklable, no tensors).

    Attributes:
        shards: (path, samples) of every shard of the selected sets, in index order.
        mode: ``train`` (endless shuffled stream, fixed batch count) or ``eval`` (exact single pass).
        size: (width, height) output size.
        batch_size: samples per batch.
        image_ext: member name of the image (``image.jpg``).
        with_gradient: decode ``gradient.png`` into ``batch["gradient"]``.
        with_original_mask: decode ``mask_original.png`` into ``batch["mask_original"]``.
        augment: augmentations (train only).
        shuffle_buffer: samples in the shuffle buffer (train only; 0 disables).
        seed: base seed.
        batches_per_worker: full batches each worker yields per epoch (train only).
        rank: this process's rank.
        world_size: number of ranks.
        workers: DataLoader workers per rank (0 = in the main process).
        on_decode_error: ``fail`` raises :class:`SampleDecodeError`; ``skip`` drops and counts.
        digests: (path, sha256) of the shards, from the index: checked whenever a reader reads a whole shard.
    """

    shards: tuple[tuple[str, int], ...]
    mode: Literal["train", "eval"]
    size: tuple[int, int]
    batch_size: int
    image_ext: str = "image.jpg"
    with_gradient: bool = False
    with_original_mask: bool = False
    augment: AugmentConfig = AugmentConfig()
    shuffle_buffer: int = 0
    seed: int = 0
    batches_per_worker: int = 0
    rank: int = 0
    world_size: int = 1
    workers: int = 0
    on_decode_error: Literal["fail", "skip"] = "fail"
    digests: tuple[tuple[str, str], ...] = ()


class _HashingReader:
    """A read-only stream wrapper hashing every byte read (tarfile's stream mode only calls ``read``)."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.digest.update(data)
        return data

    def drain(self) -> str:
        """Read the rest (end-of-archive padding) and return the hex digest of everything."""
        while self.read(1 << 20):
            pass
        return self.digest.hexdigest()


def _tar_samples(stream: Any, url: str) -> Iterator[dict[str, Any]]:
    """WebDataset samples of an open tar stream (members grouped by key), ``__url__`` set to ``url``."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    return group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))


class ShardStream(IterableDataset):
    """The per-worker WebDataset pipeline: units -> tar samples -> shuffle -> decode/augment -> batches.

    Set :attr:`epoch` before iterating (workers are started per epoch and copy it).
    """

    def __init__(self, config: ReaderConfig) -> None:
        super().__init__()
        self.config = config
        self.epoch = 0

    # ---------------------------------------------------------------------------------------- units
    def _reader(self) -> tuple[int, int, int]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        c = self.config
        return c.rank * workers + worker, c.world_size * workers, worker

    def units(self, reader: int, readers: int) -> Iterator[Unit]:
        """The sample ranges reader ``reader`` of ``readers`` reads this epoch (endless for training)."""
        c = self.config
        if c.mode == "eval":
            total = sum(n for _, n in c.shards)
            yield from contiguous_units(c.shards, total * reader // readers, total * (reader + 1) // readers)
            return
        parts = max(1, math.ceil(readers / max(1, len(c.shards))))
        units = split_units(c.shards, parts)
        if not units:
            raise SampleDecodeError("no samples in the training shards")
        position, cycle = 0, 0
        while True:
            order = np.random.default_rng([c.seed, self.epoch, cycle]).permutation(len(units))
            for u in order:
                if position % readers == reader:
                    yield units[u]
                position += 1
            cycle += 1

    def _samples(self, units: Iterator[Unit], counter: list[int]) -> Iterator[dict[str, Any]]:
        skip = self.config.on_decode_error == "skip"
        counts = dict(self.config.shards)
        digests = dict(self.config.digests)
        yielded = 0
        for path, start, stop in units:
            position, key = -1, None
            # a reader of a whole shard streams every byte of it anyway: hash them against the index
            whole = start == 0 and stop == counts.get(path) and path in digests
            try:
                with open_for_read(path) as raw:
                    stream = _HashingReader(raw) if whole else raw
                    for position, sample in enumerate(_tar_samples(stream, path)):
                        if position >= stop:
                            break
                        if position >= start:
                            key = sample["__key__"]
                            yielded += 1
                            yield sample
                    actual = stream.drain() if whole and position + 1 == stop else None
            except Exception as exc:  # noqa: BLE001 - tar/IO errors name the shard
                where = f"shard {path}" + (f" after sample {key}" if key else "")
                if not skip:
                    raise SampleDecodeError(f"{where}: cannot read the tar ({type(exc).__name__}: {exc})") from exc
                counter[0] += 1
                log.warning("%s: skipped the rest of the shard: %s", where, exc)
                if counter[0] > 100 and yielded == 0:
                    raise SampleDecodeError(f"no readable sample after {counter[0]} failures; last: {where}: {exc}") \
                        from exc
                continue
            if position + 1 < stop and not skip:
                raise SampleDecodeError(f"shard {path}: has {position + 1} samples, the index says at least {stop}; "
                                        "reshard")
            if actual is not None and actual != digests[path]:
                message = f"shard {path}: sha256 {actual}, the index says {digests[path]}; reshard"
                if not skip:
                    raise SampleDecodeError(message)
                log.warning("%s (its samples were used)", message)

    # ---------------------------------------------------------------------------------------- decode
    def decode(self, sample: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
        """Decode (and, in training, augment) one raw WebDataset sample.

        Returns:
            ``image`` (H, W, 3) uint8 RGB, ``mask`` (H, W) uint8, ``gradient`` (H, W) float32 or None,
            ``mask_original`` (H0, W0) uint8 or None, and the json ``meta``.

        Raises:
            SampleDecodeError: naming shard and key.
        """
        c = self.config
        where = f"shard {sample.get('__url__')}, key {sample.get('__key__')}"

        def member(ext: str) -> np.ndarray:
            data = sample.get(ext)
            if data is None:
                members = sorted(k for k in sample if not k.startswith("__"))
                raise SampleDecodeError(f"{where}: no '{ext}' member (has {members})")
            return np.frombuffer(data, dtype=np.uint8)

        def decoded(ext: str, flags: int) -> np.ndarray:
            arr = cv2.imdecode(member(ext), flags)
            if arr is None:
                raise SampleDecodeError(f"{where}: '{ext}' could not be decoded")
            return arr

        try:
            meta = json.loads(sample.get("json", b"{}"))
        except ValueError as exc:
            raise SampleDecodeError(f"{where}: 'json' is not valid JSON ({exc})") from None
        if meta.get("key"):
            where += f" ({meta.get('set')}/{meta['key']})"
        image = cv2.cvtColor(decoded(c.image_ext, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        mask = decoded("mask.png", cv2.IMREAD_GRAYSCALE)
        gradient = None
        if c.with_gradient:
            stored = decoded("gradient.png", cv2.IMREAD_UNCHANGED)
            if stored.dtype != np.uint16 or stored.ndim != 2:
                raise SampleDecodeError(f"{where}: 'gradient.png' is not a 16-bit gray PNG")
            gradient = decode_gradient(stored)
        mask_original = decoded("mask_original.png", cv2.IMREAD_GRAYSCALE) if c.with_original_mask else None
        if image.shape[:2] != mask.shape[:2]:
            raise SampleDecodeError(f"{where}: image {image.shape[:2]} and mask {mask.shape[:2]} differ in size")
        size = tuple(c.size)
        if (image.shape[1], image.shape[0]) != size:
            image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
            mask = cv2.resize(mask, size, interpolation=cv2.INTER_LINEAR)
        if gradient is not None and (gradient.shape[1], gradient.shape[0]) != size:
            gradient = cv2.resize(gradient, size, interpolation=cv2.INTER_LINEAR)
        if rng is not None:
            image, mask, gradient = augment_sample(image, mask, gradient, c.augment, rng)
        return {"image": image, "mask": mask, "gradient": gradient, "mask_original": mask_original, "meta": meta,
                "sample_key": sample["__key__"], "shard": sample["__url__"]}

    # ---------------------------------------------------------------------------------------- batches
    def collate(self, items: list[dict[str, Any]], skipped: int) -> dict[str, Any]:
        """Stack decoded samples into the batch dict described in the module docstring."""
        batch: dict[str, Any] = {"size": len(items), "skipped": skipped}
        if not items:
            return batch
        # uint8 crosses the process boundary (a quarter of float32's shared-memory pages); ShardLoader or the
        # caller's normalize_batch turns it into the model's float input.
        height, width = items[0]["image"].shape[:2]
        image = np.empty((len(items), 3, height, width), dtype=np.uint8)
        for i, it in enumerate(items):  # HWC -> CHW: cv2.split into the batch is ~15x faster than a permute copy
            cv2.split(it["image"], [image[i, 0], image[i, 1], image[i, 2]])
        batch["image"] = torch.from_numpy(image)
        batch["mask"] = torch.from_numpy(np.stack([it["mask"] for it in items])).unsqueeze(1)
        if self.config.with_gradient:
            batch["gradient"] = torch.from_numpy(np.stack([it["gradient"] for it in items])).unsqueeze(1)
        batch["class_id"] = torch.tensor([int(it["meta"].get("class_id", -1)) for it in items], dtype=torch.int64)
        batch["orig_size"] = torch.tensor([[int(it["meta"].get("height", 0)), int(it["meta"].get("width", 0))]
                                           for it in items], dtype=torch.int64)
        batch["key"] = [str(it["meta"].get("key", it["sample_key"])) for it in items]
        batch["set"] = [str(it["meta"].get("set", "")) for it in items]
        batch["sample_key"] = [it["sample_key"] for it in items]
        batch["shard"] = [it["shard"] for it in items]
        if self.config.with_original_mask:
            batch["mask_original"] = [torch.from_numpy(it["mask_original"]) for it in items]
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        c = self.config
        if get_worker_info() is not None:
            # Sequential OpenCV in workers: one process per core already, and a worker forked from a parent that
            # used OpenCV's pthreads pool deadlocks on its first parallel call unless the pool is switched off.
            cv2.setNumThreads(0)
        reader, readers, worker = self._reader()
        counter = [0]
        samples = self._samples(self.units(reader, readers), counter)
        train = c.mode == "train"
        rng = None
        if train:
            seed = [c.seed, self.epoch, c.rank, worker]
            # A buffer larger than this reader's share of one pass would only hold repeats of the same samples.
            buffer = min(c.shuffle_buffer, math.ceil(sum(n for _, n in c.shards) / readers))
            if buffer > 1:
                samples = wds.shuffle(buffer, initial=buffer,
                                      rng=random.Random(str(seed)))(samples)
            rng = np.random.default_rng(seed + [1])
        items: list[dict[str, Any]] = []
        emitted, reported, seen = 0, 0, 0
        for sample in samples:
            seen += 1
            try:
                items.append(self.decode(sample, rng))
            except SampleDecodeError as exc:
                if c.on_decode_error != "skip":
                    raise
                counter[0] += 1
                log.warning("skipped: %s", exc)
                if train and counter[0] > 100 and counter[0] > seen // 2:
                    raise SampleDecodeError(f"more than half of {seen} samples failed to decode; last: {exc}") \
                        from None
                continue
            if len(items) == c.batch_size:
                yield self.collate(items, counter[0] - reported)
                reported, items = counter[0], []
                emitted += 1
                if train and emitted >= c.batches_per_worker:
                    return
        if items or counter[0] > reported:
            yield self.collate(items, counter[0] - reported)


class ShardLoader:
    """Iterates batches of a :class:`ShardStream` through a ``torch.utils.data.DataLoader``.

    Workers are started for each epoch (``iter(loader)``), so :meth:`set_epoch` reaches them. In training the
    epoch advances by itself after each full iteration; call :meth:`set_epoch` to resume at an epoch.

    Attributes:
        dataset: the stream.
        skipped: samples skipped (``on_decode_error="skip"``) over the loader's life.
    """

    def __init__(self, dataset: ShardStream, num_batches: int, pin_memory: bool, prefetch_factor: int,
                 normalize: bool = True) -> None:
        self.dataset = dataset
        self.normalize = normalize
        self.num_batches = num_batches
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.prefetch_factor = prefetch_factor
        self.skipped = 0
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next iteration's shard order, shuffle and augmentation seeds."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches this rank yields per epoch (exact in training; in evaluation also exact unless samples are
        skipped)."""
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        workers = self.dataset.config.workers
        self.dataset.epoch = self.epoch
        loader = DataLoader(self.dataset, batch_size=None, num_workers=workers, pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch_factor if workers > 0 else None,
                            persistent_workers=False)
        for batch in loader:
            self.skipped += int(batch["skipped"])
            if batch["size"]:
                yield normalize_batch(batch) if self.normalize else batch
        if self.dataset.config.mode == "train":
            self.epoch += 1


def _read_index(folder: str | Path) -> SplitIndex:
    return SplitIndex.read(folder)


def make_train_loader(shard_dir: str | Path, *, size: tuple[int, int], batch_size: int, workers: int = 2,
                      augment: AugmentConfig | None = None, shuffle_buffer: int = 128, seed: int = 0,
                      epoch_batches: int | None = None, with_gradient: bool = True, sets: Sequence[str] | None = None,
                      on_decode_error: Literal["fail", "skip"] = "fail", pin_memory: bool = True,
                      prefetch_factor: int = 2, normalize: bool = True, rank: int | None = None,
                      world_size: int | None = None) -> ShardLoader:
    """Training loader over a split folder (``<shard.out>/train``).

    Args:
        shard_dir: folder (or URL, ``s3://bucket/shards/train``) holding ``index.json`` and the shards.
        size: (width, height) of the output batches (``data.size``).
        batch_size: samples per batch on this rank.
        workers: DataLoader worker processes on this rank.
        augment: augmentations (None: none).
        shuffle_buffer: per-worker sample shuffle buffer.
        seed: base seed; shard order, shuffle and augmentation derive from (seed, epoch, rank, worker).
        epoch_batches: batches per rank per epoch, rounded up to a multiple of ``workers``; None: the split's
            samples // (world_size * batch_size), at least 1.
        with_gradient: put the precomputed gradient label in ``batch["gradient"]`` (``gradients.mode:
            precomputed``); refused together with photometric augmentation.
        sets: the sets to read (default: every set of the split).
        on_decode_error: ``fail`` raises :class:`SampleDecodeError` naming shard and key; ``skip`` drops the
            sample and counts it in ``batch["skipped"]`` / ``loader.skipped``.
        pin_memory: pin batches (only when CUDA is available).
        prefetch_factor: batches prefetched per worker.
        normalize: yield float ``image``/``mask`` (normalised on the host). False: uint8 ``image`` (B, 3, H, W)
            and ``mask`` (B, 1, H, W); call :func:`normalize_batch` (batch, device) to normalise on the GPU.
        rank: this rank (default: ``RANK`` env, then torch.distributed, then 0).
        world_size: number of ranks (default: ``WORLD_SIZE`` env, then torch.distributed, then 1).

    Returns:
        A loader yielding exactly ``len(loader)`` batches per epoch on every rank.

    Raises:
        FileNotFoundError: no ``index.json`` (never sharded, or an interrupted shard run).
        ValueError: precomputed gradients with photometric augmentation, or a shard set without gradients.
    """
    augment = augment or AugmentConfig()
    check_gradient_compatible(augment, with_gradient)
    index = _read_index(shard_dir)
    if with_gradient and not index.gradient:
        raise ValueError(f"{shard_dir}: the shards carry no gradient labels (sharded with gradients.mode: "
                         "on_the_fly); pass with_gradient=False or reshard")
    rank, world_size = resolve_rank(rank, world_size)
    shards = tuple(index.shard_paths(shard_dir, sets))
    total = sum(n for _, n in shards)
    if total == 0:
        raise ValueError(f"{shard_dir}: no training samples")
    per_rank = epoch_batches if epoch_batches is not None else max(1, total // (world_size * batch_size))
    readers_per_rank = max(1, workers)
    per_worker = math.ceil(per_rank / readers_per_rank)
    config = ReaderConfig(shards=shards, mode="train", size=tuple(size), batch_size=batch_size,
                          image_ext=index.image_ext, with_gradient=with_gradient, augment=augment,
                          shuffle_buffer=shuffle_buffer, seed=seed, batches_per_worker=per_worker, rank=rank,
                          world_size=world_size, workers=workers, on_decode_error=on_decode_error,
                          digests=tuple(index.shard_digests(shard_dir).items()))
    return ShardLoader(ShardStream(config), per_worker * readers_per_rank, pin_memory, prefetch_factor, normalize)


def make_eval_loader(shard_dir: str | Path, set_name: str, *, size: tuple[int, int], batch_size: int,
                     workers: int = 2, with_gradient: bool = False, with_original_mask: bool | None = None,
                     on_decode_error: Literal["fail", "skip"] = "fail", pin_memory: bool = True,
                     prefetch_factor: int = 2, normalize: bool = True, rank: int | None = None,
                     world_size: int | None = None) -> ShardLoader:
    """Exact single pass over one set (``<shard.out>/test``, ``"DIS-TE1"``), no augmentation, no shuffle.

    Over all ranks and workers every sample is yielded exactly once; each rank's share is a contiguous range of
    the set. Args as :func:`make_train_loader`, plus:

    Args:
        set_name: the set to read.
        with_original_mask: add ``batch["mask_original"]`` (default: when the shards keep original masks).

    Returns:
        A loader whose ``len()`` is this rank's batch count (the last batch of each worker may be partial).
    """
    index = _read_index(shard_dir)
    if with_gradient and not index.gradient:
        raise ValueError(f"{shard_dir}: the shards carry no gradient labels; pass with_gradient=False")
    if with_original_mask is None:
        with_original_mask = index.original_mask
    elif with_original_mask and not index.original_mask:
        raise ValueError(f"{shard_dir}: the shards keep no original masks (shard.original_masks)")
    rank, world_size = resolve_rank(rank, world_size)
    shards = tuple(index.shard_paths(shard_dir, [set_name]))
    config = ReaderConfig(shards=shards, mode="eval", size=tuple(size), batch_size=batch_size,
                          image_ext=index.image_ext, with_gradient=with_gradient,
                          with_original_mask=with_original_mask, rank=rank, world_size=world_size, workers=workers,
                          on_decode_error=on_decode_error, digests=tuple(index.shard_digests(shard_dir).items()))
    total = sum(n for _, n in shards)
    readers = world_size * max(1, workers)
    first = rank * max(1, workers)
    num_batches = sum(math.ceil((total * (j + 1) // readers - total * j // readers) / batch_size)
                      for j in range(first, first + max(1, workers)))
    return ShardLoader(ShardStream(config), num_batches, pin_memory, prefetch_factor, normalize)


def train_loader_from_params(params: Any, split: str = "train", **overrides: Any) -> ShardLoader:
    """:func:`make_train_loader` with arguments from ``params`` (``shard.out``, ``data.size``, ``loader.*``,
    ``gradients.mode``); keyword ``overrides`` (e.g. ``rank``, ``world_size``) win."""
    lp = params.loader
    kwargs: dict[str, Any] = {
        "size": tuple(params.data.size), "batch_size": lp.batch_size, "workers": lp.workers,
        "augment": AugmentConfig.from_params(lp), "shuffle_buffer": lp.shuffle_buffer, "seed": lp.seed,
        "epoch_batches": lp.epoch_batches, "with_gradient": params.gradients.mode == "precomputed",
        "on_decode_error": lp.on_decode_error, "pin_memory": lp.pin_memory, "prefetch_factor": lp.prefetch_factor,
    }
    kwargs.update(overrides)
    return make_train_loader(join_location(params.shard.out, split), **kwargs)


def eval_loader_from_params(params: Any, set_name: str, split: str | None = None, **overrides: Any) -> ShardLoader:
    """:func:`make_eval_loader` for one set with arguments from ``params``; the split defaults to the set's."""
    split = split or params.data.split_of(set_name)
    if split is None:
        raise ValueError(f"set {set_name!r} is in none of data.train_sets/val_sets/test_sets")
    lp = params.loader
    kwargs: dict[str, Any] = {
        "size": tuple(params.data.size), "batch_size": lp.batch_size, "workers": lp.workers,
        "with_gradient": False, "on_decode_error": lp.on_decode_error, "pin_memory": lp.pin_memory,
        "prefetch_factor": lp.prefetch_factor,
    }
    kwargs.update(overrides)
    return make_eval_loader(join_location(params.shard.out, split), set_name, **kwargs)

