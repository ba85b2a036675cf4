"""Deformable convolution: the sampling kernel equals torchvision's (values and gradients)."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import deform_conv2d

from birefnet.models.deform import DeformableConv2d, resolve_deform_impl, sampling_deform_conv2d


@pytest.mark.parametrize(
    ("kernel", "stride", "size"), [(1, 1, (9, 11)), (3, 1, (12, 10)), (7, 1, (10, 10)), (3, 2, (13, 16))]
)
def test_sampling_equals_torchvision(kernel: int, stride: int, size: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(kernel)
    pad = kernel // 2
    x = torch.randn(2, 5, *size, generator=generator, dtype=torch.float64, requires_grad=True)
    out_h = (size[0] + 2 * pad - kernel) // stride + 1
    out_w = (size[1] + 2 * pad - kernel) // stride + 1
    offset = (
        3 * torch.randn(2, 2 * kernel**2, out_h, out_w, generator=generator, dtype=torch.float64)
    ).requires_grad_()
    mask = (2 * torch.rand(2, kernel**2, out_h, out_w, generator=generator, dtype=torch.float64)).requires_grad_()
    weight = torch.randn(4, 5, kernel, kernel, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, generator=generator, dtype=torch.float64, requires_grad=True)
    inputs = (x, offset, mask, weight, bias)
    reference = deform_conv2d(x, offset, weight, bias, stride=stride, padding=pad, mask=mask)
    ours = sampling_deform_conv2d(x, offset, weight, bias, mask=mask, stride=stride, padding=pad)
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-9)
    upstream = torch.randn(reference.shape, generator=generator, dtype=torch.float64)
    grads_reference = torch.autograd.grad(reference, inputs, upstream)
    grads_ours = torch.autograd.grad(ours, inputs, upstream)
    for a, b in zip(grads_ours, grads_reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)


def test_module_is_plain_conv_at_init_and_impls_share_parameters() -> None:
    torch.manual_seed(0)
    module = DeformableConv2d(6, 8, 3, padding=1, impl="sampling")
    x = torch.randn(2, 6, 10, 12)
    plain = torch.nn.functional.conv2d(x, module.conv.weight, padding=1)
    torch.testing.assert_close(module(x), plain, rtol=1e-5, atol=1e-5)
    torch.nn.init.normal_(module.offset.weight, std=0.1)
    sampled = module(x)
    module.impl = "torchvision"
    torch.testing.assert_close(sampled, module(x), rtol=1e-4, atol=1e-5)


def test_auto_resolves_per_device() -> None:
    assert resolve_deform_impl("auto", torch.device("cpu")) in ("sampling", "torchvision")
    assert resolve_deform_impl("torchvision", torch.device("cpu")) == "torchvision"
    with pytest.raises(ValueError):
        resolve_deform_impl("cuda_magic", torch.device("cpu"))


@pytest.mark.parametrize("impl", ["torchvision", "sampling"])
def test_bf16_under_autocast_and_in_a_bf16_module(impl: str) -> None:
    # torchvision's CPU kernel has no bfloat16: the torchvision path must lift to float32 itself, both under
    # autocast (bf16 activations, fp32 weights) and in a module cast to bf16 as a whole.
    torch.manual_seed(0)
    module = DeformableConv2d(6, 8, 3, padding=1, bias=True, impl=impl)
    torch.nn.init.normal_(module.offset.weight, std=0.1)
    torch.nn.init.normal_(module.modulator.weight, std=0.1)
    x = torch.randn(2, 6, 10, 12)
    reference = module(x)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)

    x_grad = x.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        module(x_grad).float().square().mean().backward()
    assert x_grad.grad is not None and torch.isfinite(x_grad.grad).all()
    assert module.conv.weight.grad is not None and module.conv.weight.grad.dtype == torch.float32
    assert module.offset.weight.grad is not None and module.offset.weight.grad.abs().sum() > 0

    half = DeformableConv2d(6, 8, 3, padding=1, bias=True, impl=impl)
    half.load_state_dict(module.state_dict())
    half = half.to(torch.bfloat16)
    out = half(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("impl", ["torchvision", "sampling"])
def test_bf16_keeps_sampling_positions_exact_on_wide_maps(impl: str) -> None:
    # A 0/1 stripe pattern (exact in bf16) read back through a 1x1 deformable convolution with zero offsets
    # and unit weight must come out unchanged; a position off by half a pixel reads 0.5 instead. A bf16
    # sampling grid is that far off on a 512-wide map; the half-pixel offsets must give exactly 0.5.
    width = 512
    module = DeformableConv2d(1, 1, 1, padding=0, impl=impl)
    with torch.no_grad():
        module.conv.weight.fill_(1.0)
    stripes = (torch.arange(width) % 2).float().view(1, 1, 1, width).expand(1, 1, 2, width).contiguous()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(stripes.bfloat16())
    assert torch.equal(out.float(), stripes)

    with torch.no_grad():
        module.offset.bias.copy_(torch.tensor([0.0, 0.5]))  # (dy, dx): half a pixel to the right
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(stripes.bfloat16()).float()
    torch.testing.assert_close(out[..., :-1], torch.full_like(out[..., :-1], 0.5), rtol=0, atol=0)
