"""One training epoch and one evaluation pass, as plain functions with every dependency passed in."""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from birefnet.config import LossWeights
from birefnet.imaging import predictions_to_uint8
from birefnet.models.io import unwrap_model
from birefnet.precision import autocast_for

log = logging.getLogger("birefnet.train")

#: ``criterion(output, batch, weights, supervise) -> (total, parts)``; parts are detached floats.
Criterion = Callable[[Any, dict[str, Any], LossWeights, str], tuple[torch.Tensor, dict[str, float]]]


def native_cpu_bf16() -> bool:
    """True when this CPU runs bf16 matrix/convolution kernels natively (AVX512-BF16 or AMX through oneDNN).

    Elsewhere bf16 autocast on the CPU is emulated and slower than fp32.
    """
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _to(batch: dict[str, Any], key: str, device: torch.device, channels_last: bool = False) -> torch.Tensor | None:
    value = batch.get(key)
    if value is None or not isinstance(value, torch.Tensor):
        return None
    value = value.to(device, non_blocking=True)
    return value.contiguous(memory_format=torch.channels_last) if channels_last else value


def encoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The ``encoder`` submodule of ``model`` (inside a DDP or compile wrapper).

    Raises:
        AttributeError: the model has no ``encoder`` submodule.
    """
    module = unwrap_model(model, keep_compiled=True)
    encoder = getattr(module, "encoder", None)
    if not isinstance(encoder, torch.nn.Module):
        raise AttributeError(f"{type(module).__name__} has no `encoder` submodule to freeze")
    return encoder


def set_encoder_frozen(model: torch.nn.Module, frozen: bool) -> int:
    """Set ``requires_grad = not frozen`` on every encoder parameter; return how many there are.

    A parameter without ``requires_grad`` gets no ``.grad``, and Adam/AdamW skip parameters whose gradient is
    None: they are not updated (no weight decay either) and no ``exp_avg``/``exp_avg_sq`` state is created for
    them. Unfreezing lets the optimiser create that state at the next step, as for a fresh parameter.
    """
    params = list(encoder_of(model).parameters())
    for p in params:
        p.requires_grad_(not frozen)
    return len(params)


def resize_batch(batch: dict[str, Any], size: Sequence[int]) -> dict[str, Any]:
    """``batch`` with ``image``, ``mask`` and ``gradient`` resized to ``size`` = (width, height).

    Bilinear with antialiasing, so a downsized mask or gradient label keeps each stroke's share of a pixel as a
    soft value instead of dropping strokes thinner than the new pixel. Unchanged when already at ``size``.
    """
    width, height = int(size[0]), int(size[1])
    if tuple(batch["image"].shape[-2:]) == (height, width):
        return batch
    out = dict(batch)
    for key in ("image", "mask", "gradient"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor):
            out[key] = torch.nn.functional.interpolate(value.float(), size=(height, width), mode="bilinear",
                                                       align_corners=False, antialias=True)
            if key != "image":
                out[key] = out[key].clamp_(0, 1)
    return out


def train_one_epoch(model: torch.nn.Module, loader: Iterable[dict[str, Any]], optimizer: torch.optim.Optimizer,
                    criterion: Criterion, *, device: torch.device, weights: LossWeights, supervise: str, lr: float,
                    precision: str = "auto", grad_clip: float | None = None,
                    on_step: Callable[[int, dict[str, float]], None] | None = None,
                    progress: Any = None, channels_last: bool = False, size: Sequence[int] | None = None,
                    recent: deque[torch.Tensor] | None = None, size_at: Callable[[int], Sequence[int]] | None = None,
                    scaler: torch.amp.GradScaler | None = None, freeze_encoder: bool = False) -> dict[str, float]:
    """Train for one pass of ``loader``.

    Args:
        model: the model (DDP-wrapped or not), switched to train mode here.
        loader: yields batches with ``image`` (B, 3, H, W), ``mask`` (B, 1, H, W) in [0, 1], optional
            ``gradient`` (B, 1, H, W) and ``class_id`` (B,).
        optimizer: its learning rate is set to ``lr`` for every group.
        criterion: see :data:`Criterion`.
        device: where tensors go.
        weights: loss weights of the active schedule stage.
        supervise: ``all`` (stage outputs and final) or ``final``.
        lr: learning rate for this epoch.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (forward under autocast; losses in fp32).
        grad_clip: max global gradient norm, or None.
        on_step: called after every step with (step, parts).
        progress: optional tqdm-like object with ``update()``.
        channels_last: feed images in channels_last memory format (for a model converted to it).
        size: train at (width, height): each batch is resized first (:func:`resize_batch`); None = as loaded.
        recent: if given, each batch's images as loaded (before ``size``) are appended, so a bounded deque
            ends holding the epoch's last images (for :func:`recalibrate_batchnorm`).
        size_at: train step ``i`` at ``size_at(i)`` = (width, height) (a stage's ``dynamic_size`` draws);
            exclusive with ``size``.
        scaler: AMP grad scaler (fp16): the loss is scaled before backward, gradients are unscaled before
            clipping, and a step whose gradients hold inf/NaN is skipped (the scaler lowers its scale). None =
            plain backward and step.
        freeze_encoder: set ``requires_grad`` off on the encoder (:func:`set_encoder_frozen`) and run it in
            eval mode, so its BatchNorm statistics stay fixed and dropout/drop-path are off. False leaves
            ``requires_grad`` as it is.

    Returns:
        Means over the epoch: ``loss`` and ``loss_<part>``, plus ``samples``, ``seconds``, ``samples_per_s``;
        with a scaler also ``skipped_steps`` (steps not applied for inf/NaN gradients) and ``grad_scale`` (the
        scale at the end of the epoch).

    Raises:
        FloatingPointError: the loss became NaN or infinite (with the step number). A scaler cannot help there:
            the forward itself overflowed, and every following step would be skipped too.
        ValueError: both ``size`` and ``size_at`` given.
    """
    if size is not None and size_at is not None:
        raise ValueError("give size or size_at, not both")
    model.train()
    if freeze_encoder:
        set_encoder_frozen(model, True)
        encoder_of(model).eval()
    for group in optimizer.param_groups:
        group["lr"] = lr
    sums: dict[str, float] = {}
    steps = samples = skipped = 0
    start = time.perf_counter()
    for step, batch in enumerate(loader):
        if recent is not None:
            recent.extend(batch["image"].unbind(0))
        step_size = size_at(step) if size_at is not None else size
        if step_size is not None:
            batch = resize_batch(batch, step_size)
        image = _to(batch, "image", device, channels_last)
        gradient = _to(batch, "gradient", device)
        with autocast_for(device, precision):
            output = model(image, gradient)
        total, parts = criterion(output, batch, weights, supervise)
        if not math.isfinite(float(total.detach())):
            raise FloatingPointError(f"loss is {float(total)} at step {step} (parts: {parts})")
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            total.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
        else:
            scaler.scale(total).backward()
            if grad_clip is not None:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scale = scaler.get_scale()
            scaler.step(optimizer)  # skipped when the (all-reduced, so every rank's) gradients hold inf/NaN
            scaler.update()
            if scaler.get_scale() < scale:  # update() backs off only after a skipped step
                skipped += 1
                log.debug("step %d skipped: inf/NaN gradients at loss scale %g", step, scale)
        parts = {"loss": float(total.detach()), **parts}
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
        steps += 1
        samples += int(image.shape[0])
        if on_step is not None:
            on_step(step, parts)
        if progress is not None:
            progress.update()
    seconds = time.perf_counter() - start
    out = {k if k == "loss" else (k if k.startswith("loss_") else f"loss_{k}"): v / max(1, steps)
           for k, v in sums.items()}
    out.update(samples=float(samples), seconds=seconds, samples_per_s=samples / max(seconds, 1e-9))
    if scaler is not None:
        out.update(skipped_steps=float(skipped), grad_scale=float(scaler.get_scale()))
    return out


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, images: Sequence[torch.Tensor], *, device: torch.device,
                          chunk: int = 16, precision: str = "auto", channels_last: bool = False,
                          exclude: Sequence[torch.nn.Module] = ()) -> int:
    """Replace every BatchNorm layer's running statistics by their values over ``images`` (precise BN).

    The running averages a layer keeps while training (momentum 0.1) describe the last few batches under
    slightly older weights; with batches of 2 they are noisy enough to move validation scores between epochs
    even when the weights barely change. Here the inference path (every module in eval mode except the
    BatchNorm layers) runs over ``images`` in chunks and each layer keeps the average of the chunks' batch
    statistics. Weights are untouched, and the training-mode forward never reads these statistics, so the
    training trajectory does not change. BatchNorm layers inside ``exclude`` (a frozen encoder) keep their
    statistics and run in eval mode.

    Returns:
        The number of BatchNorm layers recalibrated (0 when the model has none or ``images`` is empty).
    """
    module = unwrap_model(model, keep_compiled=True)
    excluded = {id(m) for part in exclude for m in part.modules()}
    norms = [m for m in module.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and id(m) not in excluded]
    if not norms or not images:
        return 0
    was_training = module.training
    momenta = [m.momentum for m in norms]
    module.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the chunks
        m.train()
    try:
        for start in range(0, len(images), chunk):
            x = torch.stack(list(images[start:start + chunk])).to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast_for(device, precision):
                module(x)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        module.train(was_training)
    return len(norms)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable[dict[str, Any]], *, device: torch.device,
             precision: str = "auto", hce: bool = False, progress: Any = None,
             channels_last: bool = False) -> dict[str, float]:
    """Score ``model`` on one exact pass of ``loader`` with the paper's metrics.

    Predictions are compared at the resolution of ``batch["mask_original"]`` when the loader provides it
    (resized with OpenCV bilinear by the metric code, as upstream), else at the batch's mask resolution.

    Returns:
        ``{"n", "Sm", "maxF", "meanF", "adpF", "wF", "maxE", "meanE", "adpE", "MAE"}`` (+ ``HCE`` if asked).
    """
    from birefnet.evaluation.metrics import MetricAccumulator, score_image

    module = unwrap_model(model, keep_compiled=True)
    module.eval()
    acc = MetricAccumulator()
    for batch in loader:
        image = _to(batch, "image", device, channels_last)
        with autocast_for(device, precision):
            logits = module(image).logits
        preds = predictions_to_uint8(logits)
        originals = batch.get("mask_original")
        masks = (batch["mask"][:, 0].float() * 255).round().to(torch.uint8).numpy()
        for i, pred in enumerate(preds):
            gt = originals[i] if originals is not None else masks[i]
            gt = gt.numpy() if isinstance(gt, torch.Tensor) else np.asarray(gt)
            acc.update(score_image(pred, gt.astype(np.uint8), hce=hce))
        if progress is not None:
            progress.update()
    return {k: float(v) for k, v in acc.compute().metrics.items()}
