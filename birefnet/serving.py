"""Inference for serving: images in, masks at the input's resolution out, and the MLflow pyfunc wrapper.

BiRefNet (Zheng et al., "Bilateral Reference for High-Resolution Dichotomous Image Segmentation", CAAI AIR
2024) predicts at a fixed working resolution; :func:`predict_masks` resizes every image to it exactly as the
``shard`` stage does (OpenCV bilinear), normalises with the ImageNet statistics, runs the model and resizes the
sigmoid map back to the image's own size, with the same steps as ``birefnet predict`` (:mod:`birefnet.predict`).

:class:`BiRefNetPyfunc` is the pyfunc flavor of a registered version. It is logged as "models from code"
(``birefnet/pyfunc_model.py`` instantiates it), so nothing is pickled: the model folder holds the safetensors
weights as an artifact, this package as code and the working size in the model config.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlflow.pyfunc
import numpy as np

#: Name of the weights file inside the logged model's artifacts.
WEIGHTS_ARTIFACT = "weights"


def _as_image_list(model_input: Any) -> tuple[list[np.ndarray], str]:
    """Split the accepted input forms into a list of ``(H, W, 3)`` uint8 images and the form's name."""
    if isinstance(model_input, dict) and len(model_input) == 1:  # a named tensor input
        model_input = next(iter(model_input.values()))
    if isinstance(model_input, np.ndarray) and model_input.dtype != object:
        if model_input.ndim == 3:
            return [model_input], "single"
        if model_input.ndim == 4:
            return list(model_input), "batch"
        raise ValueError(f"expected an image (H, W, 3) or a batch (N, H, W, 3), got shape {model_input.shape}")
    if isinstance(model_input, np.ndarray | Sequence):  # a list or object array of images of different sizes
        return [np.asarray(image) for image in model_input], "list"
    raise TypeError(f"expected a numpy image array or a list of them, got {type(model_input).__name__}")


def predict_masks(model: Any, images: Sequence[np.ndarray], size: tuple[int, int],
                  batch_size: int = 4) -> list[np.ndarray]:
    """Predict a soft mask for every image at the image's own resolution.

    Args:
        model: a BiRefNet in eval mode; ``model(x).logits`` is ``(B, 1, H', W')``.
        images: RGB images, each ``(H, W, 3)`` uint8 (``(H, W)`` gray and ``(H, W, 4)`` RGBA are converted).
        size: the working resolution ``(width, height)``, multiples of 32.
        batch_size: images per forward pass.

    Returns:
        One ``(H, W)`` uint8 mask (0 background .. 255 foreground) per image.
    """
    import torch

    from birefnet.predict import postprocess, preprocess

    width, height = int(size[0]), int(size[1])
    if width % 32 or height % 32:
        raise ValueError(f"working size must be multiples of 32, got {width}x{height}")
    prepared: list[torch.Tensor] = []
    shapes: list[tuple[int, int]] = []
    for i, image in enumerate(images):
        image = np.asarray(image)
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4) or min(image.shape[:2]) < 1:
            raise ValueError(f"image {i}: expected (H, W, 3) RGB, got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"image {i}: expected uint8 pixels, got {image.dtype}")
        image = np.ascontiguousarray(image[:, :, :3])
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

    Input: one ``(H, W, 3)`` uint8 image, a batch ``(N, H, W, 3)``, or a list of images of different sizes.
    Output: ``(H, W)``, ``(N, H, W)`` uint8 masks, or a list of ``(H_i, W_i)`` masks for a list. Through
    ``mlflow.pyfunc.load_model`` the signature (a batch ``(-1, -1, -1, 3)`` uint8) is enforced, so a single
    image goes in as ``image[None]``; a list of different sizes passes as a 1-D object array.

    The model config carries ``size`` (the working resolution, width and height) and ``batch_size``.
    """

    def load_context(self, context: Any) -> None:
        """Rebuild the network from the safetensors artifact (no pickle)."""
        import torch

        from birefnet.models.io import load_model

        config = dict(getattr(context, "model_config", None) or {})
        self.size = tuple(int(v) for v in config.get("size", (256, 256)))
        self.batch_size = int(config.get("batch_size", 4))
        threads = config.get("torch_threads")
        if threads:
            torch.set_num_threads(int(threads))
        self.model = load_model(context.artifacts[WEIGHTS_ARTIFACT], device="cpu")

    # Not annotated on purpose: MLflow reads type hints of ``predict`` as a signature (and wraps it with a
    # validator); the explicit tensor signature logged with the model is the contract.
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201, ARG002
        """Masks for ``model_input`` (see the class docstring for the accepted forms)."""
        images, form = _as_image_list(model_input)
        masks = predict_masks(self.model, images, self.size, batch_size=self.batch_size)
        if form == "single":
            return masks[0]
        if form == "batch":
            return np.stack(masks)
        return masks
