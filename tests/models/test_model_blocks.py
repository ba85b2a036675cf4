"""The inward-reference embedding's composed 5x5 path equals its two 3x3 convolutions, values and gradients."""

from __future__ import annotations

import pytest
import torch

from birefnet.models import create_model
from birefnet.models.blocks import SimpleConvs


@pytest.mark.parametrize(
    ("channels", "size"),
    [((3, 64, 8), (40, 40)), ((3, 64, 24), (33, 17)), ((48, 64, 16), (5, 3)), ((2, 16, 5), (3, 3)),
     ((3, 8, 4), (3, 7))],
)
def test_composed_path_equals_two_convolutions(channels: tuple[int, int, int], size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    cin, mid, cout = channels
    block = SimpleConvs(cin, cout, mid, fused=True).double()
    for p in block.parameters():  # non-trivial biases, so the border fix matters
        torch.nn.init.normal_(p)
    x = torch.randn(2, cin, *size, dtype=torch.float64, requires_grad=True)
    fused = block(x)
    block.fused = False
    plain = block(x)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(plain)
    grads_fused = torch.autograd.grad(fused, [x, *block.parameters()], upstream)
    grads_plain = torch.autograd.grad(plain, [x, *block.parameters()], upstream)
    for a, b in zip(grads_fused, grads_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_border_fix_is_needed() -> None:
    """Without the border correction the composed kernel differs on the one-pixel output border only."""
    torch.manual_seed(1)
    block = SimpleConvs(3, 4, 16).double()
    torch.nn.init.normal_(block.conv_in.bias)
    x = torch.randn(1, 3, 9, 11, dtype=torch.float64)
    with torch.no_grad():
        plain = block.conv_out(block.conv_in(x))
        assert float((block(x) - plain).abs().max()) < 1e-12
    # What the composed kernel computes before the fix: the first convolution also evaluated on the ring
    # outside the image (input zero-padded by 2), then the second without padding.
    conv = torch.nn.functional.conv2d
    with torch.no_grad():
        unfixed = conv(conv(torch.nn.functional.pad(x, (2, 2, 2, 2)), block.conv_in.weight, block.conv_in.bias),
                       block.conv_out.weight, block.conv_out.bias)
    assert unfixed.shape == plain.shape
    off = (unfixed - plain).abs()[0].amax(dim=0)
    assert float(off[1:-1, 1:-1].max()) < 1e-12
    assert float(off[0].min()) > 1e-6 and float(off[:, 0].min()) > 1e-6


def test_default_chooses_composed_path_only_for_large_savings() -> None:
    assert SimpleConvs(3, 8, 64).fused  # full-size embedding: a tenth of the multiply-adds
    assert SimpleConvs(3, 24, 64).fused
    assert not SimpleConvs(48, 16, 64).fused  # stride 4: half, measured slower
    assert not SimpleConvs(3072, 64, 64).fused


def test_model_output_same_with_and_without_composed_path() -> None:
    torch.manual_seed(0)
    model = create_model("birefnet_test").double().eval()
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    blocks = [m for m in model.modules() if isinstance(m, SimpleConvs)]
    assert any(b.fused for b in blocks)
    with torch.no_grad():
        fused = model(x).logits
        for b in blocks:
            b.fused = False
        plain = model(x).logits
    torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-10)
