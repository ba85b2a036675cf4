"""Loss terms of BiRefNet (Zheng et al., CAAI AIR 2024), one module each: ``(logits, target) -> Tensor``.

Every term takes logits and applies the sigmoid itself, matching upstream's criteria, which receive
``sigmoid(pred)``; BCE is computed from logits (the same value, numerically stable). Targets are masks in
[0, 1] of shape ``(B, 1, H, W)`` (class indices for ``ClassificationLoss``). Terms compute in fp32 even
under autocast. Predictions smaller than the target are resized by ``composite.BiRefNetLoss``, not here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _fp32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.float() for t in tensors]


class BCELoss(nn.Module):
    """Binary cross-entropy, mean over all pixels (upstream ``nn.BCELoss`` on the sigmoid)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) logits and targets -> scalar."""
        with torch.autocast(logits.device.type, enabled=False):
            logits, target = _fp32(logits, target.clamp(0, 1))
            return F.binary_cross_entropy_with_logits(logits, target)


class IoULoss(nn.Module):
    """Soft IoU loss ``1 - sum(p*g) / (sum(g) + sum(p) - sum(p*g))`` per sample, summed over the batch.

    Summed, not averaged, and without an epsilon, as upstream (the denominator is clamped to the smallest
    positive float only to keep an all-zero pair finite).
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) logits and targets -> scalar."""
        with torch.autocast(logits.device.type, enabled=False):
            logits, target = _fp32(logits, target.clamp(0, 1))
            prob = torch.sigmoid(logits).flatten(1)
            target = target.flatten(1)
            intersection = (prob * target).sum(dim=1)
            union = (prob.sum(dim=1) + target.sum(dim=1) - intersection).clamp_min(torch.finfo(torch.float32).tiny)
            return (1 - intersection / union).sum()


def gaussian_line(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """(size,) normalised 1-D Gaussian."""
    coords = torch.arange(size, dtype=torch.float64) - size // 2
    line = torch.exp(-(coords**2) / (2 * sigma**2))
    return (line / line.sum()).float()


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """(size, size) normalised Gaussian window (outer product of the 1-D one)."""
    line = gaussian_line(size, sigma)
    return torch.outer(line, line)


class SSIMLoss(nn.Module):
    """``(1 - SSIM) / 2`` with an 11x11 Gaussian window (sigma 1.5), zero padding, C1 = 0.01^2, C2 = 0.03^2.

    SSIM is the mean of the SSIM map over batch, channels and pixels. The target may have one channel for a
    prediction of several (maps stacked on channels share one blurred target).
    """

    def __init__(self, window_size: int = 11, sigma: float = 1.5) -> None:
        super().__init__()
        self.register_buffer("line", gaussian_line(window_size, sigma), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) logits and (B, C or 1, H, W) targets -> scalar."""
        with torch.autocast(logits.device.type, enabled=False):
            logits, target = _fp32(logits, target.clamp(0, 1))
            return (1 - ssim(torch.sigmoid(logits), target, self.line.to(logits.device))) / 2


class _SymmetricBlur(torch.autograd.Function):
    """Depthwise separable blur with a symmetric window and zero padding, whose backward is the same blur.

    A zero-padded correlation's adjoint is the correlation with the flipped window, here the window itself,
    so the gradient is one more forward blur: about twice as fast on CPU as the grouped convolution's own
    backward (``convolution_backward`` on depthwise maps), with the same values up to float rounding.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, stack: torch.Tensor, line: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(line)
        return _blur(stack, line)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (line,) = ctx.saved_tensors
        return _blur(grad, line), None


def _blur(stack: torch.Tensor, line: torch.Tensor) -> torch.Tensor:
    """Blur every channel of ``(B, C, H, W)`` with the separable window ``line`` (two 1-D passes, zero padding).

    The same sums as one k x k convolution, about k/2 times cheaper; channels_last is the faster layout for
    these depthwise passes on CPU.
    """
    size, groups = line.numel(), stack.shape[1]
    stack = stack.contiguous(memory_format=torch.channels_last)
    vertical = line.to(stack.dtype).view(1, 1, size, 1).expand(groups, 1, size, 1)
    horizontal = line.to(stack.dtype).view(1, 1, 1, size).expand(groups, 1, 1, size)
    vertical_pass = F.conv2d(stack, vertical, padding=(size // 2, 0), groups=groups)
    return F.conv2d(vertical_pass, horizontal, padding=(0, size // 2), groups=groups)


def ssim(x: torch.Tensor, y: torch.Tensor, line: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of two maps in [0, 1], per channel, with a separable Gaussian window.

    Args:
        x: ``(B, C, H, W)`` prediction.
        y: ``(B, C, H, W)`` target, or ``(B, 1, H, W)`` shared by every channel of ``x`` (blurred once).
        line: ``(k,)`` symmetric 1-D window of odd length (the blur's backward relies on the symmetry); the
            2-D window is its outer product.

    Returns:
        The mean of the SSIM map over batch, channels and pixels.
    """
    channels = x.shape[1]
    if y.shape[1] not in (1, channels):
        raise ValueError(f"target has {y.shape[1]} channels, expected 1 or {channels}")
    blurred_x = _SymmetricBlur.apply(torch.cat((x, x * x, x * y), dim=1), line)
    mu_x, xx, xy = blurred_x.split(channels, dim=1)
    y_stack = torch.cat((y, y * y), dim=1)
    blurred_y = _SymmetricBlur.apply(y_stack, line) if y.requires_grad else _blur(y_stack, line)
    mu_y, yy = blurred_y.split(y.shape[1], dim=1)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    sigma_xx, sigma_yy, sigma_xy = xx - mu_xx, yy - mu_yy, xy - mu_xy
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_xy + c1) * (2 * sigma_xy + c2)) / ((mu_xx + mu_yy + c1) * (sigma_xx + sigma_yy + c2))
    return ssim_map.mean()


class MAELoss(nn.Module):
    """Mean absolute error between the sigmoid and the target (upstream's 'mae', used for General sets)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) logits and targets -> scalar."""
        with torch.autocast(logits.device.type, enabled=False):
            logits, target = _fp32(logits, target.clamp(0, 1))
            return (torch.sigmoid(logits) - target).abs().mean()


class MSELoss(nn.Module):
    """Mean squared error between the sigmoid and the target (upstream's 'mse'; a matting term on soft alphas)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) logits and targets -> scalar."""
        with torch.autocast(logits.device.type, enabled=False):
            logits, target = _fp32(logits, target.clamp(0, 1))
            return (torch.sigmoid(logits) - target).square().mean()


class ClassificationLoss(nn.Module):
    """Cross-entropy of the auxiliary class head; samples labelled ``ignore_index`` (-1: no class) are skipped."""

    def __init__(self, ignore_index: int = -1) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) logits and (B,) class indices -> scalar (0 when every label is ignored)."""
        with torch.autocast(logits.device.type, enabled=False):
            valid = target != self.ignore_index
            if not bool(valid.any()):
                return logits.float().sum() * 0.0
            return F.cross_entropy(logits.float(), target.long(), ignore_index=self.ignore_index)


class GradientLoss(nn.Module):
    """Outward-reference loss of one stage: ``BCE(sigmoid(up(prediction)), sigmoid(target))``.

    The prediction logits are resized (bilinear, ``align_corners=True``) to the target's size; the target
    (gradient map x stage logits) is squashed by a sigmoid, as upstream, and not detached.
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, 1, h, w) gradient logits and (B, 1, H, W) gradient targets -> scalar."""
        with torch.autocast(logits.device.type, enabled=False):
            logits, target = _fp32(logits, target)
            if logits.shape[-2:] != target.shape[-2:]:
                logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=True)
            soft = torch.sigmoid(target)
            # BCE with logits written out so the target's gradient exists too (torch's kernel gives none).
            return (F.softplus(logits) - logits * soft).mean()
