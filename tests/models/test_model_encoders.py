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


def test_swin_window_attention_calls_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every Swin block's window attention goes through F.scaled_dot_product_attention by default."""
    calls: list[tuple[int, ...]] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(tuple(q.shape))
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    encoder = SwinEncoder("swin_v1_t").eval()
    with torch.no_grad():
        encoder(torch.randn(2, 3, 64, 96))
    # 6 unshifted blocks attend all windows at once, 6 shifted ones image by image (one shared mask)
    assert len(calls) == 6 + 6 * 2 and sum(len(s.blocks) for s in encoder.model.layers) == 12
    # (windows, heads, N, d): stage 1 of 16x24 is padded to 21x28 = 3x4 windows of 7x7, 12 per image
    assert calls[:3] == [(24, 3, 49, 32), (12, 3, 49, 32), (12, 3, 49, 32)]
    encoder.set_fused_attention(False)
    calls.clear()
    with torch.no_grad():
        encoder(torch.randn(1, 3, 64, 96))
    assert calls == []


def test_swin_sdpa_equals_stated_attention_values_and_gradients() -> None:
    """SDPA window attention equals the stated softmax path in fp32: BiRefNet logits and every gradient.

    The decoder's deformable blocks are off (``attention="none"``): their bilinear sampling is discontinuous
    where an offset crosses a pixel, so float rounding anywhere upstream moves their gradients by up to 1 % in
    either path. Eval mode keeps batch statistics and drop-path out of the comparison.
    """
    from birefnet.models import create_model

    torch.manual_seed(0)
    model = create_model("birefnet_test", encoder="swin_v1_t", attention="none").eval()
    image = torch.randn(2, 3, 96, 128)  # stages 24x32 .. 3x4: padding and shift masks on every stage
    results = []
    for fused in (True, False):
        model.encoder.set_fused_attention(fused)
        model.zero_grad(set_to_none=True)
        logits = model(image).logits
        logits.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logits.detach(), grads))
    (fused_logits, fused_grads), (stated_logits, stated_grads) = results
    torch.testing.assert_close(fused_logits, stated_logits, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == stated_grads.keys()
    assert sum("relative_position_bias_table" in n for n in fused_grads) == 12
    for name, grad in fused_grads.items():
        scale = stated_grads[name].abs().max().item()
        assert (grad - stated_grads[name]).abs().max().item() <= 1e-5 * max(scale, 1.0), name


def test_swin_attention_auto_uses_sdpa_except_for_cpu_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Default (auto): CPU training keeps the stated softmax (SDPA would run its slower reference maths there,
    the mask needing a gradient); CPU inference and a frozen bias go through SDPA."""
    calls: list[int] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    encoder = SwinEncoder("swin_v1_t").train()
    image = torch.randn(1, 3, 64, 64)
    encoder(image)
    assert calls == []
    with torch.no_grad():
        encoder(image)
    assert len(calls) == 12
    calls.clear()
    for p in encoder.parameters():
        p.requires_grad_(False)
    encoder(image)
    assert len(calls) == 12
    calls.clear()
    encoder.set_fused_attention(True)
    for p in encoder.parameters():
        p.requires_grad_(True)
    encoder(image)
    assert len(calls) == 12
