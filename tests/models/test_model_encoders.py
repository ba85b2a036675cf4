"""Encoders: channels and strides against timm's feature_info; the Swin window-attention change."""

from __future__ import annotations

import pytest
import torch
from timm.models.swin_transformer import SwinTransformerBlock

from birefnet.models.encoders import PaddedShiftSwinBlock, SwinEncoder, create_encoder


@pytest.mark.parametrize("name", ["test_convnext", "pvt_v2_b0"])
def test_timm_encoder_contract(name: str) -> None:
    encoder = create_encoder(name).eval()
    info = encoder.model.feature_info
    assert encoder.reductions == (4, 8, 16, 32)
    assert encoder.out_channels == tuple(info.channels()[i] for i in encoder.indices)
    with torch.no_grad():
        features = encoder(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in features] == [
        (1, c, 64 // r, 96 // r) for c, r in zip(encoder.out_channels, (4, 8, 16, 32), strict=True)
    ]


def test_swin_encoder_contract_and_any_size() -> None:
    torch.manual_seed(0)
    encoder = SwinEncoder("swin_v1_t").eval()
    assert encoder.out_channels == (96, 192, 384, 768) and encoder.reductions == (4, 8, 16, 32)
    assert sum(p.numel() for p in encoder.parameters()) == 27_520_698  # upstream's swin_v1_t backbone
    assert all(isinstance(b, PaddedShiftSwinBlock) for s in encoder.model.layers for b in s.blocks)
    # every block keeps its shift, even on stages no larger than the window (always_partition)
    assert [b.shift_size for b in encoder.model.layers[3].blocks] == [(0, 0), (3, 3)]
    with torch.no_grad():
        features = encoder(torch.randn(1, 3, 64, 96))  # stages 16x24 .. 2x3: none a multiple of 7
    assert [tuple(f.shape[-2:]) for f in features] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert all(torch.isfinite(f).all() for f in features)


def test_window_order_matters_only_when_padding() -> None:
    """pad -> roll equals timm's roll -> pad when no stage needs padding (window 7, 224 input: 56/28/14/7)."""
    torch.manual_seed(0)
    encoder = SwinEncoder("swin_v1_t").eval()
    stage = encoder.model.layers[0]
    block = stage.blocks[1]  # shifted block
    x = torch.randn(1, 56, 56, 96)
    with torch.no_grad():
        ours = block(x)
        block.__class__ = SwinTransformerBlock
        timm_out = block(x)
        block.__class__ = PaddedShiftSwinBlock
    torch.testing.assert_close(ours, timm_out, rtol=1e-5, atol=1e-5)
    x = torch.randn(1, 20, 30, 96)  # needs padding: the orders differ
    with torch.no_grad():
        ours = block(x)
        block.__class__ = SwinTransformerBlock
        timm_out = block(x)
        block.__class__ = PaddedShiftSwinBlock
    assert not torch.allclose(ours, timm_out, atol=1e-3)
