"""Modulated deformable convolution (DCNv2) with two interchangeable kernels.

BiRefNet's reconstruction block (Zheng et al., "Bilateral Reference for High-Resolution Dichotomous Image
Segmentation", CAAI AIR 2024) reads its features through deformable convolutions with 1x1, 3x3 and 7x7
receptive fields. Two implementations compute the same function from the same parameters:

* ``torchvision``: ``torchvision.ops.deform_conv2d`` (im2col kernel; slow backward on CPU).
* ``sampling``: bilinear sampling of the input at every kernel tap's shifted position with
  ``F.grid_sample`` (zeros outside the map, like torchvision), the modulation mask multiplied in, and one
  matmul over (channels x taps), run as a 1x1 convolution. It uses only standard ops, so it also
  exports to ONNX (GridSample, opset 16).

``auto`` picks the faster one per device (see ``AUTO_IMPL``; measured by ``benchmarks/model_step.py``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import deform_conv2d as torchvision_deform_conv2d

DeformImpl = Literal["torchvision", "sampling", "auto"]

#: Implementation used by ``auto`` per device type (the faster one in benchmarks/model_step.py).
AUTO_IMPL: dict[str, str] = {"cpu": "sampling", "cuda": "torchvision"}


def resolve_deform_impl(impl: str, device: torch.device) -> str:
    """Return the concrete implementation name for ``impl`` on ``device``."""
    if impl == "auto":
        return AUTO_IMPL.get(device.type, "sampling")
    if impl not in ("torchvision", "sampling"):
        raise ValueError(f"deform_impl must be 'torchvision', 'sampling' or 'auto', given {impl!r}")
    return impl


def sampling_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype both kernels sample ``x`` in: its own, but at least float32.

    In bfloat16 the normalised grid's spacing near 1 is 2**-8 (half a pixel on a 256-wide map) and integers
    above 256 already round; and torchvision's kernel has no bfloat16 at all (on CUDA only its own autocast
    wrapper lifts half inputs), so a bf16 input would fail with "deformable_im2col not implemented".
    """
    return torch.promote_types(x.dtype, torch.float32)


def float_torchvision_deform_conv2d(
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    stride: int = 1,
    padding: int = 0,
) -> torch.Tensor:
    """``torchvision.ops.deform_conv2d`` at ``sampling_dtype(x)`` outside autocast, returned in ``x``'s dtype.

    Same arguments and result as ``sampling_deform_conv2d``; works for bf16 inputs, under autocast and in
    bf16 modules, on every device.
    """
    dtype = sampling_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        out = torchvision_deform_conv2d(
            x.to(dtype), offset.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
            stride=stride, padding=padding, mask=None if mask is None else mask.to(dtype),
        )
    return out.to(x.dtype)


def _tap_grid(
    offset: torch.Tensor,
    kernel_size: int,
    stride: int,
    padding: int,
    dilation: int,
    height: int,
    width: int,
) -> torch.Tensor:
    """Normalised sampling grid for every kernel tap.

    Args:
        offset: ``(B, 2*K, Ho, Wo)`` offsets, (dy, dx) per tap, taps in row-major kernel order (K = k*k).

    Returns:
        ``(B, K*Ho, Wo, 2)`` grid in ``grid_sample``'s (x, y) order for ``align_corners=False``.
    """
    batch, _, out_h, out_w = offset.shape
    taps = kernel_size * kernel_size
    device, dtype = offset.device, offset.dtype
    tap_rows = torch.arange(kernel_size, device=device, dtype=dtype).repeat_interleave(kernel_size) * dilation
    tap_cols = torch.arange(kernel_size, device=device, dtype=dtype).repeat(kernel_size) * dilation
    rows = torch.arange(out_h, device=device, dtype=dtype) * stride - padding
    cols = torch.arange(out_w, device=device, dtype=dtype) * stride - padding
    offset = offset.view(batch, taps, 2, out_h, out_w)
    y = rows.view(1, 1, out_h, 1) + tap_rows.view(1, taps, 1, 1) + offset[:, :, 0]
    x = cols.view(1, 1, 1, out_w) + tap_cols.view(1, taps, 1, 1) + offset[:, :, 1]
    # Pixel p maps to (2p + 1) / size - 1 with align_corners=False; zeros padding then gives torchvision's
    # bilinear interpolation with zero contributions from outside the map.
    grid = torch.stack(((2 * x + 1) / width - 1, (2 * y + 1) / height - 1), dim=-1)
    return grid.view(batch, taps * out_h, out_w, 2)


def sampling_deform_conv2d(
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
) -> torch.Tensor:
    """Modulated deformable convolution as ``grid_sample`` + one matmul (one offset group, no groups).

    Args:
        x: ``(B, C, H, W)`` input.
        offset: ``(B, 2*k*k, Ho, Wo)`` offsets in torchvision's layout.
        weight: ``(O, C, k, k)`` kernel.
        bias: ``(O,)`` or None.
        mask: ``(B, k*k, Ho, Wo)`` modulation, or None for all ones.

    Returns:
        ``(B, O, Ho, Wo)`` output, equal to ``torchvision.ops.deform_conv2d`` up to float rounding.
    """
    batch, channels, height, width = x.shape
    out_channels, _, kernel_h, kernel_w = weight.shape
    if kernel_h != kernel_w:
        raise ValueError(f"square kernels only, given {kernel_h}x{kernel_w}")
    out_h, out_w = offset.shape[-2:]
    taps = kernel_h * kernel_w
    # Positions and sampling at float32 at least (see ``sampling_dtype``); the modulation and the contraction
    # run in the input's dtype.
    dtype = sampling_dtype(x)
    grid = _tap_grid(offset.to(dtype), kernel_h, stride, padding, dilation, height, width)
    sampled = F.grid_sample(x.to(dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    sampled = sampled.to(x.dtype)
    sampled = sampled.view(batch, channels, taps, out_h, out_w)
    if mask is not None:
        sampled = sampled * mask.view(batch, 1, taps, out_h, out_w).to(sampled.dtype)
    # The contraction over (channels x taps) as a 1x1 convolution: same maths as one matmul, but batched
    # without the transpose copies torch.matmul makes for (O, CK) @ (B, CK, P), forward and backward.
    columns = sampled.view(batch, channels * taps, out_h, out_w)
    # Shaped from the weight alone: the ONNX exporter needs a kernel of static shape, and sizes read from
    # the input are traced as dynamic (torch.onnx.export with dynamic axes).
    kernel = weight.flatten(1)[:, :, None, None].to(columns.dtype)
    return F.conv2d(columns, kernel, None if bias is None else bias.to(columns.dtype))


class DeformableConv2d(nn.Module):
    """Modulated deformable convolution whose offsets and mask are predicted from its input.

    The offset and modulator convolutions are zero-initialised, so at init (offsets 0, mask 2*sigmoid(0) = 1)
    the layer equals a plain convolution with ``conv``'s weights.

    Args:
        in_channels: input channels C.
        out_channels: output channels O.
        kernel_size: square kernel side k.
        padding: zero padding on every side.
        stride: stride of the convolution.
        bias: whether ``conv`` has a bias.
        impl: ``torchvision``, ``sampling`` or ``auto`` (per device, see ``AUTO_IMPL``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        padding: int = 1,
        stride: int = 1,
        bias: bool = False,
        impl: DeformImpl = "auto",
    ) -> None:
        super().__init__()
        taps = kernel_size * kernel_size
        self.kernel_size = kernel_size
        self.padding = padding
        self.stride = stride
        self.impl = impl
        self.offset = nn.Conv2d(in_channels, 2 * taps, kernel_size, stride=stride, padding=padding, bias=True)
        self.modulator = nn.Conv2d(in_channels, taps, kernel_size, stride=stride, padding=padding, bias=True)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        for layer in (self.offset, self.modulator):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the convolution.

        Args:
            x: ``(B, C, H, W)`` features.

        Returns:
            ``(B, O, Ho, Wo)`` features.
        """
        offset = self.offset(x)
        mask = 2.0 * torch.sigmoid(self.modulator(x))
        kernel = float_torchvision_deform_conv2d if resolve_deform_impl(self.impl, x.device) == "torchvision" \
            else sampling_deform_conv2d
        return kernel(x, offset, self.conv.weight, self.conv.bias, mask=mask, stride=self.stride, padding=self.padding)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, padding={self.padding}, stride={self.stride}, impl={self.impl!r}"
