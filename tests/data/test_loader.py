"""The streaming loader on real WebDataset tars: rank/worker splitting, equal batches, exact evaluation pass,
determinism, augmentation consistency and decode errors."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from birefnet.data.gradients import IMAGENET_MEAN, IMAGENET_STD, decode_gradient, encode_gradient
from birefnet.data.loader import (
    SampleDecodeError,
    ShardStream,
    make_eval_loader,
    make_train_loader,
    normalize_batch,
    split_units,
)
from birefnet.data.shards import AtomicShardWriter, SplitIndex, encode_png, sample_key, write_atomic
from birefnet.data.transforms import AugmentConfig, augment_sample, enhance

try:
    from tests.data.wds_fixtures import blocky_image
except ImportError:  # tests/ is not a package: pytest put this folder on sys.path
    from wds_fixtures import blocky_image

SIZE = (64, 48)


def _gradient_from(image: np.ndarray) -> np.ndarray:
    """A stand-in gradient label drawn from the image's green channel: G / 64 (exact in 16-bit storage; black
    fill stays 0 on both)."""
    return image[..., 1].astype(np.float32) / 64.0


def write_split(folder: Path, shard_sizes: list[int], set_name: str = "DIS-TR", corrupt: set[int] = frozenset(),
                seed: int = 0) -> list[str]:
    """Shards of PNG images whose mask is the red channel and gradient label the green channel.

    Returns:
        The original keys in order.
    """
    rng = np.random.default_rng(seed)
    index = SplitIndex(split="train", size=list(SIZE), image_ext="image.png", gradient=True, original_mask=False)
    keys, shards, number = [], [], 0
    for count in shard_sizes:
        writer = AtomicShardWriter(folder, set_name, max_samples=count, max_bytes=1 << 30)
        writer.shards = [None] * len(shards)  # continue numbering after earlier writers
        for _ in range(count):
            image = blocky_image(rng, *SIZE)
            key = f"k.{number} #é"
            keys.append(key)
            sample = {
                "__key__": sample_key(set_name, number),
                "image.png": b"not an image" if number in corrupt else
                encode_png(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), 1),
                "mask.png": encode_png(np.ascontiguousarray(image[..., 0]), 1),
                "gradient.png": encode_png(encode_gradient(_gradient_from(image)), 1),
                "json": json.dumps({"set": set_name, "key": key, "index": number, "class_id": number % 3,
                                    "width": SIZE[0], "height": SIZE[1]}).encode(),
            }
            writer.write(sample)
            number += 1
        shards += writer.close()[len(shards):]
    index.sets[set_name] = {"samples": number, "shards": [vars(s) for s in shards]}
    write_atomic(folder / "index.json", index.to_json())
    return keys


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("uneven")
    keys = write_split(folder, [7, 3, 1])
    return folder, keys


def _denormalize(image: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((image * std + mean) * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def test_index_lists_uneven_shards(uneven: tuple[Path, list[str]]) -> None:
    folder, keys = uneven
    index = SplitIndex.read(folder)
    assert [n for _, n in index.shard_paths(folder)] == [7, 3, 1] and index.samples == len(keys)


@pytest.mark.parametrize("epoch_batches", [None, 3])
def test_equal_batches_per_rank(uneven: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch,
                                epoch_batches: int | None) -> None:
    """3 uneven shards over 2 ranks x 2 workers (rank from the env, as Ray Train sets it): same batch count."""
    folder, _ = uneven
    counts = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = make_train_loader(folder, size=SIZE, batch_size=2, workers=2, epoch_batches=epoch_batches,
                                   shuffle_buffer=4, augment=AugmentConfig(("flip", "rotate")))
        batches = list(loader)
        assert all(b["image"].shape == (2, 3, SIZE[1], SIZE[0]) for b in batches)
        assert all(b["gradient"].shape == (2, 1, SIZE[1], SIZE[0]) for b in batches)
        counts.append((len(loader), len(batches)))
    expected = 2 if epoch_batches is None else 4  # rounded up to a multiple of the workers
    assert counts == [(expected, expected)] * 2


def test_worker_split_has_no_duplicates(uneven: tuple[Path, list[str]]) -> None:
    """Within a cycle the 2 ranks x 2 workers read disjoint sample ranges covering every sample once."""
    folder, keys = uneven
    loader = make_train_loader(folder, size=SIZE, batch_size=2, workers=2, rank=0, world_size=2)
    stream = ShardStream(loader.dataset.config)
    # 3 shards cut in ceil(4 readers / 3 shards) = 2 ranges each; the 1-sample shard gives one non-empty range
    units_per_cycle = len(split_units(stream.config.shards, 2))
    assert units_per_cycle == 5
    taken = collections.Counter()
    for reader in range(4):
        units = stream.units(reader, 4)
        for _ in range(len(range(reader, units_per_cycle, 4))):
            path, start, stop = next(units)
            taken.update((path, i) for i in range(start, stop))
    assert sum(taken.values()) == len(keys) and max(taken.values()) == 1


def test_eval_exact_single_pass(uneven: tuple[Path, list[str]]) -> None:
    folder, keys = uneven
    seen, lengths = [], []
    for rank in (0, 1):
        loader = make_eval_loader(folder, "DIS-TR", size=SIZE, batch_size=2, workers=2, rank=rank, world_size=2)
        batches = list(loader)
        lengths.append((len(loader), len(batches)))
        for batch in batches:
            seen += batch["key"]
            assert batch["class_id"].tolist() == [int(k.split(".")[1].split()[0]) % 3 for k in batch["key"]]
    assert sorted(seen) == sorted(keys) and len(seen) == len(set(seen))
    assert all(a == b for a, b in lengths)


def test_train_order_is_seeded_per_epoch(uneven: tuple[Path, list[str]]) -> None:
    folder, _ = uneven

    def keys(epoch: int, seed: int = 0) -> list[str]:
        loader = make_train_loader(folder, size=SIZE, batch_size=2, workers=0, seed=seed, epoch_batches=5,
                                   shuffle_buffer=8, rank=0, world_size=1)
        loader.set_epoch(epoch)
        return [k for b in loader for k in b["key"]]

    assert keys(0) == keys(0)
    assert keys(0) != keys(1)
    loader = make_train_loader(folder, size=SIZE, batch_size=2, workers=0, epoch_batches=2, rank=0, world_size=1)
    first, second = [[k for b in loader for k in b["key"]] for _ in range(2)]  # the epoch advances by itself
    assert loader.epoch == 2 and first != second


@pytest.mark.parametrize("name", ["flip", "crop", "rotate"])
def test_geometric_augmentation_keeps_alignment(name: str) -> None:
    """The mask is the image's red channel and the label its green channel: both stay equal after each transform."""
    image = blocky_image(np.random.default_rng(1), 96, 80)
    mask = np.ascontiguousarray(image[..., 0])
    gradient = _gradient_from(image)
    config = AugmentConfig((name,), flip_prob=1.0, rotate_prob=1.0, crop_border=0.2)
    changed = False
    for seed in range(3):
        out_image, out_mask, out_gradient = augment_sample(image.copy(), mask.copy(), gradient.copy(), config,
                                                           np.random.default_rng(seed))
        assert out_image.shape == image.shape and out_mask.shape == mask.shape and out_gradient.shape == mask.shape
        np.testing.assert_array_equal(out_mask, out_image[..., 0])
        green = np.clip(np.rint(out_gradient * 64.0), 0, 255)
        assert np.abs(green - out_image[..., 1].astype(np.float32)).max() <= 1
        changed |= not np.array_equal(out_image, image)
    assert changed


def test_loader_augments_image_mask_gradient_together(uneven: tuple[Path, list[str]]) -> None:
    folder, _ = uneven
    config = AugmentConfig(("flip", "crop", "rotate"), flip_prob=1.0, rotate_prob=1.0)
    loader = make_train_loader(folder, size=SIZE, batch_size=3, workers=0, augment=config, epoch_batches=2,
                               rank=0, world_size=1)
    for batch in loader:
        for image, mask, gradient in zip(batch["image"], batch["mask"], batch["gradient"], strict=True):
            rgb = _denormalize(image)
            assert np.abs(rgb[..., 0].astype(int) - np.rint(mask[0].numpy() * 255).astype(int)).max() <= 1
            green = np.clip(np.rint(gradient[0].numpy() * 64.0), 0, 255)
            assert np.abs(green - rgb[..., 1]).max() <= 2


def test_photometric_with_precomputed_gradients_is_refused(uneven: tuple[Path, list[str]]) -> None:
    folder, _ = uneven
    with pytest.raises(ValueError, match="on_the_fly"):
        make_train_loader(folder, size=SIZE, batch_size=2, augment=AugmentConfig(("flip", "enhance")),
                          with_gradient=True, rank=0, world_size=1)
    loader = make_train_loader(folder, size=SIZE, batch_size=2, workers=0, with_gradient=False, epoch_batches=1,
                               augment=AugmentConfig(("flip", "crop", "rotate", "enhance", "pepper")),
                               rank=0, world_size=1)
    batch = next(iter(loader))
    assert "gradient" not in batch and batch["image"].shape == (2, 3, SIZE[1], SIZE[0])


def test_enhance_matches_pil() -> None:
    """Each PIL ImageEnhance step is reproduced to within rounding (one level, two when a factor > 1 amplifies it)."""
    image = cv2.GaussianBlur(blocky_image(np.random.default_rng(3), 80, 64), (5, 5), 0)
    steps = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color, ImageEnhance.Sharpness)
    for position, cls in enumerate(steps):
        for factor in (0.0, 0.5, 1.4, 2.9):
            factors = [1.0, 1.0, 1.0, 1.0]
            factors[position] = factor
            expected = np.asarray(cls(Image.fromarray(image)).enhance(factor)).astype(int)
            diff = np.abs(expected - enhance(image, *factors).astype(int))
            assert diff.max() <= 2 and diff.mean() < 0.6, (cls.__name__, factor, diff.max(), diff.mean())


def test_corrupt_sample_is_named_or_skipped(tmp_path: Path) -> None:
    keys = write_split(tmp_path, [4, 3], corrupt={5})
    loader = make_eval_loader(tmp_path, "DIS-TR", size=SIZE, batch_size=2, workers=0, with_gradient=True,
                              rank=0, world_size=1)
    with pytest.raises(SampleDecodeError) as info:
        list(loader)
    message = str(info.value)
    assert "DIS-TR-000001.tar" in message and "DIS-TR-000005" in message and keys[5] in message
    skipping = make_eval_loader(tmp_path, "DIS-TR", size=SIZE, batch_size=2, workers=2, on_decode_error="skip",
                                rank=0, world_size=1)
    seen = [k for b in skipping for k in b["key"]]
    assert skipping.skipped == 1 and sorted(seen) == sorted(k for i, k in enumerate(keys) if i != 5)
    train = make_train_loader(tmp_path, size=SIZE, batch_size=2, workers=0, on_decode_error="skip", epoch_batches=6,
                              rank=0, world_size=1)
    assert len(list(train)) == 6 and train.skipped >= 1


def test_gradient_storage_round_trip() -> None:
    image = blocky_image(np.random.default_rng(4), 32, 32)
    label = _gradient_from(image)
    png = encode_png(encode_gradient(label), 3)
    np.testing.assert_array_equal(decode_gradient(cv2.imdecode(np.frombuffer(png, np.uint8), -1)), label)


def test_uint8_batches_normalise_like_float_batches(uneven: tuple[Path, list[str]]) -> None:
    folder, _ = uneven
    kwargs = {"size": SIZE, "batch_size": 3, "workers": 0, "rank": 0, "world_size": 1}
    floats = list(make_eval_loader(folder, "DIS-TR", **kwargs))
    raw = list(make_eval_loader(folder, "DIS-TR", normalize=False, **kwargs))
    assert raw[0]["image"].dtype == torch.uint8 and raw[0]["mask"].dtype == torch.uint8
    for a, b in zip(floats, raw, strict=True):
        b = normalize_batch(b)
        assert a["key"] == b["key"]
        torch.testing.assert_close(a["image"], b["image"])
        torch.testing.assert_close(a["mask"], b["mask"])
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        raw_image = [r for r in raw if r["key"] == a["key"]][0]["image"]
        torch.testing.assert_close(b["image"], (raw_image.float() / 255 - mean) / std)
