"""Loader benchmark: WebDataset shard loader vs. a per-file loader that does what upstream's dataset does.

Generates its own data in a temporary folder: ``--samples`` originals of ``--orig`` pixels (JPEG image, PNG mask,
DIS5K layout and a manifest), shards them with the ``shard`` stage at ``--size``, then measures samples/s over
full passes with ``--workers`` DataLoader workers, side by side on the same data:

* ``per-file (upstream)``: upstream's ``MyData.__getitem__``: ``cv2.imread`` of the original JPEG and PNG, resize
  to the training size (INTER_LINEAR), PIL augmentations (flip, enhance, rotate, pepper; upstream defaults),
  torchvision ToTensor + Normalize.
* ``shard loader``: :func:`birefnet.data.loader.make_train_loader` on the shards, same augmentations (OpenCV).
* ``shard loader, uint8 out``: the same with ``normalize=False`` (the float conversion left to the GPU).
* ``shard loader, no augmentation``: what decoding and batching alone cost.
* ``shard loader, s3`` (with ``--s3``): the ``shard loader`` row streaming the same shards from an S3 bucket
  (``--s3-url s3://bucket/prefix`` with the usual AWS variables, or by default a local moto server started and
  stopped by this process): what object storage costs next to local disk.
* ``decode ceiling``: the same workers only decoding the shards' image and mask members (already in memory), no
  augmentation, no transfer of pixels: the most any loader can deliver from these shards on this many workers.

Every row is the steady-state rate of a full pass (first batch to last), passes of all rows interleaved.

Usage::

    python benchmarks/loader.py --samples 64 --repeats 3
    python benchmarks/loader.py --samples 64 --repeats 5 --s3     # adds the s3 row (local moto server)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from birefnet.data.loader import make_train_loader
from birefnet.data.shards import SplitIndex
from birefnet.data.transforms import AugmentConfig
from birefnet.imaging import IMAGENET_MEAN, IMAGENET_STD

UPSTREAM_AUGMENT = ("flip", "enhance", "rotate", "pepper")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_originals(root: Path, count: int, width: int, height: int, seed: int = 0) -> Path:
    """Write ``count`` DIS5K-layout pairs (JPEG q92 image with texture, PNG mask) and a manifest; return the
    prepared folder."""
    rng = np.random.default_rng(seed)
    im, gt, prepared = root / "raw" / "DIS-TR" / "im", root / "raw" / "DIS-TR" / "gt", root / "prepared"
    for folder in (im, gt, prepared):
        folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        low = rng.integers(0, 256, size=(height // 64, width // 64, 3), dtype=np.uint8)
        image = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)
        noise = rng.normal(0, 12, size=(height // 2, width // 2, 3)).astype(np.float32)
        image = np.clip(image + cv2.resize(noise, (width, height)), 0, 255).astype(np.uint8)
        mask = np.zeros((height, width), np.uint8)
        for _ in range(12):
            pts = rng.integers(0, [width, height], size=(2, 2))
            cv2.line(mask, tuple(int(v) for v in pts[0]), tuple(int(v) for v in pts[1]), 255, int(rng.integers(2, 40)))
        cv2.circle(mask, (width // 2, height // 2), height // 4, 255, -1)
        key = f"1#Bench#{i}#Thing#sample {i}"
        cv2.imwrite(str(im / f"{key}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
        cv2.imwrite(str(gt / f"{key}.png"), mask)
        lines.append({"set": "DIS-TR", "split": "train", "key": key, "image": str(im / f"{key}.jpg"),
                      "mask": str(gt / f"{key}.png"), "width": width, "height": height, "class_name": "Thing",
                      "class_id": 0, "image_sha256": sha256_of(im / f"{key}.jpg"),
                      "mask_sha256": sha256_of(gt / f"{key}.png")})
    with open(prepared / "manifest.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(line) + "\n" for line in lines)
    return prepared


class UpstreamPerFileDataset(Dataset):
    """Upstream ``dataset.py`` / ``image_proc.py`` for training: originals from disk, PIL augmentation."""

    def __init__(self, pairs: list[tuple[str, str]], size: int) -> None:
        from torchvision import transforms

        self.pairs = pairs
        self.size = size
        self.transform_image = transforms.Compose([
            transforms.ToTensor(), transforms.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))])
        self.transform_label = transforms.ToTensor()

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image, ImageEnhance

        image_path, label_path = self.pairs[index]
        image = cv2.cvtColor(cv2.imread(image_path), cv2.COLOR_BGR2RGB)
        image = Image.fromarray(cv2.resize(image, (self.size, self.size), interpolation=cv2.INTER_LINEAR))
        label = cv2.resize(cv2.imread(label_path, cv2.IMREAD_GRAYSCALE), (self.size, self.size),
                           interpolation=cv2.INTER_LINEAR)
        label = Image.fromarray(label)
        if random.randint(0, 1) == 1:  # flip
            image, label = image.transpose(Image.FLIP_LEFT_RIGHT), label.transpose(Image.FLIP_LEFT_RIGHT)
        image = ImageEnhance.Brightness(image).enhance(np.random.randint(5, 15) / 10.0)  # enhance
        image = ImageEnhance.Contrast(image).enhance(np.random.randint(5, 15) / 10.0)
        image = ImageEnhance.Color(image).enhance(np.random.randint(0, 20) / 10.0)
        image = ImageEnhance.Sharpness(image).enhance(np.random.randint(0, 30) / 10.0)
        if random.random() > 0.8:  # rotate
            angle = np.random.randint(-15, 15)
            image, label = image.rotate(angle, Image.BICUBIC), label.rotate(angle, Image.BICUBIC)
        array = np.array(image)  # pepper
        for _ in range(int(0.0015 * array.shape[0] * array.shape[1])):
            y, x = random.randint(0, array.shape[0] - 1), random.randint(0, array.shape[1] - 1)
            array[y, x] = 0 if random.randint(0, 1) == 0 else 255
        return self.transform_image(Image.fromarray(array)), self.transform_label(label)


def time_pass(make_iter, samples_of) -> float:  # noqa: ANN001
    """Steady-state samples/s of one full pass: from the first batch to the last (worker start-up and the first
    batch's latency excluded; they are paid once per epoch)."""
    start, count = None, 0
    for batch in make_iter():
        if start is None:
            start = time.perf_counter()
        else:
            count += samples_of(batch)
    return count / (time.perf_counter() - start)


class DecodeOnly(Dataset):
    """Decodes the shards' image and mask members of one sample and returns nothing of size: the ceiling."""

    def __init__(self, shard_dir: Path, image_ext: str) -> None:
        import webdataset as wds

        index = SplitIndex.read(shard_dir)
        self.blobs = [(sample[image_ext], sample["mask.png"])
                      for sample in wds.tarfile_samples([{"url": p} for p, _ in index.shard_paths(shard_dir)])]

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, index: int) -> int:
        cv2.setNumThreads(0)
        image, mask = self.blobs[index]
        cv2.cvtColor(cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        cv2.imdecode(np.frombuffer(mask, np.uint8), cv2.IMREAD_GRAYSCALE)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--orig", default="2048x1536", help="original WxH (default %(default)s)")
    parser.add_argument("--size", type=int, default=1024, help="training side (default %(default)s)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--s3", action="store_true", help="add a row streaming the shards from S3")
    parser.add_argument("--s3-url", default=None,
                        help="s3://bucket/prefix to upload the shards to (default: a local moto server's bucket)")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.orig.lower().split("x"))
    torch.set_num_threads(1)

    s3_server = None
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp, contextlib.ExitStack() as stack:
        root = args.dir or Path(tmp)
        t0 = time.perf_counter()
        prepared = make_originals(root, args.samples, width, height)
        print(f"generated {args.samples} originals {width}x{height} in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        params = {"data": {"root": str(root / "raw"), "prepared": str(prepared), "size": [args.size, args.size],
                           "workers": args.workers, "train_sets": ["DIS-TR"], "val_sets": [], "test_sets": []},
                  "gradients": {"mode": "on_the_fly", "out": str(root / "gradients")},
                  "shard": {"out": str(root / "shards")}, "loader": {}, "register": {"selection_sets": []}}
        (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
        from birefnet.stages.shard import main as shard_main

        t0 = time.perf_counter()
        assert shard_main(["--params", str(root / "params.yaml"), "--quiet"]) == 0
        shard_dir = root / "shards" / "train"
        index = SplitIndex.read(shard_dir)
        shard_bytes = sum(s["bytes"] for s in index.sets["DIS-TR"]["shards"])
        print(f"sharded in {time.perf_counter() - t0:.1f} s: {len(index.sets['DIS-TR']['shards'])} shard(s), "
              f"{shard_bytes / args.samples / 1024:.0f} KiB/sample", file=sys.stderr)

        size, batches = (args.size, args.size), max(1, args.samples // args.batch_size)
        pairs = sorted((str(p), str(root / "raw" / "DIS-TR" / "gt" / (p.stem + ".png")))
                       for p in (root / "raw" / "DIS-TR" / "im").iterdir())
        baseline = UpstreamPerFileDataset(pairs, args.size)
        runs = {"per-file (upstream)": (lambda: DataLoader(baseline, batch_size=args.batch_size, shuffle=True,
                                                           num_workers=args.workers, drop_last=True),
                                        lambda b: b[0].shape[0])}
        variants = (("shard loader", UPSTREAM_AUGMENT, True), ("shard loader, uint8 out", UPSTREAM_AUGMENT, False),
                    ("shard loader, no augmentation", (), True))
        for name, augment, normalize in variants:
            loader = make_train_loader(shard_dir, size=size, batch_size=args.batch_size, workers=args.workers,
                                       augment=AugmentConfig(augment), with_gradient=False, epoch_batches=batches,
                                       shuffle_buffer=16, pin_memory=False, normalize=normalize, rank=0,
                                       world_size=1)
            runs[name] = (lambda loader=loader: iter(loader), lambda b: b["image"].shape[0])
        if args.s3:
            url = args.s3_url
            if url is None:
                sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
                from tests.helpers.s3 import start_s3_server

                s3_server = stack.enter_context(start_s3_server())
                os.environ.update(s3_server.client_env())
                url = s3_server.make_bucket("loader-bench") + "/shards"
            import fsspec

            fs, prefix = fsspec.core.url_to_fs(url)
            fs.put([str(p) for p in sorted(shard_dir.iterdir())], prefix.rstrip("/") + "/train/")
            loader = make_train_loader(f"{url.rstrip('/')}/train", size=size, batch_size=args.batch_size,
                                       workers=args.workers, augment=AugmentConfig(UPSTREAM_AUGMENT),
                                       with_gradient=False, epoch_batches=batches, shuffle_buffer=16,
                                       pin_memory=False, rank=0, world_size=1)
            name = "shard loader, s3" + (" (moto)" if s3_server is not None else "")
            runs[name] = (lambda loader=loader: iter(loader), lambda b: b["image"].shape[0])
        decode_only = DecodeOnly(shard_dir, index.image_ext)
        runs["decode ceiling (image+mask)"] = (
            lambda: DataLoader(decode_only, batch_size=args.batch_size, num_workers=args.workers),
            lambda b: int(b.shape[0]))
        # Passes interleave (one of each loader per round) so a load change on a shared machine hits all alike.
        results: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, (make_iter, samples_of) in runs.items():
                results[name].append(time_pass(make_iter, samples_of))
    base = statistics.median(results["per-file (upstream)"])
    ceiling = statistics.median(results["decode ceiling (image+mask)"])
    print(f"\nloader benchmark (steady-state samples/s per pass): {args.samples} samples, "
          f"originals {width}x{height} -> {args.size}x{args.size}, "
          f"{args.workers} workers, batch {args.batch_size}, {args.repeats} passes, {os.cpu_count()} CPUs, "
          f"augment {list(UPSTREAM_AUGMENT)}")
    print(f"{'loader':34s} {'samples/s (median)':>18s} {'passes':>24s} {'vs baseline':>12s} {'of ceiling':>11s}")
    for name, rates in results.items():
        median = statistics.median(rates)
        passes = ", ".join(f"{r:.1f}" for r in rates)
        print(f"{name:34s} {median:18.1f} {passes:>24s} {median / base:11.2f}x {median / ceiling:10.0%}")
    remote = [name for name in results if name.startswith("shard loader, s3")]
    if remote:
        ratio = statistics.median(results[remote[0]]) / statistics.median(results["shard loader"])
        print(f"s3 vs local disk (same loader, same shards): {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
