"""The reconstruction module of BiRefNet (Zheng et al., CAAI AIR 2024): a four-stage decoder with the
bilateral reference.

* Inward reference: at every stage the input image, cut into a grid of full-resolution patches stacked on
  the channel axis (``split``) or resized (``resize``), is embedded and concatenated to the stage input.
* Outward reference: after each of the three deep stages a gradient head predicts the gradient map and
  its sigmoid attention multiplies the stage features; training labels are the gradient map masked by
  the stage's own prediction.
* Multi-stage supervision: 1-channel side outputs after the three deep stages.

Channels are given deepest first (``C0..C3``); stage i outputs ``C(i+1)`` (the last ``C3 // 2``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from birefnet.models.blocks import AttentionKind, LateralBlock, SimpleConvs, make_decoder_block
from birefnet.models.deform import DeformImpl
from birefnet.models.heads import GradientHead

#: Patch grid of the inward reference per stage (the stage's stride) and for the final full-size step.
INWARD_GRIDS = (32, 16, 8, 4, 1)
#: Inner width of the inward-reference patch embeddings.
INWARD_INTER_CHANNELS = 64


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize with ``align_corners=True`` (upstream's convention); identity when sizes match."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def image_to_patches(image: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Cut an image into a grid of tiles stacked on channels.

    Args:
        image: ``(B, C, H, W)`` with H divisible by ``grid_h`` and W by ``grid_w``.

    Returns:
        ``(B, C * grid_h * grid_w, H / grid_h, W / grid_w)``; channel ``c * gh * gw + i * gw + j`` holds
        tile (i, j) of channel c.
    """
    batch, channels, height, width = image.shape
    if height % grid_h or width % grid_w:
        raise ValueError(f"image {height}x{width} is not divisible into a {grid_h}x{grid_w} grid")
    tiles = image.reshape(batch, channels, grid_h, height // grid_h, grid_w, width // grid_w)
    return tiles.permute(0, 1, 2, 4, 3, 5).reshape(batch, channels * grid_h * grid_w, height // grid_h, width // grid_w)


@dataclass
class DecoderOutput:
    """What the decoder computes; see ``BiRefNetOutput`` for the fields."""

    logits: torch.Tensor
    stage_logits: list[torch.Tensor] = field(default_factory=list)
    gradient_logits: list[torch.Tensor] = field(default_factory=list)
    gradient_targets: list[torch.Tensor] = field(default_factory=list)


class Decoder(nn.Module):
    """Four decoder stages with lateral connections, bilateral reference and side outputs.

    Args:
        channels: encoder channels after context fusion/squeeze, deepest first ``(C0, C1, C2, C3)``.
        decoder_block: ``basic``, ``residual`` or ``vanilla`` (the ResNet basic block of the ablation baseline).
        attention: attention inside the decoder blocks.
        attention_strides: strides of the blocks that get it (block ``i`` works at stride ``32 / 2**i``).
        inter_channels: ``fixed`` (64) or ``adaptive`` (in_channels // 4) inner width.
        inward_reference: embed image patches into every stage.
        inward_reference_mode: ``split`` (patch grid on channels) or ``resize`` (the resized image).
        outward_reference: gradient heads and gradient attention on the three deep stages.
        multistage_supervision: side outputs on the three deep stages (needed by the outward reference).
        deform_impl: deformable convolution implementation.
        gradient_checkpointing: recompute the decoder blocks in backward.
    """

    def __init__(
        self,
        channels: Sequence[int],
        decoder_block: str = "basic",
        attention: AttentionKind = "aspp_deformable",
        attention_strides: Sequence[int] = (4, 8, 16, 32),
        inter_channels: Literal["fixed", "adaptive"] = "fixed",
        inward_reference: bool = True,
        inward_reference_mode: Literal["split", "resize"] = "split",
        outward_reference: bool = True,
        multistage_supervision: bool = True,
        deform_impl: DeformImpl = "auto",
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"the decoder needs 4 encoder levels, given {len(channels)} channel counts")
        if outward_reference and not multistage_supervision:
            raise ValueError("outward_reference needs multistage_supervision (labels are masked by stage outputs)")
        self.inward_reference = inward_reference
        self.inward_reference_mode = inward_reference_mode
        self.outward_reference = outward_reference
        self.multistage_supervision = multistage_supervision
        self.gradient_checkpointing = gradient_checkpointing

        out_channels = [channels[1], channels[2], channels[3], channels[3] // 2]
        inward_channels = [c // 8 for c in channels] if inward_reference else [0, 0, 0, 0]
        # Stage i concatenates the embedding of width inward_channels[max(i - 1, 0)] (upstream's layout:
        # the two deepest embeddings share the deepest width); the final step uses inward_channels[3].
        stage_inward = [inward_channels[max(i - 1, 0)] for i in range(4)] + [inward_channels[3]]
        if inward_reference:
            self.image_blocks = nn.ModuleList(
                SimpleConvs(3 * g * g if inward_reference_mode == "split" else 3, width, INWARD_INTER_CHANNELS)
                for g, width in zip(INWARD_GRIDS, stage_inward, strict=True)
            )
        self.blocks = nn.ModuleList(
            make_decoder_block(
                decoder_block, channels[i] + stage_inward[i], out_channels[i], inter_channels,
                attention if 32 >> i in attention_strides else "none", deform_impl,
            )
            for i in range(4)
        )
        self.laterals = nn.ModuleList(LateralBlock(channels[i + 1], out_channels[i]) for i in range(3))
        if multistage_supervision:
            self.stage_heads = nn.ModuleList(nn.Conv2d(out_channels[i], 1, 1) for i in range(3))
        if outward_reference:
            self.gradient_heads = nn.ModuleList(GradientHead(out_channels[i]) for i in range(3))
        self.final_head = nn.Conv2d(out_channels[3] + stage_inward[4], 1, 1)
        #: Apply the final 1x1 head before the upsampling and inside the full-size embedding (see ``_final``).
        self.fold_final_head = True

    def _inward(self, index: int, image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Concatenate the image embedding of stage ``index`` to ``reference`` (B, C, h, w)."""
        size = reference.shape[-2:]
        if self.inward_reference_mode == "split":
            grid = INWARD_GRIDS[index]
            # Upstream derives the grid from the sizes (H // h); for sizes that are multiples of 32 it is
            # the stage stride, which the embedding's input channels are built for.
            if image.shape[-2] // size[0] != grid or image.shape[-1] // size[1] != grid:
                raise ValueError(
                    f"inward reference: a {tuple(image.shape[-2:])} image gives a {tuple(size)} stage map, "
                    f"expected stride {grid}; input sides must be multiples of 32"
                )
            patches = image_to_patches(image, grid, grid)
        else:
            patches = image
        return torch.cat((reference, self.image_blocks[index](resize(patches, size))), dim=1)

    def _block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        block = self.blocks[index]
        if self.gradient_checkpointing and self.training and x.requires_grad:
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward(
        self, image: torch.Tensor, features: Sequence[torch.Tensor], gradient: torch.Tensor | None = None
    ) -> DecoderOutput:
        """Decode.

        Args:
            image: ``(B, 3, H, W)`` normalised input image.
            features: four maps, deepest first: ``(B, C0, H/32, W/32)`` (squeezed), then strides 16, 8, 4.
            gradient: ``(B, 1, H, W)`` gradient map; with the outward reference, gradient predictions and
                targets are returned when it is given (training).

        Returns:
            ``DecoderOutput`` with the ``(B, 1, H, W)`` logits, stage logits at strides 32/16/8, and the
            gradient logits (strides 32/16/8) and targets (``(B, 1, H, W)``) when ``gradient`` is given.
        """
        out = DecoderOutput(logits=image.new_empty(0))
        x = features[0]
        for index in range(4):
            if index > 0:
                lateral = features[index]
                x = resize(x, lateral.shape[-2:]) + self.laterals[index - 1](lateral)
            if self.inward_reference:
                x = self._inward(index, image, x)
            x = self._block(index, x)
            if index == 3:
                break
            if self.multistage_supervision:
                stage_logits = self.stage_heads[index](x)
                out.stage_logits.append(stage_logits)
            if self.outward_reference:
                x, prediction = self.gradient_heads[index](x, predict=gradient is not None)
                if gradient is not None and prediction is not None:
                    out.gradient_logits.append(prediction)
                    # Not detached, as upstream: the label's gradient also reaches the stage head.
                    out.gradient_targets.append(gradient * resize(stage_logits, gradient.shape[-2:]))
        out.logits = self._final(image, x) if self.fold_final_head else self._final_unfolded(image, x)
        return out

    def _final_unfolded(self, image: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The final map as the architecture states it: upsample, stack the image embedding, 1x1 head."""
        x = resize(x, image.shape[-2:])
        if self.inward_reference:
            x = self._inward(4, image, x)
        return self.final_head(x)

    def _final(self, image: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``_final_unfolded`` computed with the 1x1 head moved ahead of the linear steps it follows.

        The head is linear over channels and bilinear upsampling is linear per channel with weights summing to
        one, so the head's part for the decoder features is applied at stride 4 and one channel is upsampled;
        its part for the image embedding is folded into the embedding's last convolution (one output channel).
        Same function up to float rounding; the full-size multi-channel maps are never built.
        """
        head = self.final_head
        width = x.shape[1]
        logits = resize(F.conv2d(x, head.weight[:, :width]), image.shape[-2:])
        if not self.inward_reference:
            return logits + head.bias.view(1, -1, 1, 1)
        return logits + self.image_blocks[4].forward_projected(image, head.weight[:, width:], head.bias)
