"""Building blocks of the BiRefNet decoder (Zheng et al., CAAI AIR 2024).

Decoder blocks (basic and residual, and the vanilla residual block of the paper's ablation baseline), the two
ASPP variants used as attention inside them (the deformable
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

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) -> (B, out, 1, 1), the value ``forward`` broadcasts."""
        pooled = self.conv(F.adaptive_avg_pool2d(x, 1))
        if self.training and pooled.shape[0] == 1:
            bn = self.bn
            pooled = F.batch_norm(pooled, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        else:
            pooled = self.bn(pooled)
        return F.relu(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) -> (B, out, H, W), constant over H and W."""
        return self.pooled(x).expand(-1, -1, x.shape[2], x.shape[3])


class BranchPyramid(nn.Module):
    """Parallel branches plus a global-pool branch, concatenated, projected by a 1x1 conv -> BN -> ReLU ->
    dropout back to the input width (the body shared by ``ASPP`` and ``ASPPDeformable``).

    With ``split_projection`` (the default) the 1x1 projection of the concatenation runs as the sum of each
    branch's share of it, and the pooled branch's share is computed once per image and broadcast: the same
    function without building the concatenated map (``BiRefNet.set_computed_kernels(False)`` switches it off).
    """

    def __init__(self, in_channels: int, branches: list[nn.Module]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.pool = GlobalPoolBranch(in_channels, ASPP_CHANNELS)
        self.project = nn.Conv2d(ASPP_CHANNELS * (len(branches) + 1), in_channels, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(in_channels)
        self.dropout = nn.Dropout(0.5)
        self.split_projection = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        if not self.split_projection:
            parts = [branch(x) for branch in self.branches] + [self.pool(x)]
            projected = self.project(torch.cat(parts, dim=1))
        else:
            shares = self.project.weight.split(ASPP_CHANNELS, dim=1)
            projected = F.conv2d(self.pool.pooled(x), shares[-1])
            for branch, share in zip(self.branches, shares, strict=False):
                projected = projected + F.conv2d(branch(x), share)
        return self.dropout(F.relu(self.project_bn(projected)))


class ASPP(BranchPyramid):
    """Atrous spatial pyramid pooling: a 1x1 and three dilated 3x3 branches plus a global-pool branch.

    Args:
        in_channels: input channels C (also the output channels).
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__(in_channels, [ConvBranch(in_channels, ASPP_CHANNELS, 1 if d == 1 else 3, dilation=d)
                                       for d in ASPP_DILATIONS])


class ASPPDeformable(BranchPyramid):
    """The reconstruction block: deformable branches (1x1, then 1x1/3x3/7x7) plus a global-pool branch.

    Upstream has two 1x1 deformable branches (``aspp1`` and the first of ``aspp_deforms``); both are kept
    so the published weights load.

    Args:
        in_channels: input channels C (also the output channels).
        deform_impl: deformable kernel implementation.
    """

    def __init__(self, in_channels: int, deform_impl: DeformImpl = "auto") -> None:
        super().__init__(in_channels, [ConvBranch(in_channels, ASPP_CHANNELS, k, deformable=True,
                                                  deform_impl=deform_impl) for k in (1, *DEFORMABLE_KERNELS)])


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


class VanillaResidualBlock(nn.Module):
    """The ResNet basic block (He et al., CVPR 2016): the decoder block of the paper's ablation baseline.

    BiRefNet Sec. 3.2 uses "reconstruction block (RB) in each BiRef block as a replacement for the vanilla
    residual blocks"; Table 1's baseline decodes with these. Two 3x3 convolutions at the output width, a 1x1
    convolution + BN projection shortcut when the widths differ (identity otherwise), ReLU after the sum. It has
    no inner width and no attention: it is what the reconstruction block replaces.

    Args:
        in_channels: input channels.
        out_channels: output channels.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) -> (B, out, H, W)."""
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


DECODER_BLOCKS: dict[str, type[BasicDecoderBlock]] = {"basic": BasicDecoderBlock, "residual": ResidualDecoderBlock}
#: Every decoder block name ``make_decoder_block`` accepts.
DECODER_BLOCK_KINDS = (*DECODER_BLOCKS, "vanilla")


def make_decoder_block(
    kind: str,
    in_channels: int,
    out_channels: int,
    inter_channels: Literal["fixed", "adaptive"] = "fixed",
    attention: AttentionKind = "aspp_deformable",
    deform_impl: DeformImpl = "auto",
) -> nn.Module:
    """Build a decoder block by name; inner width 64 or ``in_channels // 4``.

    ``basic`` and ``residual`` carry the attention (``aspp_deformable`` makes them the reconstruction block);
    ``vanilla`` is the plain ResNet basic block of the ablation baseline and takes neither attention nor inner
    width, so asking it for an attention is an error rather than a silently ignored argument.
    """
    if kind == "vanilla":
        if attention != "none":
            raise ValueError(f"the vanilla residual block has no attention: given attention {attention!r}, "
                             "expected 'none' (or leave this block's stride out of attention_strides)")
        return VanillaResidualBlock(in_channels, out_channels)
    if kind not in DECODER_BLOCKS:
        raise ValueError(f"decoder block must be one of {list(DECODER_BLOCK_KINDS)}, given {kind!r}")
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


#: Smallest multiply-add saving for which ``SimpleConvs`` runs its composed 5x5 kernel by default.
FUSE_MIN_SAVING = 4


class SimpleConvs(nn.Module):
    """Two 3x3 convolutions with bias and nothing between them (the inward-reference patch embedding).

    Nothing non-linear sits between the two convolutions, so away from the border they are one 5x5
    convolution whose kernel is the composition of the two. Where that kernel is cheaper (few input and
    output channels around a wide middle, as in the full-size embedding: 3 -> 64 -> 8 channels, a tenth of
    the multiply-adds), ``forward`` runs it and corrects the one-pixel output border, where the middle map's
    zero padding differs from the composed kernel's view. Same parameters, same function and gradients up to
    float rounding; ``fused`` switches it (None: when it saves at least ``FUSE_MIN_SAVING`` times the work).
    """

    def __init__(self, in_channels: int, out_channels: int, inter_channels: int = 64,
                 fused: bool | None = None) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, inter_channels, 3, padding=1)
        self.conv_out = nn.Conv2d(inter_channels, out_channels, 3, padding=1)
        #: None: composed where it saves at least ``FUSE_MIN_SAVING`` times the work; True / False: always / never.
        self.fused = fused

    def composes(self, out_channels: int | None = None) -> bool:
        """Whether the pair runs as one composed kernel, for ``out_channels`` outputs (default: ``conv_out``'s)."""
        if self.fused is not None:
            return self.fused
        inter, inputs = self.conv_in.out_channels, self.conv_in.in_channels
        outputs = self.conv_out.out_channels if out_channels is None else out_channels
        # Only where the saving is large: at half the multiply-adds (48 -> 64 -> 16 at stride 4) the 5x5
        # convolution measured slower on CPU than the two 3x3 ones.
        return outputs * inputs * 25 * FUSE_MIN_SAVING < inter * (inputs + outputs) * 9

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) -> (B, out, H, W)."""
        return self._pair(x, self.conv_out.weight, self.conv_out.bias)

    def forward_projected(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``conv2d(self(x), weight, bias)`` for a 1x1 ``weight`` (P, out, 1, 1), without the ``out``-channel map.

        The projection is folded into the second convolution (P outputs instead of ``out``), which then runs
        composed with the first where that saves work (with P = 1: one 5x5 kernel over the input channels).
        """
        projection = weight[:, :, 0, 0]
        w2 = torch.einsum("po,omhw->pmhw", projection, self.conv_out.weight)
        b2 = projection @ self.conv_out.bias if self.conv_out.bias is not None else None
        if bias is not None:
            b2 = bias if b2 is None else b2 + bias
        return self._pair(x, w2, b2)

    def _pair(self, x: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor | None) -> torch.Tensor:
        """``conv2d(conv_in(x), w2, b2, padding=1)``, composed when ``composes`` says so."""
        if not self.composes(w2.shape[0]) or x.shape[-2] < 3 or x.shape[-1] < 3:
            return F.conv2d(self.conv_in(x), w2, b2, padding=1)
        return composed_conv3x3_pair(x, self.conv_in.weight, self.conv_in.bias, w2, b2)


def composed_conv3x3_pair(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                          b2: torch.Tensor | None) -> torch.Tensor:
    """``conv2d(conv2d(x, w1, b1, padding=1), w2, b2, padding=1)`` as one 5x5 convolution plus a border fix.

    Args:
        x: ``(B, C_in, H, W)`` with H, W >= 3.
        w1: ``(C_mid, C_in, 3, 3)``; b1: ``(C_mid,)`` or None.
        w2: ``(C_out, C_mid, 3, 3)``; b2: ``(C_out,)`` or None.

    Returns:
        ``(B, C_out, H, W)``, equal to the two convolutions up to float rounding.
    """
    height, width = x.shape[-2:]
    # 5x5 kernel: K[:, :, a, b] = sum over (p + r = a, q + s = b) of w2[:, :, p, q] @ w1[:, :, r, s].
    kernel = w2.new_zeros(w2.shape[0], w1.shape[1], 5, 5)
    for p in range(3):
        for q in range(3):
            kernel = kernel + F.pad(torch.einsum("om,mihw->oihw", w2[:, :, p, q], w1), (q, 2 - q, p, 2 - p))
    bias = w2.sum(dim=(2, 3)) @ b1 if b1 is not None else None
    if b2 is not None:
        bias = b2 if bias is None else bias + b2
    y = F.conv2d(x, kernel, bias, padding=2)
    # The composed kernel sees the first convolution's values on a one-pixel ring outside the image, where
    # the two-convolution path sees the second convolution's zero padding. Those ring values come from
    # three-wide strips of the first convolution over the zero-padded input; subtract what they contribute.
    padded = F.pad(x, (2, 2, 2, 2))
    w1_t, w2_t = w1.transpose(-1, -2), w2.transpose(-1, -2)
    # Rows: output rows 0 and H-1. Columns (the same on the transposed strips): rows 1..H-2 only, as the
    # corners are in the row fixes.
    y[:, :, 0:1, :] -= _edge_fix(padded[:, :, 0:5, :], w1, b1, w2, ring_row=0)
    y[:, :, height - 1:height, :] -= _edge_fix(padded[:, :, height - 1:height + 4, :], w1, b1, w2, ring_row=2)
    left = _edge_fix(padded[:, :, :, 0:5].transpose(-1, -2), w1_t, b1, w2_t, ring_row=0).transpose(-1, -2)
    right = _edge_fix(padded[:, :, :, width - 1:width + 4].transpose(-1, -2), w1_t, b1, w2_t,
                      ring_row=2).transpose(-1, -2)
    y[:, :, 1:height - 1, 0:1] -= left[:, :, 1:height - 1]
    y[:, :, 1:height - 1, width - 1:width] -= right[:, :, 1:height - 1]
    return y


def _edge_fix(rows: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
              ring_row: int) -> torch.Tensor:
    """What the ring outside the image adds to one output row of the composed kernel.

    Args:
        rows: five rows of the input zero-padded by 2, ``(B, C_in, 5, W + 4)``, giving three rows of the first
            convolution on the ``(H+2) x (W+2)`` grid.
        ring_row: which of those three rows (0 or 2) lies outside the image; of the others only the two end
            columns do.

    Returns:
        ``(B, C_out, 1, W)``.
    """
    strip = F.conv2d(rows, w1, b1)
    outside = torch.zeros_like(strip[:1, :1])
    outside[..., ring_row, :] = 1.0
    outside[..., :, 0] = 1.0
    outside[..., :, -1] = 1.0
    return F.conv2d(strip * outside, w2)
