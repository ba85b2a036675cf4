"""Inference for serving: images in, masks at the input's resolution out, and the MLflow pyfunc wrapper.

BiRefNet (Zheng et al., "Bilateral Reference for High-Resolution Dichotomous Image Segmentation", CAAI AIR
2024) predicts at a fixed working resolution; :func:`predict_masks` resizes every image to it exactly as the
``shard`` stage does (OpenCV bilinear), normalises with the ImageNet statistics, runs the model and resizes the
sigmoid map back to the image's own size, with the same steps as ``birefnet predict`` (:mod:`birefnet.predict`).

:class:`BiRefNetPyfunc` is the pyfunc flavor of a registered version. It is logged as "models from code"
(``birefnet/pyfunc_model.py`` instantiates it), so nothing is pickled: the model folder holds the safetensors
weights as an artifact, this package as code and the working size in the model config.

Every request image is checked against a pixel limit (``max_image_pixels`` in the model config, which the
registry fills from ``serving.max_image_pixels``; :data:`DEFAULT_MAX_IMAGE_PIXELS` without it) before any work
on it: decoded arrays by their shape, encoded images (PNG/JPEG bytes) by their header, before decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlflow.pyfunc
import numpy as np

#: Name of the weights file inside the logged model's artifacts.
WEIGHTS_ARTIFACT = "weights"
#: Largest request image (width x height) when the model config has no ``max_image_pixels``; the default of
#: ``serving.max_image_pixels`` in params.yaml.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
#: The parameter that errors name as the limit.
LIMIT_NAME = "serving.max_image_pixels"


class ImageTooLargeError(ValueError):
    """A request image has more pixels than the serving limit; the message names the image, its size and the limit."""


def check_image_pixels(index: int, height: int, width: int, max_pixels: int) -> None:
    """Refuse an image of ``width`` x ``height`` over ``max_pixels``.

    Raises:
        ImageTooLargeError: naming the image's position, its size and the limit.
    """
    if height * width > max_pixels:
        raise ImageTooLargeError(f"image {index}: {width}x{height} = {height * width} pixels, more than "
                                 f"{LIMIT_NAME} = {max_pixels}")


def _decode_request_image(index: int, data: bytes, max_pixels: int) -> np.ndarray:
    """An encoded image (PNG, JPEG, ...) as ``(H, W, 3)`` uint8 RGB, refused from its header over the limit."""
    from birefnet.data.io import PixelLimitError, load_image_bytes

    try:
        return load_image_bytes(data, max_pixels, name=f"image {index}", limit_name=LIMIT_NAME)
    except PixelLimitError as exc:
        raise ImageTooLargeError(str(exc)) from None


def _as_image_list(model_input: Any, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[list[np.ndarray], str]:
    """Split the accepted input forms into a list of images and the form's name.

    Encoded images (``bytes``) are decoded here, each after its header passed the ``max_pixels`` check.
    """
    if isinstance(model_input, dict) and len(model_input) == 1:  # a named tensor input
        model_input = next(iter(model_input.values()))
    if isinstance(model_input, bytes | bytearray):
        return [_decode_request_image(0, bytes(model_input), max_pixels)], "single"
    if isinstance(model_input, np.ndarray) and model_input.dtype != object:
        if model_input.ndim == 3:
            return [model_input], "single"
        if model_input.ndim == 4:
            return list(model_input), "batch"
        raise ValueError(f"expected an image (H, W, 3) or a batch (N, H, W, 3), got shape {model_input.shape}")
    if isinstance(model_input, np.ndarray | Sequence):  # a list or object array of images of different sizes
        return [_decode_request_image(i, bytes(image), max_pixels) if isinstance(image, bytes | bytearray)
                else np.asarray(image) for i, image in enumerate(model_input)], "list"
    raise TypeError(f"expected a numpy image array or a list of them, got {type(model_input).__name__}")


def predict_masks(model: Any, images: Sequence[np.ndarray], size: tuple[int, int],
                  batch_size: int = 4, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> list[np.ndarray]:
    """Predict a soft mask for every image at the image's own resolution.

    Args:
        model: a BiRefNet in eval mode; ``model(x).logits`` is ``(B, 1, H', W')``.
        images: RGB images, each ``(H, W, 3)`` uint8 (``(H, W)`` gray and ``(H, W, 4)`` RGBA are converted).
        size: the working resolution ``(width, height)``, multiples of 32.
        batch_size: images per forward pass.
        max_pixels: the largest ``H * W`` accepted; every image is checked before any is processed.

    Returns:
        One ``(H, W)`` uint8 mask (0 background .. 255 foreground) per image.

    Raises:
        ImageTooLargeError: an image over ``max_pixels`` (its position, size and the limit named).
        ValueError: an image of another shape or type.
    """
    import torch

    from birefnet.predict import postprocess, preprocess

    width, height = int(size[0]), int(size[1])
    if width % 32 or height % 32:
        raise ValueError(f"working size must be multiples of 32, got {width}x{height}")
    arrays = [np.asarray(image) for image in images]
    for i, image in enumerate(arrays):  # the whole request is checked before any image is processed
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)) or min(image.shape[:2]) < 1:
            raise ValueError(f"image {i}: expected (H, W, 3) RGB, got shape {image.shape}")
        check_image_pixels(i, image.shape[0], image.shape[1], max_pixels)
        if image.dtype != np.uint8:
            raise ValueError(f"image {i}: expected uint8 pixels, got {image.dtype}")
    prepared: list[torch.Tensor] = []
    shapes: list[tuple[int, int]] = []
    for image in arrays:
        image = np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image[:, :, :3]
        image = np.ascontiguousarray(image)
        shapes.append(image.shape[:2])
        prepared.append(preprocess(image, (width, height)))
    masks: list[np.ndarray] = []
    with torch.inference_mode():
        for start in range(0, len(prepared), batch_size):
            logits = model(torch.stack(prepared[start:start + batch_size])).logits
            masks.extend(postprocess(logits, shapes[start:start + batch_size]))
    return masks


class BiRefNetPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: ``predict(images) -> masks`` at the input's resolution.

    Input: one ``(H, W, 3)`` uint8 image, a batch ``(N, H, W, 3)``, or a list of images of different sizes;
    in-process (``python_model.predict``) an image may also be encoded ``bytes`` (PNG, JPEG, ...).
    Output: ``(H, W)``, ``(N, H, W)`` uint8 masks, or a list of ``(H_i, W_i)`` masks for a list. Through
    ``mlflow.pyfunc.load_model`` the signature (a batch ``(-1, -1, -1, 3)`` uint8) is enforced, so a single
    image goes in as ``image[None]``; a list of different sizes passes as a 1-D object array.

    The model config carries ``size`` (the working resolution, width and height), ``batch_size`` and
    ``max_image_pixels`` (the largest image accepted, ``serving.max_image_pixels``; default
    :data:`DEFAULT_MAX_IMAGE_PIXELS`). A bigger image fails the request with :class:`ImageTooLargeError`.
    """

    def load_context(self, context: Any) -> None:
        """Rebuild the network from the safetensors artifact (no pickle)."""
        import torch

        from birefnet.models.io import load_model

        config = dict(getattr(context, "model_config", None) or {})
        self.size = tuple(int(v) for v in config.get("size", (256, 256)))
        self.batch_size = int(config.get("batch_size", 4))
        self.max_pixels = int(config.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS))
        if self.max_pixels < 1:
            raise ValueError(f"model config max_image_pixels: expected a positive integer, got {self.max_pixels}")
        threads = config.get("torch_threads")
        if threads:
            torch.set_num_threads(int(threads))
        self.model = load_model(context.artifacts[WEIGHTS_ARTIFACT], device="cpu")

    # Not annotated on purpose: MLflow reads type hints of ``predict`` as a signature (and wraps it with a
    # validator); the explicit tensor signature logged with the model is the contract.
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201, ARG002
        """Masks for ``model_input`` (see the class docstring for the accepted forms)."""
        max_pixels = getattr(self, "max_pixels", DEFAULT_MAX_IMAGE_PIXELS)
        images, form = _as_image_list(model_input, max_pixels)
        masks = predict_masks(self.model, images, self.size, batch_size=self.batch_size, max_pixels=max_pixels)
        if form == "single":
            return masks[0]
        if form == "batch":
            return np.stack(masks)
        return masks
