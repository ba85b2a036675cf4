"""BiRefNet: composition of encoder, context fusion, squeeze, decoder and heads.

Zheng et al., "Bilateral Reference for High-Resolution Dichotomous Image Segmentation", CAAI AIR 2024.
The localization module (encoder with image-pyramid input and context fusion, squeeze block, optional
class head) feeds the reconstruction module (``Decoder``) with its bilateral reference. ``forward``
returns a ``BiRefNetOutput`` with the same fields in train and eval mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from birefnet.imaging import gradient_map
from birefnet.models.blocks import AttentionKind, BranchPyramid, SimpleConvs, make_decoder_block
from birefnet.models.config import ModelConfig
from birefnet.models.decoder import Decoder, resize
from birefnet.models.deform import DeformableConv2d, DeformImpl
from birefnet.models.encoders import create_encoder
from birefnet.models.heads import ClassificationHead
from birefnet.models.registry import build_model, register_model


@dataclass
class BiRefNetOutput:
    """Everything one forward pass produces. Logits, never probabilities.

    Attributes:
        logits: ``(B, 1, H, W)`` final prediction.
        stage_logits: side outputs at strides 32, 16, 8 (``(B, 1, H/s, W/s)``), coarse to fine; empty
            without multi-stage supervision.
        gradient_logits: outward-reference gradient predictions at strides 32, 16, 8; filled in training
            with the outward reference, empty otherwise.
        gradient_targets: the matching ``(B, 1, H, W)`` gradient labels (gradient map x upsampled stage
            logits, not detached, as upstream); filled when ``gradient_logits`` is.
        class_logits: ``(B, num_classes)`` with auxiliary classification, else None.
    """

    logits: torch.Tensor
    stage_logits: list[torch.Tensor] = field(default_factory=list)
    gradient_logits: list[torch.Tensor] = field(default_factory=list)
    gradient_targets: list[torch.Tensor] = field(default_factory=list)
    class_logits: torch.Tensor | None = None

    @property
    def supervised_logits(self) -> list[torch.Tensor]:
        """Every map the region losses supervise, in upstream's order: stage logits, then the final logits."""
        return [*self.stage_logits, self.logits]


class BiRefNet(nn.Module):
    """BiRefNet with every paper component a switch (argument names equal ``ModelConfig`` fields).

    Args:
        encoder: ``swin_v1_t|s|b|l`` or a timm model name.
        encoder_weights: local ImageNet weights for the encoder, or None (random init).
        drop_path_rate: encoder stochastic depth, None = upstream's value.
        multiscale_input: ``cat``/``add`` the encoder features of the half-size image, or ``none``.
        context_levels: number of shallow levels (0-3) resized and concatenated to the deepest one.
        squeeze_block: ``basic``, ``residual`` or ``none``.
        squeeze_depth: number of squeeze blocks.
        decoder_block: ``basic`` or ``residual`` (carry the attention), or ``vanilla``: the plain ResNet basic
            block the paper's Table 1 baseline decodes with (needs ``attention='none'``).
        attention: ``none``, ``aspp`` or ``aspp_deformable`` inside the decoder/squeeze blocks.
        attention_strides: strides of the blocks that get the attention (squeeze blocks: 32; decoder blocks:
            32, 16, 8, 4); the others get none.
        decoder_inter_channels: ``fixed`` (64) or ``adaptive`` (in_channels // 4).
        inward_reference: image patches stacked into every decoder stage.
        inward_reference_mode: ``split`` or ``resize``.
        outward_reference: gradient heads and attention.
        multistage_supervision: side outputs at strides 32, 16, 8.
        auxiliary_classification: class head on the deepest features.
        num_classes: classes of that head.
        deform_impl: ``torchvision``, ``sampling`` or ``auto``.
        gradient_checkpointing: recompute encoder stages and decoder blocks in backward.

    Attributes:
        config: the :class:`ModelConfig` it was built from (set by ``build_model``, ``create_model`` and
            ``load_model``; None when built directly), what ``save_model`` embeds.
    """

    config: ModelConfig | None = None

    def __init__(
        self,
        encoder: str = "swin_v1_l",
        encoder_weights: str | Path | None = None,
        drop_path_rate: float | None = None,
        multiscale_input: Literal["cat", "add", "none"] = "cat",
        context_levels: int = 3,
        squeeze_block: Literal["basic", "residual", "none"] = "basic",
        squeeze_depth: int = 1,
        decoder_block: Literal["basic", "residual", "vanilla"] = "basic",
        attention: AttentionKind = "aspp_deformable",
        attention_strides: Sequence[int] = (4, 8, 16, 32),
        decoder_inter_channels: Literal["fixed", "adaptive"] = "fixed",
        inward_reference: bool = True,
        inward_reference_mode: Literal["split", "resize"] = "split",
        outward_reference: bool = True,
        multistage_supervision: bool = True,
        auxiliary_classification: bool = False,
        num_classes: int = 219,
        deform_impl: DeformImpl = "auto",
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if not 0 <= context_levels <= 3:
            raise ValueError(f"context_levels must be in 0..3, given {context_levels}")
        if squeeze_block == "none" and context_levels > 0:
            raise ValueError(f"squeeze_block 'none' needs context_levels 0, given {context_levels}")
        if multiscale_input not in ("cat", "add", "none"):
            raise ValueError(f"multiscale_input must be 'cat', 'add' or 'none', given {multiscale_input!r}")
        self.multiscale_input = multiscale_input
        self.context_levels = context_levels
        self.outward_reference = outward_reference

        self.encoder = create_encoder(encoder, encoder_weights, drop_path_rate)
        factor = 2 if multiscale_input == "cat" else 1
        levels = [c * factor for c in self.encoder.out_channels]  # shallow to deep
        deepest = levels[3]
        self.classifier = ClassificationHead(deepest, num_classes) if auxiliary_classification else None
        fused = deepest + sum(levels[3 - context_levels : 3])
        if squeeze_block == "none":
            self.squeeze = nn.ModuleList()
        else:
            self.squeeze = nn.ModuleList(
                make_decoder_block(
                    squeeze_block, fused if i == 0 else deepest, deepest, decoder_inter_channels,
                    attention if 32 in attention_strides else "none", deform_impl,
                )
                for i in range(squeeze_depth)
            )
        self.decoder = Decoder(
            channels=levels[::-1],
            decoder_block=decoder_block,
            attention=attention,
            attention_strides=attention_strides,
            inter_channels=decoder_inter_channels,
            inward_reference=inward_reference,
            inward_reference_mode=inward_reference_mode,
            outward_reference=outward_reference,
            multistage_supervision=multistage_supervision,
            deform_impl=deform_impl,
            gradient_checkpointing=gradient_checkpointing,
        )
        if gradient_checkpointing:
            self.encoder.set_grad_checkpointing(True)

    def deformable_convs(self) -> Iterator[DeformableConv2d]:
        """Every deformable convolution of the model."""
        return (m for m in self.modules() if isinstance(m, DeformableConv2d))

    def set_deform_impl(self, impl: DeformImpl) -> None:
        """Switch the deformable-convolution kernel of every layer (parameters are unchanged)."""
        for module in self.deformable_convs():
            module.impl = impl

    def inward_embeddings(self) -> Iterator[SimpleConvs]:
        """Every inward-reference patch embedding of the model."""
        return (m for m in self.modules() if isinstance(m, SimpleConvs))

    def _rewrite_switches(self) -> Iterator[tuple[nn.Module, str, object]]:
        """Every exact rewrite's switch: (module, attribute, the value that lets the rewrite run)."""
        for module in self.modules():
            if isinstance(module, SimpleConvs):
                yield module, "fused", None  # None: composed where it saves work
            elif isinstance(module, BranchPyramid):
                yield module, "split_projection", True
        yield self.decoder, "fold_final_head", True

    def set_computed_kernels(self, enabled: bool) -> None:
        """Run the exact rewrites that compute kernels from the weights (the default), or every layer as stated.

        The rewrites: the inward-reference embeddings as composed 5x5 kernels where that saves work, the
        ASPP projections as per-branch shares (no concatenated map), and the final 1x1 head folded ahead of the
        full-size upsampling. Parameters and outputs are unchanged; ONNX export runs the layers as stated.
        """
        for module, key, on in self._rewrite_switches():
            setattr(module, key, on if enabled else False)

    @contextlib.contextmanager
    def layers_as_stated(self) -> Iterator[None]:
        """Within the block, ``set_computed_kernels(False)``; every module's own setting is restored after."""
        saved = [(module, key, getattr(module, key)) for module, key, _ in self._rewrite_switches()]
        self.set_computed_kernels(False)
        try:
            yield
        finally:
            for module, key, value in saved:
                setattr(module, key, value)

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features with the image pyramid input applied.

        Args:
            image: ``(B, 3, H, W)`` normalised image.

        Returns:
            Four maps, shallow to deep, at strides 4, 8, 16, 32.
        """
        features = self.encoder(image)
        if self.multiscale_input == "none":
            return features
        height, width = image.shape[-2:]
        half = F.interpolate(image, size=(height // 2, width // 2), mode="bilinear", align_corners=True)
        pyramid = self.encoder(half)
        if self.multiscale_input == "cat":
            return [torch.cat((f, resize(p, f.shape[-2:])), dim=1) for f, p in zip(features, pyramid, strict=True)]
        return [f + resize(p, f.shape[-2:]) for f, p in zip(features, pyramid, strict=True)]

    def forward(self, image: torch.Tensor, gradient: torch.Tensor | None = None) -> BiRefNetOutput:
        """Segment.

        Args:
            image: ``(B, 3, H, W)`` ImageNet-normalised RGB, H and W multiples of 32.
            gradient: optional ``(B, 1, H, W)`` precomputed gradient map (``birefnet.imaging.gradient_map`` of the
                image); computed from ``image`` when training with the outward reference and not given.

        Returns:
            ``BiRefNetOutput``; gradient fields are filled only in training mode.
        """
        if image.shape[-2] % 32 or image.shape[-1] % 32:
            raise ValueError(f"input sides must be multiples of 32, given {tuple(image.shape[-2:])}")
        first, second, third, deepest = self.encode(image)
        class_logits = self.classifier(deepest) if self.classifier is not None else None
        if self.context_levels:
            context = [resize(f, deepest.shape[-2:]) for f in (first, second, third)[3 - self.context_levels :]]
            deepest = torch.cat((*context, deepest), dim=1)
        for block in self.squeeze:
            deepest = block(deepest)
        if self.training and self.outward_reference:
            gradient = gradient_map(image) if gradient is None else gradient
        else:
            gradient = None
        decoded = self.decoder(image, [deepest, third, second, first], gradient)
        return BiRefNetOutput(
            logits=decoded.logits,
            stage_logits=decoded.stage_logits,
            gradient_logits=decoded.gradient_logits,
            gradient_targets=decoded.gradient_targets,
            class_logits=class_logits,
        )


# ------------------------------------------------------------------------------------ registered variants


@register_model
def birefnet_swin_v1_l(**kwargs: object) -> BiRefNet:
    """The published general checkpoint's architecture (Swin-L, every paper component on)."""
    return build_model(ModelConfig.from_dict({"encoder": "swin_v1_l", **kwargs}))


@register_model
def birefnet_swin_v1_t(**kwargs: object) -> BiRefNet:
    """The published "lite" checkpoint's architecture (Swin-T, every paper component on)."""
    return build_model(ModelConfig.from_dict({"encoder": "swin_v1_t", **kwargs}))


@register_model
def birefnet_pvt_v2_b0(**kwargs: object) -> BiRefNet:
    """A small fast configuration: PVTv2-b0 encoder, every paper component on."""
    return build_model(ModelConfig.from_dict({"encoder": "pvt_v2_b0", **kwargs}))


@register_model
def birefnet_test(**kwargs: object) -> BiRefNet:
    """Tiny variant for tests: timm's ``test_convnext`` encoder (0.2M parameters), every component on."""
    return build_model(ModelConfig.from_dict({"encoder": "test_convnext", **kwargs}))
