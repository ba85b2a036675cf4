"""Building blocks of the BiRefNet decoder (Zheng et al., CAAI AIR 2024).

Decoder blocks (basic and residual), the two ASPP variants used as attention inside them (the deformable
one with 1x1/3x3/7x7 receptive fields and a global-pool branch is the paper's reconstruction block), the
lateral 1x1 block and the two-convolution block that embeds image patches for the inward reference.

Every normalisation is a ``BatchNorm2d`` (as in the published checkpoints). Upstream's key names are
mapped onto these modules in ``convert.py``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from birefnet.models.deform import DeformableConv2d, DeformImpl

AttentionKind = Literal["none", "aspp", "aspp_deformable"]

#: Width of every ASPP branch.
ASPP_CHANNELS = 256
#: Kernel sides of the deformable branches beside the 1x1 one (the paper's 1x1/3x3/7x7 receptive fields).
DEFORMABLE_KERNELS = (1, 3, 7)
#: Dilations of the four convolution branches of the plain ASPP (output stride 16).
ASPP_DILATIONS = (1, 6, 12, 18)


class ConvBranch(nn.Module):
    """Convolution (plain or deformable, no bias) -> BatchNorm -> ReLU.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: kernel side.
        dilation: dilation of a plain convolution.
        deformable: use ``DeformableConv2d`` instead of ``nn.Conv2d``.
        deform_impl: deformable kernel implementation.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        dilation: int = 1,
        deformable: bool = False,
        deform_impl: DeformImpl = "auto",
    ) -> None:
        super().__init__()
        padding = dilation * (kernel_size // 2)
        self.conv: nn.Module
        if deformable:
            self.conv = DeformableConv2d(
                in_channels, out_channels, kernel_size, padding=padding, bias=False, impl=deform_impl
            )
        else:
            self.conv = nn.Conv2d(
                in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False
            )
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) -> (B, out, H, W)."""
        return F.relu(self.bn(self.conv(x)))


class GlobalPoolBranch(nn.Module):
    """Global average pool -> 1x1 conv -> BatchNorm -> ReLU, broadcast back to the input size.

    With a batch of one in training mode a BatchNorm over a 1x1 map has one value per channel, which
    PyTorch rejects (upstream cannot train with per-device batch 1); this branch then normalises with its
    running statistics instead. Other batch sizes behave as a plain BatchNorm.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) -> (B, out, H, W), constant over H and W."""
        pooled = self.conv(F.adaptive_avg_pool2d(x, 1))
        if self.training and pooled.shape[0] == 1:
            bn = self.bn
            pooled = F.batch_norm(pooled, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        else:
            pooled = self.bn(pooled)
        return F.relu(pooled).expand(-1, -1, x.shape[2], x.shape[3])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 and three dilated 3x3 branches plus a global-pool branch.

    Args:
        in_channels: input channels C (also the output channels).
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            ConvBranch(in_channels, ASPP_CHANNELS, 1 if d == 1 else 3, dilation=d) for d in ASPP_DILATIONS
        )
        self.pool = GlobalPoolBranch(in_channels, ASPP_CHANNELS)
        self.project = nn.Conv2d(ASPP_CHANNELS * (len(ASPP_DILATIONS) + 1), in_channels, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(in_channels)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        parts = [branch(x) for branch in self.branches] + [self.pool(x)]
        return self.dropout(F.relu(self.project_bn(self.project(torch.cat(parts, dim=1)))))


class ASPPDeformable(nn.Module):
    """The reconstruction block: deformable branches (1x1, then 1x1/3x3/7x7) plus a global-pool branch.

    Upstream has two 1x1 deformable branches (``aspp1`` and the first of ``aspp_deforms``); both are kept
    so the published weights load.

    Args:
        in_channels: input channels C (also the output channels).
        deform_impl: deformable kernel implementation.
    """

    def __init__(self, in_channels: int, deform_impl: DeformImpl = "auto") -> None:
        super().__init__()
        kernels = (1, *DEFORMABLE_KERNELS)
        self.branches = nn.ModuleList(
            ConvBranch(in_channels, ASPP_CHANNELS, k, deformable=True, deform_impl=deform_impl) for k in kernels
        )
        self.pool = GlobalPoolBranch(in_channels, ASPP_CHANNELS)
        self.project = nn.Conv2d(ASPP_CHANNELS * (len(kernels) + 1), in_channels, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(in_channels)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        parts = [branch(x) for branch in self.branches] + [self.pool(x)]
        return self.dropout(F.relu(self.project_bn(self.project(torch.cat(parts, dim=1)))))


def make_attention(kind: AttentionKind, channels: int, deform_impl: DeformImpl = "auto") -> nn.Module:
    """Build the attention module of a decoder block (``none`` gives an identity)."""
    if kind == "aspp":
        return ASPP(channels)
    if kind == "aspp_deformable":
        return ASPPDeformable(channels, deform_impl=deform_impl)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"attention must be 'none', 'aspp' or 'aspp_deformable', given {kind!r}")


class BasicDecoderBlock(nn.Module):
    """3x3 conv -> BN -> ReLU -> attention -> 3x3 conv -> BN (no final activation).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        inter_channels: inner width (64 in the paper; ``in_channels // 4`` when adaptive).
        attention: attention module kind.
        deform_impl: deformable kernel implementation.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        inter_channels: int = 64,
        attention: AttentionKind = "aspp_deformable",
        deform_impl: DeformImpl = "auto",
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, inter_channels, 3, padding=1)
        self.bn_in = nn.BatchNorm2d(inter_channels)
        self.attention = make_attention(attention, inter_channels, deform_impl)
        self.conv_out = nn.Conv2d(inter_channels, out_channels, 3, padding=1)
        self.bn_out = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) -> (B, out, H, W)."""
        x = F.relu(self.bn_in(self.conv_in(x)))
        return self.bn_out(self.conv_out(self.attention(x)))


class ResidualDecoderBlock(BasicDecoderBlock):
    """``BasicDecoderBlock`` plus a 1x1 projection of the input added to its output."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        inter_channels: int = 64,
        attention: AttentionKind = "aspp_deformable",
        deform_impl: DeformImpl = "auto",
    ) -> None:
        super().__init__(in_channels, out_channels, inter_channels, attention, deform_impl)
        self.conv_residual = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) -> (B, out, H, W)."""
        return super().forward(x) + self.conv_residual(x)


DECODER_BLOCKS: dict[str, type[BasicDecoderBlock]] = {"basic": BasicDecoderBlock, "residual": ResidualDecoderBlock}


def make_decoder_block(
    kind: str,
    in_channels: int,
    out_channels: int,
    inter_channels: Literal["fixed", "adaptive"] = "fixed",
    attention: AttentionKind = "aspp_deformable",
    deform_impl: DeformImpl = "auto",
) -> BasicDecoderBlock:
    """Build a decoder block by name (``basic`` or ``residual``); inner width 64 or ``in_channels // 4``."""
    if kind not in DECODER_BLOCKS:
        raise ValueError(f"decoder block must be one of {sorted(DECODER_BLOCKS)}, given {kind!r}")
    width = 64 if inter_channels == "fixed" else max(in_channels // 4, 1)
    return DECODER_BLOCKS[kind](in_channels, out_channels, width, attention, deform_impl)


class LateralBlock(nn.Module):
    """1x1 convolution with bias carrying an encoder level into the decoder."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) -> (B, out, H, W)."""
        return self.conv(x)


class SimpleConvs(nn.Module):
    """Two 3x3 convolutions with bias and nothing between them (the inward-reference patch embedding)."""

    def __init__(self, in_channels: int, out_channels: int, inter_channels: int = 64) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, inter_channels, 3, padding=1)
        self.conv_out = nn.Conv2d(inter_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) -> (B, out, H, W)."""
        return self.conv_out(self.conv_in(x))
