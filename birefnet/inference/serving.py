"""Inference for serving: images in, masks at the input's resolution out, and the MLflow pyfunc wrapper.

BiRefNet (Zheng et al., "Bilateral Reference for High-Resolution Dichotomous Image Segmentation", CAAI AIR
2024) predicts at a fixed working resolution; :func:`predict_masks` resizes every image to it exactly as the
``shard`` stage does (OpenCV bilinear), normalises with the ImageNet statistics, runs the model and resizes the
sigmoid map back to the image's own size, with the same steps as ``birefnet predict``
(:mod:`birefnet.inference.processing`).

:class:`BiRefNetPyfunc` is the pyfunc flavor of a registered version. It is logged as "models from code"
(``birefnet/inference/pyfunc_model.py`` instantiates it), so nothing is pickled: the model folder holds the
safetensors weights as an artifact, the parts of this package that serving imports as code and the working size in
the model config.

Requests carry raw pixels (uint8 arrays; over HTTP nested JSON lists of integers 0..255) or encoded images
(PNG, JPEG, ...: ``bytes`` in process, base64 strings, also ``data:`` URLs, over HTTP). Masks come back as uint8
arrays, or as base64 PNG strings when the request sent base64 strings (inference param ``mask_format``: ``auto``,
``png`` or ``array``).

Every request image is checked against a pixel limit (``max_image_pixels`` in the model config, which the
registry fills from ``serving.max_image_pixels``; :data:`DEFAULT_MAX_IMAGE_PIXELS` without it) before any work
on it: decoded arrays by their shape, encoded images (PNG/JPEG bytes) by their header, before decoding.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlflow.pyfunc
import numpy as np

from birefnet.inference.processing import SIZE_MULTIPLE, postprocess, preprocess

#: Name of the weights file inside the logged model's artifacts.
WEIGHTS_ARTIFACT = "weights"
#: Largest request image (width x height) when the model config has no ``max_image_pixels``; the default of
#: ``serving.max_image_pixels`` in params.yaml.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
#: The parameter that errors name as the limit.
LIMIT_NAME = "serving.max_image_pixels"
#: Values of the ``mask_format`` inference param: ``auto`` answers base64 requests with base64 PNG masks and
#: pixel requests with uint8 arrays; ``png`` and ``array`` force one form.
MASK_FORMATS = ("auto", "png", "array")


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


def _decode_base64_image(index: int, text: str, max_pixels: int) -> np.ndarray:
    """A base64 string (or ``data:image/...;base64,`` URL) of an encoded image as ``(H, W, 3)`` uint8 RGB.

    Whitespace (line-wrapped ``base64`` output) is ignored; the decoded bytes go through
    :func:`_decode_request_image` (header checked against ``max_pixels`` before decoding).

    Raises:
        ValueError: the string is not base64 (naming the image's position).
    """
    payload = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"image {index}: a string input must be a base64-encoded image (PNG, JPEG, ...), and "
                         f"this one is not valid base64 ({exc}); send raw pixels as nested lists of integers "
                         "0..255 instead") from None
    return _decode_request_image(index, data, max_pixels)


def _as_pixels(index: int, image: np.ndarray, max_pixels: int) -> np.ndarray:
    """An integer image as uint8, after its size passed the ``max_pixels`` check.

    Pixels sent as JSON arrive as int64; anything in 0..255 is accepted as uint8. Other dtypes are returned
    unchanged (:func:`predict_masks` refuses them with the expected and actual dtype).

    Raises:
        ImageTooLargeError: an image over ``max_pixels``.
        ValueError: integer pixels outside 0..255.
    """
    if image.dtype == np.uint8 or image.dtype.kind not in "iu":
        return image
    if image.ndim >= 2:
        check_image_pixels(index, image.shape[0], image.shape[1], max_pixels)
    low, high = (int(image.min()), int(image.max())) if image.size else (0, 0)
    if low < 0 or high > 255:
        raise ValueError(f"image {index}: expected uint8 pixels 0..255, got {image.dtype} values {low}..{high}")
    return image.astype(np.uint8)


def _request_image(index: int, item: Any, max_pixels: int) -> tuple[np.ndarray, bool]:
    """One request image of a list: ``(image, sent as base64 text)``."""
    if isinstance(item, str):
        return _decode_base64_image(index, item, max_pixels), True
    if isinstance(item, bytes | bytearray):
        return _decode_request_image(index, bytes(item), max_pixels), False
    return _as_pixels(index, np.asarray(item), max_pixels), False


@dataclass(frozen=True)
class RequestImages:
    """A request split into images.

    Attributes:
        images: ``(H, W, 3)`` arrays (decoded where the request sent encoded images).
        form: ``single`` (one image), ``batch`` (an ``(N, H, W, 3)`` array) or ``list`` (images of any sizes).
        base64: the request sent base64 strings (``mask_format: auto`` answers with base64 PNG masks).
    """

    images: list[np.ndarray]
    form: str
    base64: bool = False


def _single_column(model_input: Any) -> Any:
    """The values of a one-column table (a pandas DataFrame, as MLflow builds from ``dataframe_*`` payloads)."""
    columns = list(model_input.columns)
    if len(columns) != 1:
        raise ValueError(f"expected one column of images (base64 strings), got {len(columns)} columns {columns}")
    return model_input[columns[0]].to_numpy()


def _as_image_list(model_input: Any, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> RequestImages:
    """Split the accepted input forms into a list of images, the form's name and whether it was base64 text.

    Encoded images (``bytes``, base64 ``str``) are decoded here, each after its header passed the ``max_pixels``
    check; integer pixels (JSON) become uint8 after their size passed it.
    """
    if isinstance(model_input, dict) and len(model_input) == 1:  # a named input, or TF serving's {"b64": ...}
        model_input = next(iter(model_input.values()))
    if hasattr(model_input, "columns") and hasattr(model_input, "to_numpy"):
        model_input = _single_column(model_input)
    if isinstance(model_input, np.ndarray) and model_input.dtype.kind == "U":  # JSON strings arrive as str arrays
        model_input = model_input.item() if model_input.ndim == 0 else model_input.tolist()
    if isinstance(model_input, str):
        return RequestImages([_decode_base64_image(0, model_input, max_pixels)], "single", base64=True)
    if isinstance(model_input, bytes | bytearray):
        return RequestImages([_decode_request_image(0, bytes(model_input), max_pixels)], "single")
    if isinstance(model_input, np.ndarray) and model_input.dtype != object:
        if model_input.ndim == 3:
            return RequestImages([_as_pixels(0, model_input, max_pixels)], "single")
        if model_input.ndim == 4:
            return RequestImages([_as_pixels(i, image, max_pixels) for i, image in enumerate(model_input)], "batch")
        raise ValueError(f"expected an image (H, W, 3), a batch (N, H, W, 3) or a list of base64-encoded images, "
                         f"got an array of shape {model_input.shape}")
    if isinstance(model_input, np.ndarray | Sequence):  # a list or object array of images of different sizes
        decoded = [_request_image(i, item, max_pixels) for i, item in enumerate(model_input)]
        return RequestImages([image for image, _ in decoded], "list", base64=any(text for _, text in decoded))
    raise TypeError(f"expected a numpy image array, a list of images, encoded bytes or base64 strings, got "
                    f"{type(model_input).__name__}")


def encode_mask_png(mask: np.ndarray) -> str:
    """A ``(H, W)`` uint8 mask as a base64 string of an 8-bit grayscale PNG."""
    import cv2

    ok, buffer = cv2.imencode(".png", np.ascontiguousarray(mask))
    if not ok:
        raise ValueError(f"could not encode a mask of shape {mask.shape} as PNG")
    return base64.b64encode(buffer.tobytes()).decode("ascii")


def _mask_format(params: Any) -> str:
    """The ``mask_format`` inference param (``auto`` when absent).

    Raises:
        ValueError: a value outside :data:`MASK_FORMATS`.
    """
    value = str((params or {}).get("mask_format") or "auto")
    if value not in MASK_FORMATS:
        raise ValueError(f"params.mask_format: expected one of {list(MASK_FORMATS)}, got {value!r}")
    return value


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

    width, height = int(size[0]), int(size[1])
    if width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        raise ValueError(f"working size must be multiples of {SIZE_MULTIPLE}, got {width}x{height}")
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

    Input: one ``(H, W, 3)`` uint8 image, a batch ``(N, H, W, 3)``, or a list of images of different sizes,
    where every image may also be encoded: ``bytes`` (PNG, JPEG, ...) or a base64 string of them. Integer
    pixels in 0..255 of another dtype (JSON's int64) are taken as uint8. A one-key dict (a named input, TF
    serving's ``{"b64": ...}``) and a one-column DataFrame (``dataframe_split``/``dataframe_records``
    payloads) are unwrapped. The logged signature declares no input schema, so MLflow passes every form
    through and this class checks it; it declares the ``mask_format`` param.

    Output: ``(H, W)``, ``(N, H, W)`` uint8 masks, or a list of ``(H_i, W_i)`` masks for a list; with base64
    string inputs (``mask_format: auto``) or ``mask_format: png``, base64 PNG strings instead (one string for
    a single image, else a list). ``mask_format: array`` always answers with arrays.

    The model config carries ``size`` (the working resolution, width and height), ``batch_size`` and
    ``max_image_pixels`` (the largest image accepted, ``serving.max_image_pixels``; default
    :data:`DEFAULT_MAX_IMAGE_PIXELS`). A bigger image fails the request with :class:`ImageTooLargeError`.
    """

    def load_context(self, context: Any) -> None:
        """Rebuild the network from the safetensors artifact (no pickle)."""
        from birefnet.models.io import load_model

        config = dict(getattr(context, "model_config", None) or {})
        self.size = tuple(int(v) for v in config.get("size", (256, 256)))
        self.batch_size = int(config.get("batch_size", 4))
        self.max_pixels = int(config.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS))
        if self.max_pixels < 1:
            raise ValueError(f"model config max_image_pixels: expected a positive integer, got {self.max_pixels}")
        self.model = load_model(context.artifacts[WEIGHTS_ARTIFACT], device="cpu")

    # Not annotated on purpose: MLflow reads type hints of ``predict`` as a signature (and wraps it with a
    # validator); the signature logged with the model (no input schema, the ``mask_format`` param) is the
    # contract, and this method checks the input itself.
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201, ARG002
        """Masks for ``model_input`` (see the class docstring for the accepted forms and ``params``)."""
        max_pixels = getattr(self, "max_pixels", DEFAULT_MAX_IMAGE_PIXELS)
        mask_format = _mask_format(params)
        request = _as_image_list(model_input, max_pixels)
        masks = predict_masks(self.model, request.images, self.size, batch_size=self.batch_size,
                              max_pixels=max_pixels)
        if mask_format == "png" or (mask_format == "auto" and request.base64):
            encoded = [encode_mask_png(mask) for mask in masks]
            return encoded[0] if request.form == "single" else encoded
        if request.form == "single":
            return masks[0]
        if request.form == "batch":
            return np.stack(masks)
        return masks
