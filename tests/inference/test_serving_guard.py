"""Serving's pixel guard: request images over ``serving.max_image_pixels`` are refused before any work."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from birefnet.data.io import ImageReadError
from birefnet.inference.serving import DEFAULT_MAX_IMAGE_PIXELS, BiRefNetPyfunc, ImageTooLargeError, predict_masks
from tests.data.bomb_images import black_png, png_declaring


def _pyfunc(weights: Path, **config: object) -> BiRefNetPyfunc:
    model = BiRefNetPyfunc()
    model.load_context(SimpleNamespace(artifacts={"weights": str(weights)},
                                       model_config={"size": [64, 64], "batch_size": 2, **config}))
    return model


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_limit_from_model_config_refuses_arrays_naming_size_and_limit(tiny_model_file: Path) -> None:
    model = _pyfunc(tiny_model_file, max_image_pixels=5000)
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)  # 3500 pixels
    large = rng.integers(0, 256, (80, 70, 3), dtype=np.uint8)  # 5600 pixels
    assert model.predict(None, small).shape == (50, 70)
    with pytest.raises(ImageTooLargeError, match=r"image 0: 70x80 = 5600 pixels, more than "
                                                 r"serving\.max_image_pixels = 5000"):
        model.predict(None, large)
    with pytest.raises(ImageTooLargeError, match=r"image 1: 70x80 = 5600 pixels"):
        model.predict(None, [small, large])
    with pytest.raises(ImageTooLargeError, match="5600 pixels"):
        model.predict(None, large[None])  # the batch form


def test_default_limit_without_model_config_key(tiny_model_file: Path) -> None:
    model = _pyfunc(tiny_model_file)
    assert model.max_pixels == DEFAULT_MAX_IMAGE_PIXELS == 40_000_000
    # 6325 x 6325 = 40,005,625 pixels as a zero-copy broadcast view: refused before any pixel is touched
    huge = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (6325, 6325, 3))
    with pytest.raises(ImageTooLargeError, match="6325x6325 = 40005625 pixels, more than serving.max_image_pixels "
                                                 "= 40000000"):
        model.predict(None, huge)
    with pytest.raises(ValueError, match="max_image_pixels: expected a positive integer, got 0"):
        _pyfunc(tiny_model_file, max_image_pixels=0)


def test_encoded_request_images_are_checked_from_their_header(tiny_model_file: Path) -> None:
    model = _pyfunc(tiny_model_file)
    image = np.random.default_rng(1).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    masks = model.predict(None, [_png(image), image[:20]])  # bytes and arrays mix in the list form
    assert [m.shape for m in masks] == [(40, 30), (20, 30)]
    # an 80-byte PNG declaring 268M pixels: refused from the header (decoding it would fail differently)
    with pytest.raises(ImageTooLargeError) as info:
        model.predict(None, [_png(image), png_declaring(16384, 16384)])
    assert str(info.value) == ("image 1: image header declares 16384x16384 = 268435456 pixels, more than "
                               "serving.max_image_pixels = 40000000 (decompression-bomb guard)")
    # a real, decodable 268M-pixel PNG (260 KB) is refused the same way
    with pytest.raises(ImageTooLargeError, match="16384x16384 = 268435456 pixels"):
        model.predict(None, black_png(16384, 16384))
    with pytest.raises(ImageReadError, match="image 0: not a recognised image format"):
        model.predict(None, b"not an image")


def test_predict_masks_checks_every_image_before_running_the_model() -> None:
    class NeverCalled:
        def __call__(self, batch: object) -> object:
            raise AssertionError("the model ran on a request that had an oversized image")

    images = [np.zeros((10, 10, 3), np.uint8), np.zeros((10, 11, 3), np.uint8)]
    with pytest.raises(ImageTooLargeError, match=r"image 1: 11x10 = 110 pixels, more than "
                                                 r"serving\.max_image_pixels = 100"):
        predict_masks(NeverCalled(), images, (64, 64), max_pixels=100)
