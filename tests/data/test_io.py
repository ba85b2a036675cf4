"""Reading images and masks: sha256-checked reads and the thread-safe decompression-bomb guard."""

from __future__ import annotations

import hashlib
import struct
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from birefnet.data.io import (
    ImageReadError,
    PixelLimitError,
    header_size_of_bytes,
    load_image,
    load_mask,
    read_header_size,
)
from tests.data.bomb_images import png_declaring


def _rgb(h: int = 12, w: int = 10) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- expected_sha256 -------------------------------------------------------------------------------------------


def test_load_image_with_matching_sha256_decodes_the_same(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.fromarray(_rgb()).save(path)
    plain = load_image(path)
    checked = load_image(path, expected_sha256=_digest(path))
    np.testing.assert_array_equal(plain, checked)
    assert checked.shape == (12, 10, 3) and checked.dtype == np.uint8
    # an upper-case digest is the same hash
    np.testing.assert_array_equal(load_image(path, expected_sha256=_digest(path).upper()), plain)


def test_load_mask_with_matching_sha256_decodes_the_same(tmp_path: Path) -> None:
    path = tmp_path / "m.png"
    Image.fromarray((np.arange(120).reshape(12, 10) * 2).astype(np.uint8)).save(path)
    np.testing.assert_array_equal(load_mask(path, expected_sha256=_digest(path)), load_mask(path))
    # 16-bit masks go through the same conversion from the in-memory bytes
    path16 = tmp_path / "m16.png"
    Image.fromarray((np.arange(120).reshape(12, 10) * 500).astype(np.uint16)).save(path16)
    np.testing.assert_array_equal(load_mask(path16, expected_sha256=_digest(path16)), load_mask(path16))


@pytest.mark.parametrize("loader", [load_image, load_mask])
def test_sha256_mismatch_names_file_and_both_hashes(tmp_path: Path, loader) -> None:
    path = tmp_path / "changed.png"
    Image.fromarray(_rgb()).save(path)
    recorded = _digest(path)
    Image.fromarray(_rgb()[::-1].copy()).save(path)  # the file changes after its hash was recorded
    actual = _digest(path)
    with pytest.raises(ImageReadError) as info:
        loader(path, expected_sha256=recorded)
    message = str(info.value)
    assert str(path) in message and recorded in message and actual in message
    assert "sha256 mismatch" in message


def test_sha256_read_of_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="file not found") as info:
        load_image(tmp_path / "gone.png", expected_sha256="0" * 64)
    assert info.value.path == str(tmp_path / "gone.png")


def test_exif_orientation_applied_from_bytes(tmp_path: Path) -> None:
    path = tmp_path / "exif.jpg"
    stored = Image.fromarray(_rgb(40, 56))
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(path, exif=exif.tobytes())
    assert load_image(path, expected_sha256=_digest(path)).shape == (56, 40, 3)


# --- pixel guard -----------------------------------------------------------------------------------------------


def test_declared_huge_png_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_declaring(16384, 16384))  # 268M pixels declared in 80 bytes
    for loader in (load_image, load_mask):
        with pytest.raises(PixelLimitError) as info:
            loader(path, max_pixels=200_000_000)
        message = str(info.value)
        assert str(path) in message
        assert "16384x16384 = 268435456 pixels" in message and "data.max_image_pixels = 200000000" in message
    with pytest.raises(ImageReadError, match="16384x16384"):
        read_header_size(path, 1000)
    assert read_header_size(path) == (16384, 16384)
    with pytest.raises(ImageReadError, match="more than serving.max_image_pixels = 10"):
        header_size_of_bytes(path.read_bytes(), 10, name="request", limit_name="serving.max_image_pixels")


def test_limit_above_pillows_own_is_honoured_without_touching_it(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``max_pixels`` above twice Pillow's limit still decodes (PNG, JPEG): our limit, not the global, decides."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # Image.open would raise above 100 pixels
    for suffix in (".png", ".jpg", ".bmp"):
        path = tmp_path / f"a{suffix}"
        Image.fromarray(_rgb(12, 10)).save(path)  # 120 pixels > 2 x 50
        with pytest.raises(Image.DecompressionBombError):
            Image.open(path)
        assert load_image(path, max_pixels=1000).shape == (12, 10, 3)
        with pytest.raises(ImageReadError, match="12 = 120 pixels, more than data.max_image_pixels = 119"):
            load_image(path, max_pixels=119)
    assert Image.MAX_IMAGE_PIXELS == 50


class _RecordingModule(types.ModuleType):
    """Module class that records every assignment of ``MAX_IMAGE_PIXELS`` (restored after the test)."""

    writes: list[object]

    def __setattr__(self, name: str, value: object) -> None:
        if name == "MAX_IMAGE_PIXELS":
            type(self).writes.append(value)
        super().__setattr__(name, value)


@pytest.fixture()
def recorded_writes() -> Iterator[list[object]]:
    module = sys.modules["PIL.Image"]
    original_class = module.__class__
    _RecordingModule.writes = []
    module.__class__ = _RecordingModule
    try:
        yield _RecordingModule.writes
    finally:
        module.__class__ = original_class


def test_threads_never_change_pillows_global_limit(tmp_path: Path, recorded_writes: list[object]) -> None:
    """Concurrent reads (good files, bombs, masks, hashed reads) never assign ``Image.MAX_IMAGE_PIXELS``."""
    before = Image.MAX_IMAGE_PIXELS
    good = tmp_path / "good.png"
    Image.fromarray(_rgb(32, 32)).save(good)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(20000, 20000))
    digest = _digest(good)
    errors: list[BaseException] = []
    refused = []
    start = threading.Barrier(8)

    def work(seed: int) -> None:
        start.wait()
        try:
            for i in range(40):
                if (i + seed) % 3 == 0:
                    try:
                        load_image(bomb, max_pixels=1_000_000)
                    except ImageReadError as exc:
                        refused.append(str(exc))
                elif (i + seed) % 3 == 1:
                    assert load_mask(good).shape == (32, 32)
                else:
                    assert load_image(good, expected_sha256=digest).shape == (32, 32, 3)
                # Pillow's own guard stays on in this process while others read
                with pytest.raises(Image.DecompressionBombError):
                    Image.open(bomb)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    assert recorded_writes == []
    assert Image.MAX_IMAGE_PIXELS == before
    assert len(refused) > 0 and all("20000x20000 = 400000000 pixels" in m for m in refused)


def test_not_an_image_and_truncated_are_named(tmp_path: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("not a png", encoding="utf-8")
    with pytest.raises(ImageReadError, match="not a recognised image format"):
        load_image(text)
    full = tmp_path / "full.png"
    Image.fromarray(_rgb(64, 64)).save(full)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[:200])
    with pytest.raises(ImageReadError, match="cannot decode image data") as info:
        load_mask(cut, expected_sha256=_digest(cut))
    assert str(cut) in str(info.value)


def test_image_read_error_survives_pickling() -> None:
    """Process pools (folder scoring, ingest workers) send the error back to the parent by pickling it."""
    import pickle

    error = pickle.loads(pickle.dumps(ImageReadError("/x/a.png", "bad header")))
    assert isinstance(error, ImageReadError) and error.path == "/x/a.png" and error.reason == "bad header"
    assert str(error) == "/x/a.png: bad header"
    assert type(pickle.loads(pickle.dumps(PixelLimitError("/x/b.png", "too big")))) is PixelLimitError


def test_plugin_that_checks_pillows_limit_while_opening_is_a_named_error(tmp_path: Path) -> None:
    """GIF's plugin applies Pillow's own (process-wide) limit inside its header parser: still an ImageReadError."""
    path = tmp_path / "huge.gif"
    # a 1x1 screen whose first frame spans 20000 x 20000 (400M pixels > 2 x Pillow's default limit)
    screen = struct.pack("<HHBBB", 1, 1, 0, 0, 0)
    frame = struct.pack("<HHHHB", 0, 0, 20000, 20000, 0)
    path.write_bytes(b"GIF89a" + screen + b"," + frame + b"\x08\x00;")
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageReadError) as info:
        load_image(path, max_pixels=10**12)
    assert str(path) in str(info.value) and "Image.MAX_IMAGE_PIXELS" in str(info.value)
    small = tmp_path / "small.gif"
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(small)
    assert load_image(small).shape == (20, 20, 3)
    with pytest.raises(ImageReadError, match="20x20 = 400 pixels, more than data.max_image_pixels = 100"):
        load_image(small, max_pixels=100)
    assert Image.MAX_IMAGE_PIXELS == before


@pytest.mark.parametrize("content", [b"", b"\x00", b"BM", b"RIFF"], ids=["empty", "one-byte", "bmp-magic", "riff"])
def test_empty_or_short_file_is_a_named_read_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.webp"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match="broken.webp"):
        load_image(path)
    with pytest.raises(ImageReadError, match="broken.webp"):
        read_header_size(path)
