"""A tiny BiRefNet (``test_convnext`` encoder, random weights) for the inference tests."""

from __future__ import annotations

import torch

from birefnet.config import ModelParams
from birefnet.models import BiRefNet, build_model

#: Model resolution the tests predict at (width, height).
TEST_SIZE = (64, 96)


def build_tiny_model(seed: int = 0) -> tuple[BiRefNet, ModelParams]:
    """``birefnet_test``-sized model with non-trivial deformable offsets so the outputs vary per pixel."""
    torch.manual_seed(seed)
    params = ModelParams(encoder="test_convnext")
    model = build_model(params).eval()
    with torch.no_grad():
        # Offsets and modulators start at zero (a plain convolution); nudge them so both deform kernels and
        # the exported GridSample path are exercised with real fractional offsets.
        for layer in model.deformable_convs():
            layer.offset.weight.normal_(0.0, 0.05)
            layer.offset.bias.uniform_(-0.5, 0.5)
            layer.modulator.weight.normal_(0.0, 0.05)
        # Random init gives logits within about +-0.3; spread them so the 8-bit masks use most of the range.
        model.decoder.final_head.weight.mul_(10.0)
    return model, params
